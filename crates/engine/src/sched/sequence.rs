//! One request as the engine loop tracks it: its tokens, how many of them have KV in
//! the store, the blocks holding them, and where its events go.

use tokio::sync::mpsc;

use super::handle::SeqId;
use super::request::{FinishReason, GenerationEvent, GenerationRequest, Usage};
use crate::constrain::{Allowed, ConstraintError, OutputConstraint};
use crate::kv::BlockId;
use crate::kv::pool::BlockHash;
use crate::sample::{DeviceDraw, Sampler, TokenLogprobs};
use crate::transfer::{Handoff, KvRole};

/// The most prompt positions a step computes for a request that wants them all
/// (prompt log probabilities): 256 rows of logits are 50 MB at a 49k vocabulary.
pub(crate) const PROMPT_LOGITS_CHUNK: usize = 256;

pub(crate) struct Sequence {
    pub id: SeqId,
    /// The caller's id (for logs, and the base of a hand-off's remote request id).
    pub request_id: String,
    /// Prompt followed by the tokens generated so far.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens whose keys and values are in the KV store.
    pub num_computed: usize,
    pub blocks: Vec<BlockId>,
    /// Hashes of the leading blocks registered in the prefix cache.
    pub block_hashes: Vec<BlockHash>,
    pub cached_tokens: usize,
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    pub sampler: Sampler,
    /// The grammar its output follows (structured output).
    constraint: Option<OutputConstraint>,
    pub kv: KvRole,
    /// Where a remote prefill's pull stands.
    pub pull: PullState,
    /// The caller went away while a pull was writing into the blocks: finish once the
    /// pull ends.
    pub abandoned: bool,
    /// The stop token that ended the generation.
    pub stop_token: Option<u32>,
    /// The stop token's log probabilities, when asked for.
    pub stop_logprobs: Option<Box<TokenLogprobs>>,
    /// With prompt log probabilities asked for: how many top tokens, and those
    /// collected so far (`None` once sent).
    prompt_logprobs: Option<(usize, Vec<TokenLogprobs>)>,
    /// See [`GenerationRequest::after_prompt_of`].
    pub after_prompt_of: Option<SeqId>,
    events: mpsc::UnboundedSender<GenerationEvent>,
}

/// Progress of a [`KvRole::RemotePrefill`] request's pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullState {
    /// Not started (or not a remote prefill).
    NotStarted,
    InFlight,
    /// Pulled, skipped (prompt cached here), or given up on: compute as usual.
    Settled,
}

impl Sequence {
    pub fn new(
        id: SeqId,
        request: GenerationRequest,
        events: mpsc::UnboundedSender<GenerationEvent>,
    ) -> Self {
        let sampler =
            Sampler::for_sequence(request.sampling, &request.prompt, &request.stop_token_ids);
        Self {
            id,
            request_id: request.request_id,
            prompt_len: request.prompt.len(),
            tokens: request.prompt,
            num_computed: 0,
            blocks: Vec::new(),
            block_hashes: Vec::new(),
            cached_tokens: 0,
            max_tokens: request.max_tokens,
            stop_token_ids: request.stop_token_ids,
            sampler,
            constraint: request.constraint,
            kv: request.kv,
            pull: PullState::NotStarted,
            abandoned: false,
            stop_token: None,
            stop_logprobs: None,
            prompt_logprobs: request.prompt_logprobs.map(|top| (top, Vec::new())),
            after_prompt_of: request.after_prompt_of,
            events,
        }
    }

    /// The next token from a row of logits, within the output's grammar if it has
    /// one; `None` when the grammar is complete and nothing may follow.
    pub fn next_token(&mut self, logits: &[f32]) -> Result<Option<u32>, ConstraintError> {
        let Some(constraint) = self.constraint.as_mut() else {
            return Ok(Some(self.sampler.sample(logits)));
        };
        let token = match constraint.allowed()? {
            Allowed::Complete => return Ok(None),
            Allowed::Tokens(mask) => self.sampler.sample_within(logits, mask.as_slice()),
        };
        constraint.accept(token)?;
        Ok(Some(token))
    }

    /// Whether this sequence's next token can be picked where its logits are, without
    /// bringing them back: nothing reports them (log probabilities, prompt log
    /// probabilities) and no grammar masks them.
    pub fn samples_on_device(&self) -> bool {
        !self.sampler.reports_logprobs() && self.constraint.is_none() && !self.wants_prompt_logits()
    }

    /// The draw for the device to pick this sequence's next token with (see
    /// [`Sequence::samples_on_device`]); `None` when it cannot.
    pub fn device_draw(&mut self) -> Option<DeviceDraw> {
        if !self.samples_on_device() {
            return None;
        }
        self.sampler.device_draw()
    }

    /// Takes the token the device picked for [`Sequence::device_draw`].
    pub fn take_device_token(&mut self, token: u32) -> u32 {
        self.sampler.record_device_token(token);
        token
    }

    /// Appends a sampled token and sends it on; the reason the sequence ends with it,
    /// if it does.
    pub fn accept_token(
        &mut self,
        token: u32,
        logprobs: Option<TokenLogprobs>,
    ) -> Option<FinishReason> {
        self.tokens.push(token);
        metrics::counter!(crate::metrics::GENERATION_TOKENS_TOTAL).increment(1);
        if self.stop_token_ids.contains(&token) {
            self.stop_token = Some(token);
            self.stop_logprobs = logprobs.map(Box::new);
            Some(FinishReason::Stop)
        } else if !self.send_token(token, logprobs) {
            Some(FinishReason::Aborted)
        } else if self.output_complete() {
            Some(FinishReason::Stop)
        } else if self.generated() >= self.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    /// Whether the next forward pass must give logits for every prompt position.
    pub fn wants_prompt_logits(&self) -> bool {
        self.prompt_logprobs.is_some()
    }

    /// Takes the log probabilities of the prompt tokens that `rows` (logits of the
    /// positions from `start` on, `vocab` each) predict.
    pub fn collect_prompt_logprobs(&mut self, start: usize, rows: &[f32], vocab: usize) {
        let Some((top, collected)) = self.prompt_logprobs.as_mut() else {
            return;
        };
        for (offset, row) in rows.chunks_exact(vocab).enumerate() {
            let predicted = start + offset + 1;
            if predicted < self.prompt_len {
                collected.push(crate::sample::logprobs_of(
                    row,
                    self.tokens[predicted],
                    *top,
                ));
            }
        }
    }

    /// Reports the prompt's log probabilities (once its last position was computed).
    pub fn send_prompt_logprobs(&mut self) {
        if let Some((_, collected)) = self.prompt_logprobs.take() {
            let _ = self.events.send(GenerationEvent::PromptLogprobs(collected));
        }
    }

    /// Whether the output's grammar is complete (nothing may follow).
    pub fn output_complete(&self) -> bool {
        self.constraint
            .as_ref()
            .is_some_and(OutputConstraint::is_complete)
    }

    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens still to run through the model before the next sample.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Tokens to run through the model in the next step, at most: all pending ones,
    /// but a prompt whose every position's logits are kept goes in chunks of
    /// [`PROMPT_LOGITS_CHUNK`], so that those logits stay a few tens of MB.
    pub fn step_len(&self) -> usize {
        if self.wants_prompt_logits() {
            self.pending().min(PROMPT_LOGITS_CHUNK)
        } else {
            self.pending()
        }
    }

    /// Whether the caller still listens.
    pub fn is_listening(&self) -> bool {
        !self.events.is_closed()
    }

    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated(),
            cached_tokens: self.cached_tokens,
        }
    }

    /// Reports a token (with its log probabilities, if asked for); false if the
    /// caller has gone.
    pub fn send_token(&self, token: u32, logprobs: Option<TokenLogprobs>) -> bool {
        let event = match logprobs {
            None => GenerationEvent::Token(token),
            Some(logprobs) => GenerationEvent::TokenWithLogprobs(token, Box::new(logprobs)),
        };
        self.events.send(event).is_ok()
    }

    pub fn send_finished(&self, reason: FinishReason, handoff: Option<Handoff>) {
        let usage = self.usage();
        let _ = self.events.send(GenerationEvent::Finished {
            reason,
            usage,
            handoff,
            stop_token: self.stop_token,
            stop_logprobs: self.stop_logprobs.clone(),
        });
    }

    /// A remote prefill whose pull has not been settled yet.
    pub fn awaits_pull(&self) -> bool {
        matches!(self.kv, KvRole::RemotePrefill(_)) && self.pull == PullState::NotStarted
    }

    pub fn send_failed(&self, message: String) {
        let _ = self.events.send(GenerationEvent::Failed(message));
    }

    /// Forgets the computed KV (after its blocks were released) so the sequence can be
    /// recomputed from scratch, generated tokens included.
    pub fn reset_for_recompute(&mut self) {
        if let Some((_, collected)) = self.prompt_logprobs.as_mut() {
            collected.clear();
        }
        self.num_computed = 0;
        self.blocks.clear();
        self.block_hashes.clear();
    }
}
