//! The caller's side of the engine loop: submitting requests and receiving their
//! events. A [`GenerationStream`] cancels its request when dropped, so a client that
//! disconnects frees its KV blocks without any extra bookkeeping in the HTTP layer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::mpsc;

use super::request::{GenerationEvent, GenerationRequest};
use super::stats::{EngineStats, SharedStats};

/// Engine-internal id of a submitted request.
pub type SeqId = u64;

/// Messages into the engine loop.
pub(crate) enum Command {
    Submit {
        id: SeqId,
        request: GenerationRequest,
        events: mpsc::UnboundedSender<GenerationEvent>,
    },
    Cancel(SeqId),
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
}

impl EngineHandle {
    pub(crate) fn new(
        commands: mpsc::UnboundedSender<Command>,
        alive: Arc<AtomicBool>,
        stats: Arc<SharedStats>,
    ) -> Self {
        Self {
            commands,
            next_id: Arc::new(AtomicU64::new(1)),
            alive,
            stats,
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
                request,
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

/// The events of one request. Dropping it before the last event cancels the request.
pub struct GenerationStream {
    id: SeqId,
    events: mpsc::UnboundedReceiver<GenerationEvent>,
    commands: mpsc::UnboundedSender<Command>,
    finished: bool,
}

impl GenerationStream {
    /// The next event; `None` after the last one, or if the engine loop died.
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        if self.finished {
            return None;
        }
        let event = self.events.recv().await;
        match &event {
            Some(GenerationEvent::Token(_)) => {}
            Some(_) | None => self.finished = true,
        }
        event
    }

    /// Stops the request now (e.g. a stop string matched); later events are dropped.
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
