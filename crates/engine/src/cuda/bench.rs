//! What the GPU engine reaches, against the ceilings measured in the same run
//! ([`super::limits`]): decode steps at several batch sizes against the memory roofline
//! (weight and KV bytes per step over the device-to-device copy traffic), prefill
//! against the bf16 GEMM rate, and the KV hand-off between two caches (GPU to GPU, and
//! staged through the host) against the copy bandwidth. `tandem gpu bench` prints it.
//!
//! Times are wall-clock around whole engine steps (each ends with its logits, or its
//! greedy token ids, on the host), so they include everything a served request pays:
//! metadata upload, launches or graph replay, the copy back. A mixed step (decodes and
//! prompt chunks together, as a loaded server runs) is timed against the same work as
//! two steps.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::limits::{self, Probe};
use super::model::{GpuRunner, KvBudget, RunnerLimits};
use super::{CudaModel, GpuError};
use crate::kv::{BlockId, KvOptions};
use crate::model::{ForwardError, LogitsFor, SeqInput};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Limits(#[from] limits::LimitsError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    /// Concurrent sequences of the decode measurements.
    pub decode_batches: Vec<usize>,
    /// Prompt tokens of each decoding sequence (its context while decoding).
    pub decode_context: usize,
    /// Timed decode steps per batch size.
    pub decode_steps: usize,
    /// Prompt lengths of the prefill measurements (one sequence each).
    pub prefill_lengths: Vec<usize>,
    /// Prompt tokens whose KV the hand-off measurement copies.
    pub handoff_tokens: usize,
    /// Prompt tokens (in chunks of up to [`MIXED_CHUNK`]) that share one step with the
    /// largest decode batch in the mixed-step measurement (0: skip it).
    pub mixed_prefill_tokens: usize,
    /// Replay decode steps from CUDA graphs.
    pub cuda_graphs: bool,
}

/// Prompt chunk of the mixed-step measurement (the engine's default chunk).
pub const MIXED_CHUNK: usize = 512;

/// Untimed steps before each timed decode run.
const DECODE_WARMUP: usize = 3;

#[derive(Debug, Clone, Serialize)]
pub struct DecodePoint {
    pub batch: usize,
    /// A step with its logits back on the host (what the host's sampler needs).
    pub step_seconds: f64,
    /// A step whose greedy tokens are picked on the GPU (only the ids come back).
    pub greedy_step_seconds: f64,
    pub tokens_per_second: f64,
    /// Weights plus the KV read by attention, per step.
    pub bytes_per_step: f64,
    /// Weight bytes a step reads over the step time, as a fraction of the copy traffic.
    pub weight_roofline_fraction: f64,
    /// All bytes per step over the step time, as a fraction of the copy traffic.
    pub memory_roofline_fraction: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PrefillPoint {
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub flops: f64,
    /// FLOP/s over the bf16 GEMM rate measured in the same run (a burst).
    pub gemm_roofline_fraction: f64,
    /// FLOP/s over the sustained bf16 GEMM rate of the same run.
    pub sustained_gemm_fraction: f64,
}

/// One step that carries decodes and prompt chunks together (what a loaded server
/// runs), against the same work as two separate steps; greedy tokens picked on the GPU.
#[derive(Debug, Clone, Serialize)]
pub struct MixedPoint {
    pub decodes: usize,
    pub prefill_tokens: usize,
    pub chunk_tokens: usize,
    pub seconds: f64,
    /// The decodes alone (a graph replay) and the prompt chunks alone.
    pub decode_seconds: f64,
    pub prefill_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HandoffPoint {
    /// `device` (one kernel, GPU memory to GPU memory) or `host` (staged through pinned
    /// host memory, as between hosts).
    pub path: &'static str,
    pub bytes: usize,
    pub seconds: f64,
    pub bytes_per_second: f64,
    /// Over the device-to-device copy bandwidth (bytes copied per second).
    pub copy_fraction: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub weight_dtype: &'static str,
    /// The layers' matrices: "none" (the weight type) or "fp8".
    pub quantization: &'static str,
    pub gpu: String,
    pub weight_bytes: usize,
    /// Weight bytes one decode step reads (all but an untied embedding table).
    pub decode_weight_bytes: usize,
    pub kv_bytes_per_token: usize,
    /// Device-to-device copy: bytes copied per second, and read + write traffic.
    pub copy_bytes_per_second: f64,
    pub copy_traffic_bytes_per_second: f64,
    pub bf16_gemm_flops: f64,
    pub bf16_gemm_sustained_flops: f64,
    pub cuda_graphs: bool,
    pub decode: Vec<DecodePoint>,
    pub mixed: Option<MixedPoint>,
    pub prefill: Vec<PrefillPoint>,
    pub handoff: Vec<HandoffPoint>,
}

/// Runs `plan` on `model`'s GPU.
pub fn run(model: Arc<CudaModel>, plan: &BenchPlan) -> Result<BenchReport, BenchError> {
    let gpu = model.gpu.clone();
    let ordinal = gpu.ctx.ordinal();
    let ceilings = limits::measure(&Probe {
        ordinal,
        copy_bytes: 1 << 30,
        gemm_size: 8192,
        repeats: 5,
    })?;
    let c = model.config.clone();
    let layout = model.kv_layout(KvOptions::default());
    let kv_per_token = layout.bytes_per_block() / layout.block_size;
    let longest_prefill = plan.prefill_lengths.iter().copied().max().unwrap_or(0);
    let max_batch = plan.decode_batches.iter().copied().max().unwrap_or(1);
    // Each decoding sequence runs its steps twice (logits back, greedy ids back), then
    // the mixed steps.
    let decode_len = plan.decode_context + 2 * (DECODE_WARMUP + plan.decode_steps) + 1;
    let mixed_chunks = plan.mixed_prefill_tokens.div_ceil(MIXED_CHUNK);
    let max_model_len = (decode_len + 16)
        .max(longest_prefill)
        .max(plan.handoff_tokens)
        + 16;
    let tokens_needed = max_batch * (decode_len + 32)
        + mixed_chunks * (MIXED_CHUNK + 16)
        + 2 * longest_prefill
        + plan.handoff_tokens;
    let budget = KvBudget::Bytes(
        (layout.blocks_for(tokens_needed) + 2 * max_batch + 8) * layout.bytes_per_block(),
    );
    let mut runner = GpuRunner::new(
        model.clone(),
        layout,
        budget,
        RunnerLimits {
            max_tokens: longest_prefill
                .max(plan.decode_context)
                .max(max_batch + plan.mixed_prefill_tokens)
                .max(2048),
            max_seqs: max_batch + mixed_chunks,
            max_model_len,
            cuda_graphs: plan.cuda_graphs,
        },
    )?;
    let weight_bytes = model.weights.matrix_bytes;
    // A decode step gathers one embedding row per token: an untied embedding table is
    // not read, the output head is.
    let untied_embedding = if model.weights.lm_head.is_some() {
        2 * c.vocab_size * c.hidden_size
    } else {
        0
    };
    let step_weight_bytes = weight_bytes - untied_embedding;
    let traffic = 2.0 * ceilings.dtod_bytes_per_second;
    let mut blocks = BlockIds::default();

    let mut decode = Vec::new();
    let mut mixed = None;
    for &batch in &plan.decode_batches {
        let tables: Vec<Vec<BlockId>> = (0..batch)
            .map(|_| blocks.take(layout.blocks_for(decode_len + 8)))
            .collect();
        // Prefill the batch's prompts, a few at a time.
        let prompt = pseudo_tokens(plan.decode_context, 1, c.vocab_size);
        for group in tables.chunks((2048 / plan.decode_context.max(1)).max(1)) {
            runner.forward(&same_tokens(group, &prompt, 0))?;
        }
        let run = DECODE_WARMUP + plan.decode_steps;
        let step = time_decode(
            &mut runner,
            &tables,
            plan.decode_context,
            run,
            Output::Logits,
        )?;
        let greedy_step = time_decode(
            &mut runner,
            &tables,
            plan.decode_context + run,
            run,
            Output::GreedyIds,
        )?;
        // The KV the timed logits-back steps read, on average.
        let context = plan.decode_context + DECODE_WARMUP + plan.decode_steps / 2;
        if batch == max_batch && mixed_chunks > 0 {
            mixed = Some(time_mixed(
                &mut runner,
                &tables,
                plan.decode_context + 2 * run,
                plan.mixed_prefill_tokens,
                &mut blocks,
            )?);
        }
        let kv_read = (batch * context * kv_per_token) as f64;
        decode.push(DecodePoint {
            batch,
            step_seconds: step,
            greedy_step_seconds: greedy_step,
            tokens_per_second: batch as f64 / step,
            bytes_per_step: step_weight_bytes as f64 + kv_read,
            weight_roofline_fraction: step_weight_bytes as f64 / step / traffic,
            memory_roofline_fraction: (step_weight_bytes as f64 + kv_read) / step / traffic,
        });
        blocks.reset();
    }

    let mut prefill = Vec::new();
    for &tokens in &plan.prefill_lengths {
        let prompt = pseudo_tokens(tokens, 2, c.vocab_size);
        let mut best = f64::MAX;
        for _ in 0..3 {
            let table = blocks.take(layout.blocks_for(tokens));
            let started = Instant::now();
            runner.forward(&[SeqInput {
                tokens: &prompt,
                start_pos: 0,
                block_table: &table,
                logits: LogitsFor::Last,
            }])?;
            best = best.min(started.elapsed().as_secs_f64());
            blocks.reset();
        }
        let t = tokens as f64;
        let matmul_params = (c.num_layers
            * (c.hidden_size * (2 * c.q_dim() + 2 * c.kv_dim())
                + 3 * c.hidden_size * c.intermediate_size)
            + c.vocab_size * c.hidden_size / tokens.max(1)) as f64;
        // Causal attention: QKᵀ and PV over half the square, per head and layer.
        let attention = 2.0 * t * t * (c.head_dim * c.num_heads * c.num_layers) as f64;
        let flops = 2.0 * matmul_params * t + attention;
        prefill.push(PrefillPoint {
            tokens,
            seconds: best,
            tokens_per_second: t / best,
            flops,
            gemm_roofline_fraction: flops / best / ceilings.bf16_gemm_flops,
            sustained_gemm_fraction: flops / best / ceilings.bf16_gemm_sustained_flops,
        });
    }

    let handoff = measure_handoff(
        &model,
        &mut runner,
        plan,
        &mut blocks,
        ceilings.dtod_bytes_per_second,
    )?;

    Ok(BenchReport {
        model: c.name.clone(),
        weight_dtype: gpu.weight_dtype.name(),
        quantization: model.weights.quantization.name(),
        gpu: ceilings.name.clone(),
        weight_bytes,
        decode_weight_bytes: step_weight_bytes,
        kv_bytes_per_token: kv_per_token,
        copy_bytes_per_second: ceilings.dtod_bytes_per_second,
        copy_traffic_bytes_per_second: traffic,
        bf16_gemm_flops: ceilings.bf16_gemm_flops,
        bf16_gemm_sustained_flops: ceilings.bf16_gemm_sustained_flops,
        cuda_graphs: plan.cuda_graphs,
        decode,
        mixed,
        prefill,
        handoff,
    })
}

/// What the timed steps bring back.
#[derive(Clone, Copy)]
enum Output {
    Logits,
    GreedyIds,
}

/// Seconds per decode step of every sequence of `tables` (their prompts computed),
/// over `steps` steps from position `from`, the first [`DECODE_WARMUP`] untimed.
fn time_decode(
    runner: &mut GpuRunner,
    tables: &[Vec<BlockId>],
    from: usize,
    steps: usize,
    output: Output,
) -> Result<f64, BenchError> {
    let vocab = runner.config().vocab_size;
    let mut started = Instant::now();
    for step in 0..steps {
        if step == DECODE_WARMUP {
            started = Instant::now();
        }
        let token = [((step * 7919) % vocab) as u32];
        let inputs = same_tokens(tables, &token, from + step);
        match output {
            Output::Logits => drop(runner.forward(&inputs)?),
            Output::GreedyIds => drop(runner.forward_greedy(&inputs)?),
        }
    }
    Ok(started.elapsed().as_secs_f64() / (steps - DECODE_WARMUP) as f64)
}

/// One step of a decode per table at position `at` plus `prefill_tokens` of new
/// prompts in [`MIXED_CHUNK`] chunks, against the decodes and the chunks as separate
/// steps (best of five each; every run rewrites the same cache slots).
fn time_mixed(
    runner: &mut GpuRunner,
    tables: &[Vec<BlockId>],
    at: usize,
    prefill_tokens: usize,
    blocks: &mut BlockIds,
) -> Result<MixedPoint, BenchError> {
    let vocab = runner.config().vocab_size;
    let layout = runner.kv().layout();
    let chunk = MIXED_CHUNK.min(prefill_tokens);
    let prompt = pseudo_tokens(chunk, 4, vocab);
    let prompt_tables: Vec<Vec<BlockId>> = (0..prefill_tokens.div_ceil(chunk))
        .map(|_| blocks.take(layout.blocks_for(chunk)))
        .collect();
    let token = [17u32];
    let decodes = same_tokens(tables, &token, at);
    let prompts = same_tokens(&prompt_tables, &prompt, 0);
    let both: Vec<SeqInput> = decodes.iter().chain(&prompts).cloned().collect();
    let mut time = |batch: &[SeqInput]| {
        best_wall_seconds(5, || {
            runner.forward_greedy(batch)?;
            Ok(())
        })
    };
    Ok(MixedPoint {
        decodes: tables.len(),
        prefill_tokens: prompts.len() * chunk,
        chunk_tokens: chunk,
        seconds: time(&both)?,
        decode_seconds: time(&decodes)?,
        prefill_seconds: time(&prompts)?,
    })
}

/// Prefills a prompt in `runner`'s cache and copies its blocks into a second cache on
/// the same GPU: in one kernel (what a hand-off between GPUs of one host does), and
/// through pinned host memory (what one between hosts does, minus the network).
fn measure_handoff(
    model: &Arc<CudaModel>,
    runner: &mut GpuRunner,
    plan: &BenchPlan,
    blocks: &mut BlockIds,
    copy_bytes_per_second: f64,
) -> Result<Vec<HandoffPoint>, BenchError> {
    if plan.handoff_tokens == 0 {
        return Ok(Vec::new());
    }
    let layout = runner.kv().layout();
    let count = layout.blocks_for(plan.handoff_tokens);
    let source: Vec<BlockId> = blocks.take(count);
    let prompt = pseudo_tokens(plan.handoff_tokens, 3, model.config.vocab_size);
    for (i, chunk) in prompt.chunks(2048).enumerate() {
        runner.forward(&[SeqInput {
            tokens: chunk,
            start_pos: i * 2048,
            block_table: &source,
            logits: LogitsFor::Last,
        }])?;
    }
    let target = Arc::new(super::DeviceKv::new(model.gpu.clone(), layout, count + 1)?);
    let destination: Vec<BlockId> = (0..count as BlockId).rev().collect();
    let bytes = count * layout.bytes_per_block();
    let point = |path, seconds| HandoffPoint {
        path,
        bytes,
        seconds,
        bytes_per_second: bytes as f64 / seconds,
        copy_fraction: bytes as f64 / seconds / copy_bytes_per_second,
    };
    let device = best_wall_seconds(5, || {
        // SAFETY: both caches live; nothing else touches these blocks.
        unsafe { target.copy_from_peer(runner.kv().base(), &source, &destination) }?;
        Ok(())
    })?;
    // Through pinned staging buffers, a buffer's worth of blocks at a time, as the
    // hand-off's sockets are fed (the network itself left out).
    let per_block = layout.bytes_per_block();
    let host = best_wall_seconds(3, || {
        let mut staging = runner.kv().staging()?;
        let per_chunk = staging.blocks(per_block);
        for (from, to) in source.chunks(per_chunk).zip(destination.chunks(per_chunk)) {
            let bytes = &mut staging.as_mut_slice()[..from.len() * per_block];
            // SAFETY: as above.
            unsafe {
                runner.kv().read_blocks(from, bytes)?;
                target.write_blocks(to, bytes)?;
            }
        }
        Ok(())
    })?;
    blocks.reset();
    Ok(vec![point("device", device), point("host", host)])
}

/// One sequence per block table, each computing `tokens` from `start_pos`, the last
/// position's logits asked for.
fn same_tokens<'a>(
    tables: &'a [Vec<BlockId>],
    tokens: &'a [u32],
    start_pos: usize,
) -> Vec<SeqInput<'a>> {
    tables
        .iter()
        .map(|table| SeqInput {
            tokens,
            start_pos,
            block_table: table,
            logits: LogitsFor::Last,
        })
        .collect()
}

/// Best wall-clock seconds of `runs` runs of `work`.
fn best_wall_seconds(
    runs: usize,
    mut work: impl FnMut() -> Result<(), BenchError>,
) -> Result<f64, BenchError> {
    let mut best = f64::MAX;
    for _ in 0..runs {
        let started = Instant::now();
        work()?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Hands out block ids from 0 up (the bench owns the whole cache).
#[derive(Default)]
struct BlockIds {
    next: BlockId,
}

impl BlockIds {
    fn take(&mut self, n: usize) -> Vec<BlockId> {
        let ids = (self.next..self.next + n as BlockId).collect();
        self.next += n as BlockId;
        ids
    }

    fn reset(&mut self) {
        self.next = 0;
    }
}

fn pseudo_tokens(n: usize, salt: u32, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(salt * 7919) >> 5) % vocab as u32)
        .collect()
}
