//! The Llama forward pass on a GPU, for the engine loop: the same ragged batches as the
//! CPU pass ([`SeqInput`]), the KV cache in GPU memory ([`DeviceKv`]), logits back on
//! the host for the sampler — or, for steps where nothing reads the logits (no
//! logprobs, no grammar), only the token ids, picked on the GPU: the argmax for plain
//! greedy steps ([`GpuRunner::forward_greedy`]), otherwise each sequence's sampler's
//! draw replayed by the kernel `sample_rows` ([`GpuRunner::forward_sampled`]).
//!
//! A step is: the batch's metadata (token ids, positions, the block each new key goes
//! to, per-sequence rows and block tables, attention work items) written to pinned
//! host memory and copied in one go; then per layer RMSNorm → QKV product → RoPE and
//! KV store → paged attention → output product added to the residual → RMSNorm →
//! gate/up product (in the weight type: only SiLU·up reads it) → SiLU·up → down product
//! added to the residual; then the final norm and the output head for the rows that
//! need logits. The products are cuBLAS's, or for steps of a few tokens
//! [`super::gemv`]'s matrix–vector kernels (with SiLU·up folded into the gate/up pass).
//!
//! Pure decode steps (one new token per sequence) are replayed from CUDA graphs, one
//! per batch-size bucket, captured when the runner starts: a step is then one graph
//! launch instead of ~10 launches per layer. The rows past the real batch are padding: token
//! 0 at position 0, writing to the cache's padding block, attending only to itself.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::safe::CudaGraph;
use cudarc::driver::{result, sys};

use super::fp8::FP8_ALIGNMENT;
use super::gemv::{GEMV_MAX_TOKENS, MatrixRef, Products, gemv_from_env};
use super::gpu::{
    DeviceBuffer, Gpu, GpuError, Kernel, PinnedBuffer, ProductOut, WeightDtype, kernel_args,
};
use super::kv::DeviceKv;
use super::weights::{GpuWeights, LoadError};
use crate::error::ModelError;
use crate::exec::{Quantization, WeightFormat};
use crate::kv::{KvLayout, KvOptions};
use crate::model::config::{ModelConfig, RopeStyle};
use crate::model::dummy::{DummySource, Preset};
use crate::model::llama::check_batch;
use crate::model::source::{GgufSource, SafetensorsSource, TensorSource};
use crate::model::weights::TensorNames;
use crate::model::{ForwardError, LogitsFor, ModelFormat, SeqInput};
use crate::sample::{DeviceDraw, LogitAdjustment};

/// Keys per attention tile of the four-warp (prompt) kernel; the one-warp kernel takes half.
const KEY_TILE: usize = 64;
/// Most key splits of one attention row tile.
const MAX_SPLITS: usize = 16;
/// Decode batch sizes that get a CUDA graph; a batch runs in the smallest that fits.
const GRAPH_BUCKETS: &[usize] = &[
    1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256,
];

/// A model's weights on a GPU.
pub struct CudaModel {
    pub gpu: Arc<Gpu>,
    pub config: ModelConfig,
    pub weights: GpuWeights,
}

impl CudaModel {
    /// Loads a `.gguf` file or a Hugging Face folder onto GPU `ordinal`.
    pub fn load(path: &Path, ordinal: usize, format: WeightFormat) -> Result<Self, LoadError> {
        match ModelFormat::detect(path)? {
            ModelFormat::Gguf(file) => {
                let source = GgufSource::open(&file)?;
                let config = ModelConfig::from_gguf(&source.content, &file)?;
                let dtype = format.dtype.unwrap_or(super::weights::auto_dtype(true));
                let format = (dtype, format.quantization);
                Self::upload(ordinal, format, config, &source, &TensorNames::GGUF)
            }
            ModelFormat::HfDir(dir) => {
                let config_path = dir.join("config.json");
                let json = std::fs::read_to_string(&config_path)
                    .map_err(|e| ModelError::io(&config_path, e))?;
                let config = ModelConfig::from_hf_json(&json, &config_path)?;
                let source = SafetensorsSource::open(&crate::model::safetensors_shards(&dir)?)?;
                let dtype = format.dtype.unwrap_or(super::weights::auto_dtype(false));
                let format = (dtype, format.quantization);
                Self::upload(ordinal, format, config, &source, &TensorNames::HF)
            }
        }
    }

    /// A preset's shapes with random weights (`--load-format dummy`), as on the CPU.
    pub fn dummy(
        preset: &Preset,
        seed: u64,
        ordinal: usize,
        format: WeightFormat,
    ) -> Result<Self, LoadError> {
        let source = DummySource::new(preset, seed);
        let dtype = format.dtype.unwrap_or(super::weights::auto_dtype(false));
        let format = (dtype, format.quantization);
        Self::upload(ordinal, format, preset.config(), &source, &TensorNames::HF)
    }

    /// Opens the GPU and uploads `source`'s weights of `config`'s shapes.
    fn upload(
        ordinal: usize,
        (dtype, quantization): (WeightDtype, Quantization),
        config: ModelConfig,
        source: &(dyn TensorSource + Sync),
        names: &TensorNames,
    ) -> Result<Self, LoadError> {
        let gpu = open(ordinal, dtype, &config)?;
        if quantization == Quantization::Fp8 {
            check_fp8(&gpu, &config)?;
        }
        let weights = GpuWeights::load(&gpu, source, names, &config, quantization)?;
        Ok(Self {
            gpu,
            config,
            weights,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn kv_layout(&self, options: KvOptions) -> KvLayout {
        KvLayout::for_model(&self.config, options)
    }
}

/// Whether this GPU and these shapes can take FP8 weights: tensor cores with E4M3
/// (compute capability 8.9 or newer) and matrix sides in whole 16-byte rows.
fn check_fp8(gpu: &Gpu, config: &ModelConfig) -> Result<(), GpuError> {
    let (major, minor) = gpu.ctx.compute_capability()?;
    if (major, minor) < (8, 9) {
        return Err(GpuError::Unsupported(format!(
            "FP8 weights on compute capability {major}.{minor} (8.9 or newer: Ada, Hopper, \
             Blackwell)"
        )));
    }
    let sides = [
        ("hidden size", config.hidden_size),
        ("query width", config.q_dim()),
        ("KV width", config.kv_dim()),
        ("intermediate size", config.intermediate_size),
    ];
    for (what, value) in sides {
        if !value.is_multiple_of(FP8_ALIGNMENT) {
            return Err(GpuError::Unsupported(format!(
                "FP8 weights with a {what} of {value} (a multiple of {FP8_ALIGNMENT} is needed)"
            )));
        }
    }
    Ok(())
}

fn open(ordinal: usize, dtype: WeightDtype, config: &ModelConfig) -> Result<Arc<Gpu>, LoadError> {
    if !matches!(config.head_dim, 64 | 128) {
        return Err(GpuError::Unsupported(format!(
            "head dimension {} (64 and 128 are)",
            config.head_dim
        ))
        .into());
    }
    if !config.num_heads.is_multiple_of(config.num_kv_heads) || config.group_size() > 64 {
        return Err(GpuError::Unsupported(format!(
            "{} query heads over {} KV heads",
            config.num_heads, config.num_kv_heads
        ))
        .into());
    }
    Ok(Arc::new(Gpu::open(ordinal, dtype)?))
}

/// How big the runner's buffers are.
#[derive(Debug, Clone, Copy)]
pub struct RunnerLimits {
    /// Most tokens in one forward pass.
    pub max_tokens: usize,
    /// Most sequences in one forward pass.
    pub max_seqs: usize,
    /// Longest sequence (bounds the block tables).
    pub max_model_len: usize,
    /// Capture decode steps into CUDA graphs (off: every step launches its kernels).
    pub cuda_graphs: bool,
}

/// Offsets (in i32 units) of the metadata sections, at fixed places so that captured
/// graphs read the current step's values.
#[derive(Debug, Clone, Copy)]
struct MetaLayout {
    /// Capacities of the block-table and work-item sections.
    table_capacity: usize,
    work_capacity: usize,
    tokens: usize,
    positions: usize,
    kv_blocks: usize,
    seq_info: usize,
    work: usize,
    tables: usize,
    logit_rows: usize,
    total: usize,
}

impl MetaLayout {
    fn new(tokens: usize, seqs: usize, work: usize, table: usize, logit_rows: usize) -> Self {
        let mut at = 0;
        let mut take = |len: usize| {
            let start = at;
            at += len.div_ceil(4) * 4;
            start
        };
        let tokens_at = take(tokens);
        let positions = take(tokens);
        let kv_blocks = take(tokens);
        let seq_info = take(4 * seqs);
        let work_at = take(2 * work);
        let tables = take(table);
        let logit_rows_at = take(logit_rows);
        Self {
            table_capacity: table,
            work_capacity: work,
            tokens: tokens_at,
            positions,
            kv_blocks,
            seq_info,
            work: work_at,
            tables,
            logit_rows: logit_rows_at,
            total: at,
        }
    }
}

/// What a step brings back to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    /// The logits of every requested row, for the host's sampler.
    Logits,
    /// Each requested row's greedy token id, picked on the GPU.
    GreedyIds,
    /// Each requested row's token, sampled on the GPU as its staged draw says
    /// ([`GpuRunner::forward_sampled`]).
    SampledIds,
}

/// One row's draw as the kernel `sample_rows` reads it (`DrawParams` in kernels.cu).
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct DrawParams {
    temperature: f32,
    top_k: i32,
    top_p: f32,
    min_p: f32,
    uniform: f32,
    adjust_start: i32,
    adjust_count: i32,
    unused: i32,
}

/// `TANDEM_GPU_SAMPLING`: `device` (the default) lets steps whose logits nobody reads
/// pick their tokens on the GPU; `host` brings every row's logits back to the host's
/// sampler, for comparing the two and for bug reports.
fn sampling_on_device() -> Result<bool, GpuError> {
    match std::env::var("TANDEM_GPU_SAMPLING").as_deref() {
        Err(_) | Ok("device") => Ok(true),
        Ok("host") => Ok(false),
        Ok(other) => Err(GpuError::Unsupported(format!(
            "TANDEM_GPU_SAMPLING={other}: use device or host"
        ))),
    }
}

/// The shape of one step's launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StepShape {
    /// Rows (tokens) through the layers.
    tokens: usize,
    /// Attention thread blocks along x, warps per block, key splits.
    work_items: usize,
    warps: usize,
    splits: usize,
}

/// Filled-in metadata lengths of one step (what to copy).
#[derive(Debug, Default, Clone, Copy)]
struct MetaFill {
    tokens: usize,
    seqs: usize,
    work: usize,
    table: usize,
    logit_rows: usize,
}

struct Buffers {
    meta: DeviceBuffer,
    x: DeviceBuffer,
    normed: DeviceBuffer,
    qkv: DeviceBuffer,
    q: DeviceBuffer,
    attn: DeviceBuffer,
    gate_up: DeviceBuffer,
    act: DeviceBuffer,
    head_in: DeviceBuffer,
    logits: DeviceBuffer,
    part_o: DeviceBuffer,
    part_ml: DeviceBuffer,
    /// Greedy token ids, one per logits row.
    ids: DeviceBuffer,
    /// The staged draws of a sampled step, one per logits row.
    draws: DeviceBuffer,
    /// Their logit adjustments (grown to the largest step's).
    adjustments: DeviceBuffer,
}

struct Kernels {
    embed: Kernel,
    rms_norm: Kernel,
    rope_store: Kernel,
    silu_mul: Kernel,
    attn_combine: Kernel,
    argmax_rows: Kernel,
    sample_rows: Kernel,
    /// Decode-sized row tiles (16 rows): one warp per block, keys in tiles of 32.
    attention_w1: Kernel,
    /// Prompt tiles of 64 rows: four warps, keys in tiles of 64.
    attention_w4: Kernel,
}

/// Captured decode steps by bucket.
struct Graphs(HashMap<usize, CudaGraph>);

// SAFETY: graphs are only used by whoever owns the runner, one thread at a time: they
// are captured on the thread that makes the runner, which then moves (once) to the
// engine loop's thread and replays them there. CUDA graphs may be used from any thread
// when calls are not concurrent.
unsafe impl Send for Graphs {}

/// How much GPU memory the KV cache gets.
#[derive(Debug, Clone, Copy)]
pub enum KvBudget {
    /// Exactly this many bytes.
    Bytes(usize),
    /// What is left of this fraction of the GPU's memory after the weights and the
    /// activation buffers (vLLM's `--gpu-memory-utilization`).
    Fraction(f32),
}

/// Memory kept free for cuBLAS, CUDA graphs and the driver.
const RESERVE_BYTES: usize = 512 << 20;

/// Runs forward passes of a [`CudaModel`] over its KV cache.
pub struct GpuRunner {
    model: Arc<CudaModel>,
    kv: Arc<DeviceKv>,
    limits: RunnerLimits,
    meta_layout: MetaLayout,
    /// Capacity of rows in the split-attention partials.
    split_rows: usize,
    /// Capacity of logits rows per output-head pass.
    logit_capacity: usize,
    buffers: Buffers,
    kernels: Kernels,
    /// Who runs the matrix products (matrix–vector kernels for small steps, cuBLAS).
    products: Products,
    meta_host: PinnedBuffer<i32>,
    logits_host: PinnedBuffer<f32>,
    /// Logits of steps that ask for more rows than `logit_capacity`.
    logits_overflow: Vec<f32>,
    /// The greedy token ids of the last [`GpuRunner::forward_greedy`].
    ids_host: PinnedBuffer<u32>,
    /// Whether the engine loop should let steps pick their tokens here.
    sampling_on_device: bool,
    graphs: Graphs,
    /// Rows of logits the last forward pass produced.
    last_rows: usize,
}

impl GpuRunner {
    /// Allocates the activation buffers, then the KV cache (`layout`) from `budget`.
    pub fn new(
        model: Arc<CudaModel>,
        layout: KvLayout,
        budget: KvBudget,
        limits: RunnerLimits,
    ) -> Result<Self, GpuError> {
        let c = model.config.clone();
        let gpu = model.gpu.clone();
        let max_tokens = limits
            .max_tokens
            .max(limits.max_seqs.min(*GRAPH_BUCKETS.last().expect("buckets")))
            .max(1);
        let max_seqs = limits.max_seqs.clamp(1, max_tokens);
        let blocks_per_seq = layout.blocks_for(limits.max_model_len) + 1;
        // Each sequence's rows (tokens × group) in tiles of at least 16 rows.
        let work = max_tokens * c.group_size() / 16 + 2 * max_seqs + 1;
        let table = max_seqs * blocks_per_seq + 1;
        let logit_capacity = max_seqs.max(64).min(max_tokens);
        let meta_layout = MetaLayout::new(max_tokens, max_seqs, work, table, max_tokens);
        let split_rows = MAX_SPLITS * max_seqs.min(256);
        let w = 2; // bytes per weight-type element
        let (d, q_dim, kv_dim, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let t = max_tokens;
        let sizes = [
            4 * meta_layout.total,
            4 * t * d,
            w * t * d,
            4 * t * (q_dim + 2 * kv_dim),
            2 * t * q_dim,
            w * t * q_dim,
            w * t * 2 * inter,
            w * t * inter,
            w * logit_capacity * d,
            4 * logit_capacity * c.vocab_size,
            4 * split_rows * c.num_heads * c.head_dim,
            4 * split_rows * c.num_heads * 2,
            4 * max_tokens,
            std::mem::size_of::<DrawParams>() * max_tokens,
        ];
        let needed: usize = sizes.iter().sum();
        let (free, _) = gpu.free_memory()?;
        if needed > free {
            return Err(GpuError::OutOfMemory {
                what: "the activation buffers",
                needed,
                available: free,
            });
        }
        let alloc = |bytes: usize| DeviceBuffer::zeroed(&gpu.ctx, bytes);
        let buffers = Buffers {
            meta: alloc(sizes[0])?,
            x: alloc(sizes[1])?,
            normed: alloc(sizes[2])?,
            qkv: alloc(sizes[3])?,
            q: alloc(sizes[4])?,
            attn: alloc(sizes[5])?,
            gate_up: alloc(sizes[6])?,
            act: alloc(sizes[7])?,
            head_in: alloc(sizes[8])?,
            logits: alloc(sizes[9])?,
            part_o: alloc(sizes[10])?,
            part_ml: alloc(sizes[11])?,
            ids: alloc(sizes[12])?,
            draws: alloc(sizes[13])?,
            adjustments: alloc(0)?,
        };
        let kernels = load_kernels(&gpu, c.head_dim)?;
        let mut products = Products::new(&gpu, gemv_from_env()?)?;
        if model.weights.quantization == Quantization::Fp8 {
            products = products.with_fp8(&gpu, max_tokens, d.max(q_dim).max(inter))?;
        }
        if products.gemv_enabled() {
            tracing::info!(
                "GPU products: matrix-vector kernels for steps of up to {GEMV_MAX_TOKENS} \
                 tokens, cuBLAS above"
            );
        } else {
            tracing::info!("GPU products: cuBLAS for every step (TANDEM_GPU_GEMV=off)");
        }
        let ours = model.weights.matrix_bytes
            + needed
            + super::gpu::BLAS_WORKSPACE_BYTES
            + products.device_bytes();
        let kv_bytes = kv_bytes(&gpu, budget, ours)?;
        let kv = Arc::new(DeviceKv::new(
            gpu.clone(),
            layout,
            kv_bytes / layout.bytes_per_block(),
        )?);
        let meta_host = PinnedBuffer::new(&gpu.ctx, meta_layout.total)?;
        let logits_host = PinnedBuffer::new(&gpu.ctx, logit_capacity * c.vocab_size)?;
        let ids_host = PinnedBuffer::new(&gpu.ctx, max_tokens)?;
        let mut runner = Self {
            model,
            kv,
            limits: RunnerLimits {
                max_tokens,
                max_seqs,
                ..limits
            },
            meta_layout,
            split_rows,
            logit_capacity,
            buffers,
            kernels,
            products,
            meta_host,
            logits_host,
            logits_overflow: Vec::new(),
            ids_host,
            sampling_on_device: sampling_on_device()?,
            graphs: Graphs(HashMap::new()),
            last_rows: 0,
        };
        if runner.limits.cuda_graphs {
            runner.model.gpu.bind()?;
            runner.capture_all()?;
        }
        Ok(runner)
    }

    pub fn kv(&self) -> &Arc<DeviceKv> {
        &self.kv
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    /// Runs the batch and returns the logits asked for: one `vocab_size` row per
    /// requested position, in batch order (as [`crate::model::Llama::forward`]).
    pub fn forward(&mut self, batch: &[SeqInput]) -> Result<&[f32], ForwardError> {
        self.run(batch, Output::Logits)?;
        Ok(self.last_logits())
    }

    /// Runs the batch and returns, for every requested position, the token a greedy
    /// sampler picks from its logits (the host sampler's argmax: the first index on
    /// ties, NaN skipped), computed on the GPU: only the ids come back, not the logits
    /// (33 MB a step at 64 sequences of a 128k vocabulary).
    pub fn forward_greedy(&mut self, batch: &[SeqInput]) -> Result<&[u32], ForwardError> {
        self.run(batch, Output::GreedyIds)?;
        Ok(&self.ids_host.as_slice()[..self.last_rows])
    }

    /// Runs the batch and returns, for every requested position, the token its
    /// sampler's draw (`draws`, one per requested position in batch order) picks —
    /// adjustments, temperature, top-k, min-p and top-p applied on the GPU by the
    /// kernel `sample_rows`, the host sampler's rules — so only the ids come back.
    pub fn forward_sampled(
        &mut self,
        batch: &[SeqInput],
        draws: &[DeviceDraw],
    ) -> Result<&[u32], ForwardError> {
        if draws.iter().all(DeviceDraw::is_plain_greedy) {
            return self.forward_greedy(batch);
        }
        let rows: usize = batch
            .iter()
            .map(|s| match s.logits {
                LogitsFor::None => 0,
                LogitsFor::Last => 1,
                LogitsFor::All => s.tokens.len(),
            })
            .sum();
        if rows != draws.len() {
            return Err(ForwardError::Device(format!(
                "{} draws for {rows} rows of logits",
                draws.len()
            )));
        }
        self.stage_draws(draws)
            .map_err(|e| ForwardError::Device(e.to_string()))?;
        self.run(batch, Output::SampledIds)?;
        Ok(&self.ids_host.as_slice()[..self.last_rows])
    }

    /// The tokens the GPU samples from these rows of logits (`vocab_size` each, at most
    /// a step's rows) with these draws: the kernel [`Self::forward_sampled`] runs after
    /// the output head, for checking it against the host's sampler.
    pub fn sample_rows(
        &mut self,
        logits: &[f32],
        draws: &[DeviceDraw],
    ) -> Result<Vec<u32>, GpuError> {
        let vocab = self.model.config.vocab_size;
        let rows = logits.len() / vocab;
        if rows * vocab != logits.len() || rows > self.logit_capacity || rows != draws.len() {
            return Err(GpuError::Unsupported(format!(
                "{} logits and {} draws are not up to {} rows of {vocab}",
                logits.len(),
                draws.len(),
                self.logit_capacity
            )));
        }
        self.model.gpu.bind()?;
        self.buffers.logits.upload(0, logits)?;
        self.stage_draws(draws)?;
        self.enqueue_pick(0, rows, Output::SampledIds)?;
        self.download_ids(rows)?;
        Ok(self.ids_host.as_slice()[..rows].to_vec())
    }

    /// Uploads `draws` (one per logits row of the coming step) and their adjustments.
    fn stage_draws(&mut self, draws: &[DeviceDraw]) -> Result<(), GpuError> {
        let mut params = Vec::with_capacity(draws.len());
        let mut adjustments: Vec<LogitAdjustment> = Vec::new();
        for draw in draws {
            let count = i32::try_from(draw.adjustments.len()).map_err(|_| {
                GpuError::Unsupported("more than 2^31 logit adjustments in a row".into())
            })?;
            params.push(DrawParams {
                temperature: draw.temperature,
                top_k: i32::try_from(draw.top_k).unwrap_or(i32::MAX),
                top_p: draw.top_p,
                min_p: draw.min_p,
                uniform: draw.uniform,
                adjust_start: adjustments.len() as i32,
                adjust_count: count,
                unused: 0,
            });
            adjustments.extend_from_slice(&draw.adjustments);
        }
        if std::mem::size_of_val(params.as_slice()) > self.buffers.draws.bytes() {
            return Err(GpuError::Unsupported(format!(
                "{} draws exceed the step's rows",
                draws.len()
            )));
        }
        let adjustment_bytes = std::mem::size_of_val(adjustments.as_slice());
        if adjustment_bytes > self.buffers.adjustments.bytes() {
            // Grown to twice the need, so that a growing output grows it rarely.
            self.buffers.adjustments =
                DeviceBuffer::zeroed(&self.model.gpu.ctx, 2 * adjustment_bytes)?;
        }
        self.buffers.draws.upload(0, &params)?;
        self.buffers.adjustments.upload(0, &adjustments)
    }

    /// Whether the engine loop should pick greedy tokens with [`Self::forward_greedy`]
    /// and sample with [`Self::forward_sampled`] (on unless `TANDEM_GPU_SAMPLING=host`).
    pub fn samples_on_device(&self) -> bool {
        self.sampling_on_device
    }

    /// The greedy ids the GPU picks for these rows of logits (`vocab_size` each, at most
    /// as many rows as a decode step has), with the kernel [`Self::forward_greedy`]
    /// runs after the output head: for checking it against the host's argmax on chosen
    /// values (ties, NaN, -inf).
    pub fn argmax_rows(&mut self, logits: &[f32]) -> Result<Vec<u32>, GpuError> {
        let vocab = self.model.config.vocab_size;
        let rows = logits.len() / vocab;
        if rows * vocab != logits.len() || rows > self.logit_capacity {
            return Err(GpuError::Unsupported(format!(
                "{} logits are not up to {} rows of {vocab}",
                logits.len(),
                self.logit_capacity
            )));
        }
        self.model.gpu.bind()?;
        self.buffers.logits.upload(0, logits)?;
        self.enqueue_pick(0, rows, Output::GreedyIds)?;
        self.download_ids(rows)?;
        Ok(self.ids_host.as_slice()[..rows].to_vec())
    }

    fn run(&mut self, batch: &[SeqInput], output: Output) -> Result<(), ForwardError> {
        let layout = self.kv.layout();
        check_batch(&self.model.config, layout, self.kv.num_blocks(), batch)?;
        let n: usize = batch.iter().map(|s| s.tokens.len()).sum();
        if n > self.limits.max_tokens || batch.len() > self.limits.max_seqs {
            return Err(ForwardError::Device(format!(
                "a batch of {n} tokens in {} sequences exceeds the GPU buffers ({} tokens, {} sequences)",
                batch.len(),
                self.limits.max_tokens,
                self.limits.max_seqs
            )));
        }
        self.check_sections(batch)?;
        self.last_rows = 0;
        if batch.is_empty() {
            return Ok(());
        }
        self.model
            .gpu
            .bind()
            .map_err(|e| ForwardError::Device(e.to_string()))?;
        let result = if let Some(bucket) = self.graph_bucket(batch) {
            self.decode_with_graph(batch, bucket, output)
        } else {
            self.eager(batch, output)
        };
        match result {
            Ok(rows) => {
                self.last_rows = rows;
                Ok(())
            }
            Err(err) => Err(ForwardError::Device(err.to_string())),
        }
    }

    /// Refuses a batch whose block tables or attention work items would not fit the
    /// metadata buffer (sequences longer than the runner's `max_model_len`).
    fn check_sections(&self, batch: &[SeqInput]) -> Result<(), ForwardError> {
        let layout = self.kv.layout();
        let group = self.model.config.group_size();
        let longest = batch.iter().map(|s| s.tokens.len()).max().unwrap_or(1);
        let rows_per_tile = if longest * group > 16 { 64 } else { 16 };
        let table: usize = batch
            .iter()
            .map(|s| layout.blocks_for(s.start_pos + s.tokens.len()))
            .sum();
        let work: usize = batch
            .iter()
            .map(|s| (s.tokens.len() * group).div_ceil(rows_per_tile))
            .sum();
        let m = &self.meta_layout;
        if table + 1 > m.table_capacity || work > m.work_capacity {
            return Err(ForwardError::Device(format!(
                "a batch of {table} blocks and {work} attention tiles exceeds what the GPU \
                 runner was sized for (max_model_len {}, {} tables, {} tiles)",
                self.limits.max_model_len, m.table_capacity, m.work_capacity
            )));
        }
        Ok(())
    }

    /// The logits of the last forward pass.
    pub fn last_logits(&self) -> &[f32] {
        let vocab = self.model.config.vocab_size;
        let rows = self.last_rows;
        if rows <= self.logit_capacity {
            &self.logits_host.as_slice()[..rows * vocab]
        } else {
            &self.logits_overflow[..rows * vocab]
        }
    }

    /// The graph bucket a pure decode batch runs in, if any.
    fn graph_bucket(&self, batch: &[SeqInput]) -> Option<usize> {
        if !self.limits.cuda_graphs
            || !batch
                .iter()
                .all(|s| s.tokens.len() == 1 && s.logits == LogitsFor::Last)
        {
            return None;
        }
        GRAPH_BUCKETS
            .iter()
            .copied()
            .filter(|&b| b <= self.limits.max_seqs && b <= self.limits.max_tokens)
            .find(|&b| b >= batch.len())
    }

    /// Splits of the keys for decode-sized work: enough thread blocks to fill the GPU.
    fn decode_splits(&self, work_items: usize, rows: usize) -> usize {
        let blocks = work_items * self.model.config.num_kv_heads;
        let wanted = (2 * self.model.gpu.multiprocessors).div_ceil(blocks.max(1));
        wanted
            .clamp(1, MAX_SPLITS)
            .min(self.split_rows / rows.max(1))
            .max(1)
    }

    fn eager(&mut self, batch: &[SeqInput], output: Output) -> Result<usize, GpuError> {
        let (shape, fill) = self.plan(batch, None);
        self.upload_meta(fill)?;
        self.enqueue_layers(shape)?;
        let rows = fill.logit_rows;
        let overflows = rows > self.logit_capacity;
        if overflows && output == Output::Logits {
            let vocab = self.model.config.vocab_size;
            self.logits_overflow.resize(rows * vocab, 0.0);
        }
        // The output head runs on at most `logit_capacity` rows at a time.
        for start in (0..rows).step_by(self.logit_capacity) {
            let count = self.logit_capacity.min(rows - start);
            self.enqueue_head(start, count)?;
            match output {
                Output::Logits => self.download_logits(count, overflows.then_some(start))?,
                Output::GreedyIds | Output::SampledIds => {
                    self.enqueue_pick(start, count, output)?
                }
            }
        }
        match output {
            Output::GreedyIds | Output::SampledIds => self.download_ids(rows)?,
            Output::Logits if rows == 0 => self.model.gpu.synchronize()?,
            Output::Logits => {}
        }
        Ok(rows)
    }

    fn decode_with_graph(
        &mut self,
        batch: &[SeqInput],
        bucket: usize,
        output: Output,
    ) -> Result<usize, GpuError> {
        let (shape, fill) = self.plan(batch, Some(bucket));
        self.upload_meta(fill)?;
        if !self.graphs.0.contains_key(&bucket) {
            self.capture(bucket, shape)?;
        }
        self.graphs.0[&bucket].launch()?;
        let rows = batch.len();
        match output {
            Output::Logits => self.download_logits(rows, None)?,
            Output::GreedyIds | Output::SampledIds => {
                self.enqueue_pick(0, rows, output)?;
                self.download_ids(rows)?;
            }
        }
        Ok(rows)
    }

    /// Captures the decode step of `bucket` rows (its metadata already uploaded): once
    /// eagerly, so that cuBLAS picks and loads its kernels outside the capture, then
    /// into a graph.
    fn capture(&mut self, bucket: usize, shape: StepShape) -> Result<(), GpuError> {
        self.enqueue_layers(shape)?;
        self.enqueue_head_all(bucket)?;
        self.model.gpu.synchronize()?;
        let stream = &self.model.gpu.stream;
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let captured = self
            .enqueue_layers(shape)
            .and_then(|()| self.enqueue_head_all(bucket));
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0))?;
        captured?;
        let graph =
            graph.ok_or_else(|| GpuError::Unsupported("an empty CUDA graph capture".into()))?;
        graph.upload()?;
        self.graphs.0.insert(bucket, graph);
        Ok(())
    }

    /// Captures every decode bucket now, as vLLM does at start-up, so that no request
    /// waits for a capture. The steps run on padding rows only.
    fn capture_all(&mut self) -> Result<(), GpuError> {
        let started = std::time::Instant::now();
        let buckets: Vec<usize> = GRAPH_BUCKETS
            .iter()
            .copied()
            .filter(|&b| b <= self.limits.max_seqs && b <= self.limits.max_tokens)
            .collect();
        for &bucket in &buckets {
            let (shape, fill) = self.plan(&[], Some(bucket));
            self.upload_meta(fill)?;
            self.capture(bucket, shape)?;
        }
        self.model.gpu.synchronize()?;
        tracing::info!(
            graphs = buckets.len(),
            seconds = started.elapsed().as_secs_f64(),
            "captured the decode steps into CUDA graphs"
        );
        Ok(())
    }

    /// Writes the step's metadata to the pinned buffer; with `pad_to`, pads a decode
    /// batch to that many rows.
    fn plan(&mut self, batch: &[SeqInput], pad_to: Option<usize>) -> (StepShape, MetaFill) {
        let c = &self.model.config;
        let group = c.group_size();
        let block_size = self.kv.layout().block_size;
        let padding_block = self.kv.padding_block() as i32;
        let m = self.meta_layout;
        let meta = self.meta_host.as_mut_slice();
        let longest = batch.iter().map(|s| s.tokens.len()).max().unwrap_or(1);
        let warps = if longest * group > 16 { 4 } else { 1 };
        let rows_per_tile = 16 * warps;
        let (mut row, mut table, mut work, mut logit_rows) = (0usize, 0usize, 0usize, 0usize);
        for (s, seq) in batch.iter().enumerate() {
            let n = seq.tokens.len();
            for (i, &token) in seq.tokens.iter().enumerate() {
                let pos = seq.start_pos + i;
                meta[m.tokens + row + i] = token as i32;
                meta[m.positions + row + i] = pos as i32;
                meta[m.kv_blocks + row + i] = seq.block_table[pos / block_size] as i32;
            }
            let blocks = (seq.start_pos + n).div_ceil(block_size);
            meta[m.seq_info + 4 * s..m.seq_info + 4 * s + 4].copy_from_slice(&[
                row as i32,
                n as i32,
                seq.start_pos as i32,
                table as i32,
            ]);
            for (j, &b) in seq.block_table[..blocks].iter().enumerate() {
                meta[m.tables + table + j] = b as i32;
            }
            table += blocks;
            for tile in 0..(n * group).div_ceil(rows_per_tile) {
                meta[m.work + 2 * work] = s as i32;
                meta[m.work + 2 * work + 1] = tile as i32;
                work += 1;
            }
            match seq.logits {
                LogitsFor::None => {}
                LogitsFor::Last => {
                    meta[m.logit_rows + logit_rows] = (row + n - 1) as i32;
                    logit_rows += 1;
                }
                LogitsFor::All => {
                    for r in row..row + n {
                        meta[m.logit_rows + logit_rows] = r as i32;
                        logit_rows += 1;
                    }
                }
            }
            row += n;
        }
        let mut seqs = batch.len();
        if let Some(bucket) = pad_to {
            // Padding rows: token 0 at position 0 in the padding block.
            meta[m.tables + table] = padding_block;
            for s in batch.len()..bucket {
                meta[m.tokens + row] = 0;
                meta[m.positions + row] = 0;
                meta[m.kv_blocks + row] = padding_block;
                meta[m.seq_info + 4 * s..m.seq_info + 4 * s + 4].copy_from_slice(&[
                    row as i32,
                    1,
                    0,
                    table as i32,
                ]);
                meta[m.work + 2 * work] = s as i32;
                meta[m.work + 2 * work + 1] = 0;
                work += 1;
                row += 1;
            }
            table += 1;
            seqs = bucket;
        }
        let splits = if longest <= 4 {
            self.decode_splits(work, row)
        } else {
            1
        };
        let shape = StepShape {
            tokens: row,
            work_items: work,
            warps,
            splits,
        };
        let fill = MetaFill {
            tokens: row,
            seqs,
            work,
            table,
            // Padded decode steps take every row in order (no index list).
            logit_rows: if pad_to.is_some() { 0 } else { logit_rows },
        };
        (shape, fill)
    }

    /// Copies the filled metadata sections to the GPU (on the compute stream, so they
    /// land before the step's kernels read them).
    fn upload_meta(&self, fill: MetaFill) -> Result<(), GpuError> {
        let m = self.meta_layout;
        let sections = [
            (m.tokens, fill.tokens),
            (m.positions, fill.tokens),
            (m.kv_blocks, fill.tokens),
            (m.seq_info, 4 * fill.seqs),
            (m.work, 2 * fill.work),
            (m.tables, fill.table),
            (m.logit_rows, fill.logit_rows),
        ];
        let gpu = &self.model.gpu;
        gpu.bind()?;
        for (start, len) in sections {
            if len == 0 {
                continue;
            }
            let src = &self.meta_host.as_slice()[start..start + len];
            // SAFETY: in bounds of both buffers; the pinned buffer is only rewritten after
            // the step's synchronisation.
            unsafe {
                result::memcpy_htod_async(
                    self.buffers.meta.ptr() + 4 * start as u64,
                    src,
                    gpu.stream.cu_stream(),
                )
            }?;
        }
        Ok(())
    }

    fn meta_ptr(&self, offset: usize) -> sys::CUdeviceptr {
        self.buffers.meta.ptr() + 4 * offset as u64
    }

    /// Queues the embedding and every layer for `shape.tokens` rows.
    fn enqueue_layers(&self, shape: StepShape) -> Result<(), GpuError> {
        let c = &self.model.config;
        let gpu = &self.model.gpu;
        let w = &self.model.weights;
        let b = &self.buffers;
        let n = shape.tokens;
        let (d, q_dim, kv_dim, inter) = (
            c.hidden_size as i32,
            c.q_dim(),
            c.kv_dim(),
            c.intermediate_size,
        );
        let tokens = self.meta_ptr(self.meta_layout.tokens);
        let (embed_table, x) = (w.embed.ptr(), b.x.ptr());
        let mut args = kernel_args![embed_table, tokens, x, d];
        // SAFETY: every launch below passes the kernel's parameters in order, with
        // buffers sized for `max_tokens` rows (n ≤ max_tokens, checked by the caller).
        unsafe {
            gpu.launch(self.kernels.embed, (n as u32, 1, 1), 256, 0, &mut args)?;
            for (layer, lw) in w.layers.iter().enumerate() {
                self.rms_norm(b.x.ptr(), None, lw.attn_norm.ptr(), b.normed.ptr(), n)?;
                self.products.matmul(
                    gpu,
                    lw.qkv.as_ref(),
                    q_dim + 2 * kv_dim,
                    c.hidden_size,
                    b.normed.ptr(),
                    n,
                    b.qkv.ptr(),
                    ProductOut::F32,
                )?;
                self.rope_store(layer, n)?;
                self.attention(layer, shape)?;
                self.products.matmul(
                    gpu,
                    lw.attn_out.as_ref(),
                    c.hidden_size,
                    q_dim,
                    b.attn.ptr(),
                    n,
                    b.x.ptr(),
                    ProductOut::F32Accumulate,
                )?;
                self.rms_norm(b.x.ptr(), None, lw.ffn_norm.ptr(), b.normed.ptr(), n)?;
                let fused = self.products.gate_up_silu(
                    gpu,
                    lw.gate_up.as_ref(),
                    inter,
                    c.hidden_size,
                    b.normed.ptr(),
                    n,
                    b.act.ptr(),
                )?;
                if !fused {
                    self.products.matmul(
                        gpu,
                        lw.gate_up.as_ref(),
                        2 * inter,
                        c.hidden_size,
                        b.normed.ptr(),
                        n,
                        b.gate_up.ptr(),
                        ProductOut::WeightType,
                    )?;
                    self.silu_mul(n)?;
                }
                self.products.matmul(
                    gpu,
                    lw.down.as_ref(),
                    c.hidden_size,
                    inter,
                    b.act.ptr(),
                    n,
                    b.x.ptr(),
                    ProductOut::F32Accumulate,
                )?;
            }
        }
        Ok(())
    }

    /// `rows` output rows of RMSNorm(x[row index]) · w; the row indices come from the
    /// metadata at `rows_from` (`None`: rows 0, 1, …).
    unsafe fn rms_norm(
        &self,
        x: sys::CUdeviceptr,
        rows_from: Option<usize>,
        weight: sys::CUdeviceptr,
        out: sys::CUdeviceptr,
        rows: usize,
    ) -> Result<(), GpuError> {
        let c = &self.model.config;
        let row_index: sys::CUdeviceptr = rows_from.map_or(0, |at| self.meta_ptr(at));
        let (d, eps) = (c.hidden_size as i32, c.rms_norm_eps);
        let mut args = kernel_args![x, row_index, weight, out, d, eps];
        // SAFETY: the caller's promise on the buffers.
        unsafe {
            self.model.gpu.launch(
                self.kernels.rms_norm,
                (rows as u32, 1, 1),
                threads_for(c.hidden_size.div_ceil(4 * RMS_VECTORS)),
                0,
                &mut args,
            )
        }
    }

    unsafe fn rope_store(&self, layer: usize, n: usize) -> Result<(), GpuError> {
        let c = &self.model.config;
        let layout = self.kv.layout();
        let b = &self.buffers;
        let (qkv, q, kv) = (b.qkv.ptr(), b.q.ptr(), self.kv.base());
        let positions = self.meta_ptr(self.meta_layout.positions);
        let kv_blocks = self.meta_ptr(self.meta_layout.kv_blocks);
        let inv_freq = self.model.weights.inv_freq.ptr();
        let interleaved = i32::from(c.rope_style == RopeStyle::Interleaved);
        let (heads, kv_heads, head_dim) =
            (c.num_heads as i32, c.num_kv_heads as i32, c.head_dim as i32);
        let (layer, layers, block_size) =
            (layer as i32, c.num_layers as i32, layout.block_size as i32);
        // A thread per rotated pair (up to 1024): one token's chain of loads is short.
        let threads = threads_for((c.num_heads + c.num_kv_heads) * c.head_dim / 2);
        let mut args = kernel_args![
            qkv,
            positions,
            kv_blocks,
            inv_freq,
            q,
            kv,
            heads,
            kv_heads,
            head_dim,
            interleaved,
            layer,
            layers,
            block_size
        ];
        // SAFETY: the caller's promise on the buffers.
        unsafe {
            self.model.gpu.launch(
                self.kernels.rope_store,
                (n as u32, 1, 1),
                threads,
                0,
                &mut args,
            )
        }
    }

    unsafe fn attention(&self, layer: usize, shape: StepShape) -> Result<(), GpuError> {
        let c = &self.model.config;
        let layout = self.kv.layout();
        let b = &self.buffers;
        let splits = shape.splits;
        let (q, kv, out) = (b.q.ptr(), self.kv.base(), b.attn.ptr());
        let seq_info = self.meta_ptr(self.meta_layout.seq_info);
        let tables = self.meta_ptr(self.meta_layout.tables);
        let work = self.meta_ptr(self.meta_layout.work);
        let (part_o, part_ml) = (b.part_o.ptr(), b.part_ml.ptr());
        let n_rows = shape.tokens as i32;
        let (heads, kv_heads) = (c.num_heads as i32, c.num_kv_heads as i32);
        let (layer_i, layers, block_size) =
            (layer as i32, c.num_layers as i32, layout.block_size as i32);
        let scale = 1.0f32 / (c.head_dim as f32).sqrt();
        let mut args = kernel_args![
            q, kv, out, seq_info, tables, work, part_o, part_ml, n_rows, heads, kv_heads, layer_i,
            layers, block_size, scale
        ];
        let kernel = if shape.warps == 1 {
            self.kernels.attention_w1
        } else {
            self.kernels.attention_w4
        };
        let gpu = &self.model.gpu;
        // SAFETY: the caller's promise on the buffers; shared memory as the kernel lays it
        // out.
        unsafe {
            gpu.launch(
                kernel,
                (
                    shape.work_items as u32,
                    c.num_kv_heads as u32,
                    splits as u32,
                ),
                32 * shape.warps as u32,
                attention_shared_bytes(c.head_dim, shape.warps) as u32,
                &mut args,
            )?;
            if splits > 1 {
                let (head_dim, splits_i) = (c.head_dim as i32, splits as i32);
                let mut args =
                    kernel_args![part_o, part_ml, out, n_rows, heads, head_dim, splits_i];
                gpu.launch(
                    self.kernels.attn_combine,
                    (shape.tokens as u32, c.num_heads as u32, 1),
                    c.head_dim as u32,
                    0,
                    &mut args,
                )?;
            }
        }
        Ok(())
    }

    unsafe fn silu_mul(&self, n: usize) -> Result<(), GpuError> {
        let inter = self.model.config.intermediate_size;
        // Mirrors silu_mul in kernels.cu: 8 elements a thread where rows allow.
        let per_thread = if inter.is_multiple_of(8) { 8 } else { 1 };
        let (gate_up, act, inter_i, tokens) = (
            self.buffers.gate_up.ptr(),
            self.buffers.act.ptr(),
            inter as i32,
            n as i32,
        );
        let mut args = kernel_args![gate_up, act, inter_i, tokens];
        let blocks = (n * inter / per_thread).div_ceil(256).clamp(1, 4 * 1024) as u32;
        // SAFETY: the caller's promise on the buffers.
        unsafe {
            self.model
                .gpu
                .launch(self.kernels.silu_mul, (blocks, 1, 1), 256, 0, &mut args)
        }
    }

    /// Final norm and output head for logit rows `start..start + count` (row indices
    /// from the metadata) into the logits buffer.
    fn enqueue_head(&self, start: usize, count: usize) -> Result<(), GpuError> {
        self.enqueue_output_head(Some(self.meta_layout.logit_rows + start), count)
    }

    /// The output head for rows 0..rows in order (padded decode steps).
    fn enqueue_head_all(&self, rows: usize) -> Result<(), GpuError> {
        self.enqueue_output_head(None, rows)
    }

    /// Final norm of `count` rows (indices from the metadata at `rows_from`, or the
    /// first `count` rows) and the output head, into the logits buffer.
    fn enqueue_output_head(&self, rows_from: Option<usize>, count: usize) -> Result<(), GpuError> {
        if count == 0 {
            return Ok(());
        }
        let c = &self.model.config;
        let b = &self.buffers;
        // SAFETY: count ≤ logit_capacity (the callers' chunks, and graph buckets); the
        // indices point at rows this step computed.
        unsafe {
            self.rms_norm(
                b.x.ptr(),
                rows_from,
                self.model.weights.final_norm.ptr(),
                b.head_in.ptr(),
                count,
            )?;
            self.products.matmul(
                &self.model.gpu,
                MatrixRef::plain(self.model.weights.head().ptr()),
                c.vocab_size,
                c.hidden_size,
                b.head_in.ptr(),
                count,
                b.logits.ptr(),
                ProductOut::F32,
            )
        }
    }

    /// The picked ids of the `count` rows in the logits buffer (from row `start`), into
    /// the ids buffer at row `start`: their argmax, or with `Output::SampledIds` what
    /// their staged draws pick.
    fn enqueue_pick(&self, start: usize, count: usize, output: Output) -> Result<(), GpuError> {
        if count == 0 {
            return Ok(());
        }
        // The logits buffer holds the `count` rows of this head pass from its start.
        let logits = self.buffers.logits.ptr();
        let vocab = self.model.config.vocab_size as i32;
        let ids = self.buffers.ids.ptr() + 4 * start as u64;
        let grid = (count as u32, 1, 1);
        let gpu = &self.model.gpu;
        if output == Output::SampledIds {
            let draw_bytes = std::mem::size_of::<DrawParams>() * start;
            let draws = self.buffers.draws.ptr() + draw_bytes as u64;
            let adjustments = self.buffers.adjustments.ptr();
            let mut args = kernel_args![logits, vocab, draws, adjustments, ids];
            // SAFETY: as below; and the draws of every row (their adjustments' tokens in
            // bounds of the vocabulary or skipped by the kernel) were staged.
            return unsafe { gpu.launch(self.kernels.sample_rows, grid, 1024, 0, &mut args) };
        }
        let mut args = kernel_args![logits, vocab, ids];
        // SAFETY: `count` rows of logits were written by this step's output head, and
        // the ids buffer holds a row per token of the largest step.
        unsafe { gpu.launch(self.kernels.argmax_rows, grid, 1024, 0, &mut args) }
    }

    /// Copies `rows` greedy ids back to the pinned buffer and waits for the step.
    fn download_ids(&mut self, rows: usize) -> Result<(), GpuError> {
        let gpu = self.model.gpu.clone();
        if rows > 0 {
            let dst = &mut self.ids_host.as_mut_slice()[..rows];
            // SAFETY: in bounds (rows ≤ the step's tokens); synchronised before `dst` is
            // read.
            unsafe {
                result::memcpy_dtoh_async(dst, self.buffers.ids.ptr(), gpu.stream.cu_stream())
            }?;
        }
        gpu.synchronize()
    }

    /// Copies `rows` rows of logits back to the pinned buffer, waits for the step, and
    /// for steps past the buffer's capacity appends them to the overflow at row `at`.
    fn download_logits(&mut self, rows: usize, overflow_at: Option<usize>) -> Result<(), GpuError> {
        let vocab = self.model.config.vocab_size;
        let gpu = self.model.gpu.clone();
        gpu.bind()?;
        let dst = &mut self.logits_host.as_mut_slice()[..rows * vocab];
        // SAFETY: in bounds (rows ≤ logit_capacity); synchronised before `dst` is read.
        unsafe {
            result::memcpy_dtoh_async(dst, self.buffers.logits.ptr(), gpu.stream.cu_stream())
        }?;
        gpu.synchronize()?;
        if let Some(at) = overflow_at {
            let src = &self.logits_host.as_slice()[..rows * vocab];
            self.logits_overflow[at * vocab..(at + rows) * vocab].copy_from_slice(src);
        }
        Ok(())
    }
}

/// The KV cache's share of the GPU's memory, once weights and buffers are allocated.
/// `ours`: what this worker holds besides the KV cache (weights, buffers, cuBLAS's
/// workspace), counted from its own allocations, so that other processes on the GPU
/// are not counted as its own.
fn kv_bytes(gpu: &Gpu, budget: KvBudget, ours: usize) -> Result<usize, GpuError> {
    let (free, total) = gpu.free_memory()?;
    let usable = free.saturating_sub(RESERVE_BYTES);
    let wanted = match budget {
        KvBudget::Bytes(bytes) => bytes,
        KvBudget::Fraction(fraction) => ((fraction as f64 * total as f64) as usize)
            .saturating_sub(ours)
            .saturating_sub(RESERVE_BYTES),
    };
    if wanted > usable || wanted == 0 {
        return Err(GpuError::OutOfMemory {
            what: "the KV cache",
            needed: wanted,
            available: usable,
        });
    }
    Ok(wanted)
}

/// float4s of a row each thread of `rms_norm` keeps in registers (RMS_VECTORS in
/// kernels.cu).
const RMS_VECTORS: usize = 4;

/// Threads for a block that wants one per `items`: whole warps, 64 to 1024.
fn threads_for(items: usize) -> u32 {
    (items.div_ceil(32) * 32).clamp(64, 1024) as u32
}

/// The attention kernel with `warps` (1 or 4) warps per block.
fn attention_kernel_name(head_dim: usize, warps: usize) -> String {
    format!("attention_mma_d{head_dim}_w{warps}")
}

/// Dynamic shared memory of the attention kernel with `warps` warps per block (mirrors
/// its layout): two buffers of a key tile and its values, in halves with rows padded
/// by 8; tiles of 32 keys with one warp, 64 with four.
pub fn attention_shared_bytes(head_dim: usize, warps: usize) -> usize {
    let key_tile = if warps == 1 { KEY_TILE / 2 } else { KEY_TILE };
    2 * (2 * 2 * key_tile * (head_dim + 8))
}

fn load_kernels(gpu: &Gpu, head_dim: usize) -> Result<Kernels, GpuError> {
    let available = gpu
        .ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
        as usize;
    let needed = attention_shared_bytes(head_dim, 1).max(attention_shared_bytes(head_dim, 4));
    if available < needed {
        return Err(GpuError::Unsupported(format!(
            "this GPU: attention at head dimension {head_dim} needs {needed} bytes of shared \
             memory per thread block and it offers {available}"
        )));
    }
    let m = &gpu.module;
    let attention = |warps: usize| -> Result<Kernel, GpuError> {
        let kernel = m.kernel(&attention_kernel_name(head_dim, warps))?;
        kernel.allow_shared_memory(attention_shared_bytes(head_dim, warps))?;
        Ok(kernel)
    };
    Ok(Kernels {
        embed: m.kernel("embed")?,
        rms_norm: m.kernel("rms_norm")?,
        rope_store: m.kernel("rope_store")?,
        silu_mul: m.kernel("silu_mul")?,
        attn_combine: m.kernel("attn_combine")?,
        argmax_rows: m.kernel("argmax_rows")?,
        sample_rows: m.kernel("sample_rows")?,
        attention_w1: attention(1)?,
        attention_w4: attention(4)?,
    })
}
