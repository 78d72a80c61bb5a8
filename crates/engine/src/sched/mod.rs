//! The engine loop: the single owner of running sequences, the KV store and its block
//! pool. Callers talk to it through an [`EngineHandle`] (requests in, token events out);
//! each step it picks a batch (decodes first, then chunks of prefill within a token
//! budget), runs one forward pass, samples, and reports.
//!
//! - `request`: the request/event types (token ids only; text stays with the caller).
//! - `handle`: submitting and cancelling from any thread.
//! - `sequence`, `scheduler`: the loop.

mod handle;
mod request;
mod scheduler;
mod sequence;
mod stats;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

pub use handle::{
    EngineHandle, EngineLiveness, EngineStopped, GenerationStream, SeqId, WeakEngine,
};
pub use request::{FinishReason, GenerationEvent, GenerationRequest, Usage};
pub use stats::EngineStats;

use crate::exec::{Executor, Model};
use crate::kernels::{KernelError, ThreadPool};
use crate::kv::{KvOptions, KvStore};
use crate::kv_events::KvEventSink;
use crate::model::ForwardScratch;
use crate::transfer::{LeaseTable, LoadFailurePolicy, PullerMsg};

/// How the engine loop batches and how much KV memory it has.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences in one batch.
    pub max_num_seqs: usize,
    /// Most tokens (decode and prefill together) in one forward pass.
    pub max_num_batched_tokens: usize,
    pub kv: KvOptions,
    /// Bytes of KV cache.
    pub kv_cache_memory: usize,
    pub prefix_caching: bool,
    /// Compute threads (default: all cores).
    pub threads: Option<usize>,
    /// Longest sequence (prompt + output) accepted.
    pub max_model_len: usize,
    /// GPU models: size the KV cache as this fraction of the GPU's memory minus the
    /// weights and buffers (instead of `kv_cache_memory`).
    pub gpu_memory_utilization: Option<f32>,
    /// GPU models: replay decode steps from CUDA graphs.
    pub cuda_graphs: bool,
}

impl EngineConfig {
    /// Bytes of KV cache when none is asked for (on a GPU the memory fraction sizes it).
    pub const DEFAULT_KV_CACHE_MEMORY: usize = 1 << 30;
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            kv: KvOptions::default(),
            kv_cache_memory: Self::DEFAULT_KV_CACHE_MEMORY,
            prefix_caching: true,
            threads: None,
            max_model_len: 8192,
            gpu_memory_utilization: None,
            cuda_graphs: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(
        "a KV cache of {memory} bytes holds {capacity} tokens, fewer than max_model_len \
         ({max_model_len}): raise the KV cache memory or lower max_model_len"
    )]
    KvTooSmall {
        memory: usize,
        capacity: usize,
        max_model_len: usize,
    },
    #[error("invalid engine setting: {0}")]
    Invalid(&'static str),
    #[error(transparent)]
    Threads(#[from] KernelError),
    #[error("could not start the engine thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("could not start the engine on the GPU: {0}")]
    Gpu(String),
}

/// The engine loop's links to the KV hand-off (all off by default).
#[derive(Default)]
pub struct HandoffLinks {
    /// Set on a prefill worker: finished `RemoteDecode` requests keep their blocks here.
    pub leases: Option<Arc<LeaseTable>>,
    /// Set on a decode worker: where remote prefills' pulls are sent.
    pub puller: Option<tokio::sync::mpsc::UnboundedSender<PullerMsg>>,
    pub load_failure_policy: LoadFailurePolicy,
}

/// Clears the liveness flag when the engine thread ends.
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Starts the engine loop on its own thread; it ends when every handle is dropped.
pub fn spawn(model: impl Into<Model>, config: EngineConfig) -> Result<EngineHandle, SpawnError> {
    spawn_with_handoff(model, config, HandoffLinks::default())
}

/// [`spawn`], linked to the KV hand-off.
pub fn spawn_with_handoff(
    model: impl Into<Model>,
    config: EngineConfig,
    handoff: HandoffLinks,
) -> Result<EngineHandle, SpawnError> {
    spawn_with_links(model, config, handoff, None)
}

/// [`spawn_with_handoff`], also publishing the prefix cache's block events to
/// `kv_events` (`--kv-events-config`; see [`crate::kv_events`]).
pub fn spawn_with_links(
    model: impl Into<Model>,
    config: EngineConfig,
    handoff: HandoffLinks,
    kv_events: Option<KvEventSink>,
) -> Result<EngineHandle, SpawnError> {
    if config.max_num_seqs == 0 || config.max_num_batched_tokens == 0 {
        return Err(SpawnError::Invalid(
            "max_num_seqs and max_num_batched_tokens must be positive",
        ));
    }
    let executor = executor(model.into(), &config)?;
    let layout = executor.kv_layout();
    let capacity = executor.num_blocks() * layout.block_size;
    if capacity < config.max_model_len {
        return Err(SpawnError::KvTooSmall {
            memory: capacity / layout.block_size * layout.bytes_per_block(),
            capacity,
            max_model_len: config.max_model_len,
        });
    }
    let (commands, receiver) = tokio::sync::mpsc::unbounded_channel();
    let alive = Arc::new(AtomicBool::new(true));
    let stats = Arc::new(stats::SharedStats::default());
    let kv_memory = executor.kv_blocks();
    let engine = scheduler::EngineLoop::new(
        executor,
        config,
        receiver,
        stats.clone(),
        handoff,
        kv_events,
    );
    let flag = ClearOnDrop(alive.clone());
    std::thread::Builder::new()
        .name("tandem-engine".into())
        .spawn(move || {
            // Dropped on return and on panic alike, so /health turns 503 either way.
            let _flag = flag;
            engine.run();
        })?;
    Ok(EngineHandle::new(commands, alive, stats, kv_memory))
}

/// The model's executor with its KV memory.
fn executor(model: Model, config: &EngineConfig) -> Result<Executor, SpawnError> {
    match model {
        Model::Cpu(model) => {
            let layout = model.kv_layout(config.kv);
            let pool = match config.threads {
                Some(n) => ThreadPool::new(n)?,
                None => ThreadPool::with_available_parallelism()?,
            };
            Ok(Executor::Cpu {
                model,
                pool,
                kv: KvStore::with_memory(layout, config.kv_cache_memory),
                scratch: ForwardScratch::default(),
            })
        }
        #[cfg(feature = "cuda")]
        Model::Cuda(model) => {
            use crate::cuda::model::KvBudget;
            let layout = model.kv_layout(config.kv);
            let budget = match config.gpu_memory_utilization {
                Some(fraction) => KvBudget::Fraction(fraction),
                None => KvBudget::Bytes(config.kv_cache_memory),
            };
            let limits = crate::cuda::RunnerLimits {
                max_tokens: config.max_num_batched_tokens,
                max_seqs: config.max_num_seqs,
                max_model_len: config.max_model_len,
                cuda_graphs: config.cuda_graphs,
            };
            let runner = crate::cuda::GpuRunner::new(model, layout, budget, limits)
                .map_err(|e| SpawnError::Gpu(e.to_string()))?;
            Ok(Executor::Cuda(Box::new(runner)))
        }
    }
}
