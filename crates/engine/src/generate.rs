//! One prompt, one sequence, no server: what `tandem generate` and the engine
//! benchmark run. Prefills the prompt in chunks, then decodes token by token through
//! the same batched forward pass and KV store the server uses.

use std::time::{Duration, Instant};

use crate::kernels::ThreadPool;
use crate::kv::{BlockAllocator, BlockId, KvOptions, KvStore};
use crate::model::{ForwardError, ForwardScratch, Llama, LogitsFor, SeqInput};
use crate::sample::{Sampler, SamplingParams};

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token (not included in the output).
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The callback asked to stop.
    Cancelled,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Tokens that end generation; empty (or `ignore_eos`) to always run to `max_tokens`.
    pub stop_tokens: Vec<u32>,
    /// Prompt tokens per forward pass while prefilling.
    pub prefill_chunk: usize,
    pub kv: KvOptions,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop_tokens: Vec::new(),
            prefill_chunk: 512,
            kv: KvOptions::default(),
        }
    }
}

/// Counts and timings of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    /// Tokens produced, including the one sampled from the prompt's logits.
    pub generated_tokens: usize,
    /// Time to process the prompt and sample the first token.
    pub prefill_time: Duration,
    /// Time spent in the decode forward passes that followed.
    pub decode_time: Duration,
    pub decode_steps: usize,
    pub finish: FinishReason,
}

impl GenerateStats {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.decode_steps as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of {context} tokens"
    )]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

/// Generates from `prompt`, handing each new token to `on_token`, which returns
/// `false` to stop early.
pub fn generate(
    model: &Llama,
    pool: &ThreadPool,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<GenerateStats, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let context = model.config().max_position_embeddings;
    // The last sampled token is never fed back, so it needs no position.
    let positions = prompt.len() + options.max_tokens.saturating_sub(1);
    if positions > context {
        return Err(GenerateError::TooLong {
            prompt: prompt.len(),
            max_tokens: options.max_tokens,
            context,
        });
    }
    let mut session = Session::new(model, pool, positions, options.kv);
    let mut sampler = Sampler::new(options.sampling.clone());

    let started = Instant::now();
    let mut token = prefill(&mut session, prompt, options.prefill_chunk, &mut sampler)?;
    let prefill_time = started.elapsed();

    let mut stats = GenerateStats {
        prompt_tokens: prompt.len(),
        generated_tokens: 0,
        prefill_time,
        decode_time: Duration::ZERO,
        decode_steps: 0,
        finish: FinishReason::Length,
    };
    let decode_started = Instant::now();
    loop {
        if options.stop_tokens.contains(&token) {
            stats.finish = FinishReason::Stop;
            break;
        }
        stats.generated_tokens += 1;
        if !on_token(token) {
            stats.finish = FinishReason::Cancelled;
            break;
        }
        if stats.generated_tokens >= options.max_tokens {
            break;
        }
        let logits = session.feed(std::slice::from_ref(&token), LogitsFor::Last)?;
        token = sampler.sample(logits);
        stats.decode_steps += 1;
    }
    stats.decode_time = decode_started.elapsed();
    Ok(stats)
}

/// Runs the prompt through the model in chunks and samples the first new token.
fn prefill(
    session: &mut Session,
    prompt: &[u32],
    chunk: usize,
    sampler: &mut Sampler,
) -> Result<u32, GenerateError> {
    let mut chunks = prompt.chunks(chunk.max(1)).peekable();
    while let Some(tokens) = chunks.next() {
        let last = chunks.peek().is_none();
        let logits = session.feed(
            tokens,
            if last {
                LogitsFor::Last
            } else {
                LogitsFor::None
            },
        )?;
        if last {
            return Ok(sampler.sample(logits));
        }
    }
    Err(GenerateError::EmptyPrompt)
}

/// One sequence with a KV store of its own, fed tokens in order.
pub struct Session<'m> {
    model: &'m Llama,
    pool: &'m ThreadPool,
    kv: KvStore,
    blocks: Vec<BlockId>,
    scratch: ForwardScratch,
    /// Positions already in the KV store.
    len: usize,
}

impl<'m> Session<'m> {
    /// A session with room for `capacity` positions.
    pub fn new(model: &'m Llama, pool: &'m ThreadPool, capacity: usize, kv: KvOptions) -> Self {
        let layout = model.kv_layout(kv);
        let num_blocks = layout.blocks_for(capacity.max(1));
        let blocks = BlockAllocator::new(num_blocks)
            .allocate(num_blocks)
            .expect("a fresh allocator holds every block");
        Self {
            model,
            pool,
            kv: KvStore::new(layout, num_blocks),
            blocks,
            scratch: ForwardScratch::default(),
            len: 0,
        }
    }

    /// Appends `tokens` to the sequence and returns the logits asked for.
    pub fn feed(&mut self, tokens: &[u32], logits: LogitsFor) -> Result<&[f32], ForwardError> {
        let input = [SeqInput {
            tokens,
            start_pos: self.len,
            block_table: &self.blocks,
            logits,
        }];
        let out = self
            .model
            .forward(self.pool, &input, &mut self.kv, &mut self.scratch)?;
        self.len += tokens.len();
        Ok(out)
    }
}
