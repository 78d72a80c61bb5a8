//! The caller's side of the engine loop: submitting requests and receiving their
//! events. A [`GenerationStream`] cancels its request when dropped, so a client that
//! disconnects frees its KV blocks without any extra bookkeeping in the HTTP layer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::mpsc;

use super::request::{GenerationEvent, GenerationRequest};
use super::stats::{EngineStats, SharedStats};
use crate::kv::{BlockId, KvBlocks};
use crate::transfer::PullOutcome;

/// Engine-internal id of a submitted request.
pub type SeqId = u64;

/// Messages into the engine loop.
pub(crate) enum Command {
    Submit {
        id: SeqId,
        /// Boxed: the other commands are a few bytes.
        request: Box<GenerationRequest>,
        events: mpsc::UnboundedSender<GenerationEvent>,
    },
    /// The caller ends the request as stopped (a stop string matched): unlike a cancel,
    /// it finishes normally, so a prefill leg still hands its KV off.
    Stop(SeqId),
    Cancel(SeqId),
    /// Blocks a lease held are free again.
    Release(Vec<BlockId>),
    /// A pull of remote KV ended.
    Pulled {
        seq: SeqId,
        outcome: PullOutcome,
    },
}

/// The engine loop has stopped (it panicked or was shut down).
#[derive(Debug, thiserror::Error)]
#[error("the engine loop is not running")]
pub struct EngineStopped;

/// A cloneable handle to a running engine loop.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::UnboundedSender<Command>,
    next_id: Arc<AtomicU64>,
    alive: Arc<AtomicBool>,
    stats: Arc<SharedStats>,
    kv_memory: KvBlocks,
}

impl EngineHandle {
    pub(crate) fn new(
        commands: mpsc::UnboundedSender<Command>,
        alive: Arc<AtomicBool>,
        stats: Arc<SharedStats>,
        kv_memory: KvBlocks,
    ) -> Self {
        Self {
            commands,
            next_id: Arc::new(AtomicU64::new(1)),
            alive,
            stats,
            kv_memory,
        }
    }

    /// The engine's KV memory, for the hand-off.
    pub fn kv_memory(&self) -> KvBlocks {
        self.kv_memory.clone()
    }

    /// Watches the engine loop's end without keeping it alive.
    pub fn liveness(&self) -> EngineLiveness {
        EngineLiveness(self.alive.clone())
    }

    /// A handle that does not keep the engine loop alive (for the hand-off tasks).
    pub fn downgrade(&self) -> WeakEngine {
        WeakEngine {
            commands: self.commands.downgrade(),
        }
    }

    /// The engine's state as of its last step.
    pub fn stats(&self) -> EngineStats {
        self.stats.load()
    }

    /// Queues a request; its events arrive on the returned stream.
    pub fn submit(&self, request: GenerationRequest) -> Result<GenerationStream, EngineStopped> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, receiver) = mpsc::unbounded_channel();
        self.commands
            .send(Command::Submit {
                id,
                request: Box::new(request),
                events,
            })
            .map_err(|_| EngineStopped)?;
        Ok(GenerationStream {
            id,
            events: receiver,
            commands: self.commands.clone(),
            finished: false,
        })
    }

    /// Whether the engine loop is still running (for `/health`).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire) && !self.commands.is_closed()
    }
}

/// Whether the engine loop is still running, without keeping it alive: the loop ends
/// once every [`EngineHandle`] is gone, and clears the flag only after its executor —
/// the model, KV memory and, on a GPU, the libraries' handles — has been dropped.
#[derive(Clone)]
pub struct EngineLiveness(Arc<AtomicBool>);

impl EngineLiveness {
    /// Waits up to `timeout` for the loop to end; whether it did. A process should
    /// wait before it exits: the GPU libraries' own exit-time teardown must not run
    /// while the loop's thread is still releasing their handles.
    pub fn wait_ended(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.0.load(Ordering::Acquire) {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        true
    }
}

/// The events of one request. Dropping it before the last event cancels the request.
pub struct GenerationStream {
    id: SeqId,
    events: mpsc::UnboundedReceiver<GenerationEvent>,
    commands: mpsc::UnboundedSender<Command>,
    finished: bool,
}

impl GenerationStream {
    /// The engine's id of its sequence.
    pub fn id(&self) -> SeqId {
        self.id
    }

    /// The next event; `None` after the last one, or if the engine loop died.
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        if self.finished {
            return None;
        }
        let event = self.events.recv().await;
        match &event {
            Some(
                GenerationEvent::Token(_)
                | GenerationEvent::TokenWithLogprobs(..)
                | GenerationEvent::PromptLogprobs(_),
            ) => {}
            Some(_) | None => self.finished = true,
        }
        event
    }

    /// Ends the request as stopped (a stop string matched); its `Finished` event still
    /// comes.
    pub fn stop(&mut self) {
        if !self.finished {
            let _ = self.commands.send(Command::Stop(self.id));
        }
    }

    /// Abandons the request now; later events are dropped.
    pub fn cancel(&mut self) {
        if !self.finished {
            self.finished = true;
            let _ = self.commands.send(Command::Cancel(self.id));
        }
    }
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Reaches the engine loop without keeping it alive: messages to a stopped engine are
/// dropped.
#[derive(Clone)]
pub struct WeakEngine {
    commands: mpsc::WeakUnboundedSender<Command>,
}

impl WeakEngine {
    fn send(&self, command: Command) {
        if let Some(commands) = self.commands.upgrade() {
            let _ = commands.send(command);
        }
    }

    /// Gives blocks a lease held back to the pool.
    pub fn release_blocks(&self, blocks: Vec<BlockId>) {
        self.send(Command::Release(blocks));
    }

    /// Reports the end of a pull of remote KV.
    pub fn pulled(&self, seq: SeqId, outcome: PullOutcome) {
        self.send(Command::Pulled { seq, outcome });
    }
}
