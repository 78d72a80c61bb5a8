//! `kv_follow`: the router follows each worker's KV-cache events (vLLM's ZMQ
//! publisher, [`tandem_protocol::kv_events`]) into the pure [`crate::kv_index`], and
//! answers the policies' [`PrefixLookup`] from it.
//!
//! It owns:
//!
//! - [`KvCacheView`]: the index behind a lock, the worker URL → `WorkerId` map, and
//!   each followed worker's liveness (workers as the index's `WorkerId`); it implements [`PrefixLookup`] and the
//!   dispatcher's [`KvCacheView::note_routed`] hook;
//! - [`KvFollower`]: one thread with its own tokio runtime (the router's per-thread
//!   runtimes serve connections), running one subscriber task per worker; workers are
//!   added and removed while it runs (admin API) and it stops on shutdown;
//! - the per-worker subscriber (`subscriber`) and the replay client (`replay`).
//!
//! # Sequence rules (live stream)
//!
//! - `seq == last + 1`, or the first message since a reset: applied.
//! - `seq > last + 1`: messages were lost. With a replay endpoint, the missing range
//!   is fetched (DEALER, bounded by `replay_timeout` and `max_replay_bytes`) and
//!   applied in order, then the live message. When replay cannot cover from the first
//!   missing one (buffer overrun, timeout, garbage, no replay socket), the worker is
//!   reset (its cache is unknown until new events rebuild it) and the live message
//!   applied to the empty state.
//! - `seq <= last`: the publisher restarted (vLLM counts from 0 per process): reset,
//!   then applied.
//! - Garbage (bad frames, bad msgpack, a payload over 16 MiB, another topic) is
//!   counted by reason and dropped.
//! - A disconnect (the socket monitor's `Disconnected`) resets the worker and marks it
//!   disconnected; what was published meanwhile is lost. The zeromq crate reconnects
//!   by itself (and re-subscribes); a socket that fails is rebuilt with backoff.
//!
//! # When a worker's cache is unknown
//!
//! [`PrefixLookup::cached_prefix_tokens`] answers `None` for a worker without an event
//! stream, whose stream is disconnected, that is stale (the index's mark after a gap
//! that was not filled), or whose events stopped: a request was routed to it more than
//! `stale_after` ago and no event has come since ([`CacheState`]).
//!
//! # Memory
//!
//! The index holds at most `max_blocks` entries; a replay keeps at most
//! `max_replay_bytes` of payload; control channels are bounded. **One bound is not in
//! our hands**: zeromq 0.7 has no maximum message size (its `read_buffer` option sizes
//! reads, it is not a limit) and reserves a frame's announced length before reading
//! it, so a hostile publisher can make the router allocate up to the length it
//! announces (and abort on an impossible one). Payloads over 16 MiB are dropped once
//! received, but the allocation has happened. The endpoints therefore come only from
//! the operator (flags, config file, admin API), never from clients: follow only
//! publishers you trust, on a network you trust.

mod replay;
mod subscriber;
mod view;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

pub use replay::{ReplayError, ReplayLimits, fetch as fetch_replay};
pub use view::{CacheState, KvCacheView};

use crate::config::{KvEventsSource, RouterConfig};
use crate::kv_index::WorkerId;
use crate::policy::PrefixLookup;

/// Commands the follower's thread accepts at most this many of at once.
const CONTROL_QUEUE: usize = 64;
/// How often the gauges are published.
const GAUGE_PERIOD: Duration = Duration::from_secs(1);

/// One worker's event stream, validated (see `config::validate_zmq_endpoint`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvStream {
    /// The worker's normalized URL.
    pub worker: String,
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
}

/// What every subscriber shares.
#[derive(Debug, Clone)]
pub struct FollowSettings {
    pub topic: String,
    pub max_blocks: usize,
    pub replay_timeout: Duration,
    pub stale_after: Duration,
    pub max_replay_bytes: usize,
}

impl FollowSettings {
    pub fn from_config(config: &RouterConfig) -> Self {
        let kv = &config.kv_index;
        FollowSettings {
            topic: config.kv_events_topic.clone(),
            max_blocks: kv.max_blocks,
            replay_timeout: Duration::from_millis(kv.replay_timeout_ms),
            stale_after: Duration::from_secs(kv.stale_after_secs),
            max_replay_bytes: kv.max_replay_bytes,
        }
    }
}

/// A KV events source from the config, as a stream (the worker URL normalized).
pub fn stream_of(source: &KvEventsSource) -> Result<KvStream, crate::ConfigError> {
    crate::config::validate_zmq_endpoint(&source.endpoint)?;
    if let Some(replay) = &source.replay_endpoint {
        crate::config::validate_zmq_endpoint(replay)?;
    }
    Ok(KvStream {
        worker: crate::config::normalize_url(&source.worker)?,
        endpoint: source.endpoint.clone(),
        replay_endpoint: source.replay_endpoint.clone(),
    })
}

enum Command {
    Follow(KvStream),
    Unfollow(String),
}

/// The follower thread could not start, or has stopped.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("starting the KV events thread: {0}")]
    Start(#[from] std::io::Error),
    #[error("the KV events thread has stopped")]
    Stopped,
}

/// The thread that runs the subscribers; see the module doc. Dropping it stops it.
#[derive(Debug)]
pub struct KvFollower {
    view: Arc<KvCacheView>,
    control: mpsc::Sender<Command>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Follow(stream) => write!(f, "Follow({})", stream.worker),
            Command::Unfollow(url) => write!(f, "Unfollow({url})"),
        }
    }
}

impl KvFollower {
    /// Starts the thread with a fresh view, following `streams`.
    pub fn start(settings: FollowSettings, streams: Vec<KvStream>) -> Result<Self, FollowError> {
        let view = Arc::new(KvCacheView::new(settings.max_blocks, settings.stale_after));
        let (control, commands) = mpsc::channel(CONTROL_QUEUE);
        let (stop, stopped) = watch::channel(false);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread_view = view.clone();
        let settings = Arc::new(settings);
        let thread = std::thread::Builder::new()
            .name("tandem-kv-follow".into())
            .spawn(move || {
                runtime.block_on(drive(thread_view, settings, streams, commands, stopped));
            })?;
        Ok(KvFollower {
            view,
            control,
            stop,
            thread: Some(thread),
        })
    }

    /// The view the subscribers feed.
    pub fn view(&self) -> &Arc<KvCacheView> {
        &self.view
    }

    /// The view as a policy takes it.
    pub fn lookup(&self) -> Arc<dyn PrefixLookup> {
        self.view.lookup()
    }

    /// A handle for the admin API (add and remove streams while running).
    pub fn handle(&self) -> KvFollowHandle {
        KvFollowHandle {
            view: self.view.clone(),
            control: self.control.clone(),
        }
    }

    /// Stops every subscriber and joins the thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the KV events thread panicked");
        }
    }
}

impl Drop for KvFollower {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Adds and removes followed workers while the follower runs.
#[derive(Debug, Clone)]
pub struct KvFollowHandle {
    view: Arc<KvCacheView>,
    control: mpsc::Sender<Command>,
}

impl KvFollowHandle {
    pub fn view(&self) -> &Arc<KvCacheView> {
        &self.view
    }

    /// Follows `stream` (replacing any stream of the same worker).
    pub async fn follow(&self, stream: KvStream) -> Result<(), FollowError> {
        self.send(Command::Follow(stream)).await
    }

    /// Stops following `url` and forgets its blocks at once.
    pub async fn unfollow(&self, url: &str) -> Result<(), FollowError> {
        self.view.unregister(url);
        self.send(Command::Unfollow(url.to_owned())).await
    }

    async fn send(&self, command: Command) -> Result<(), FollowError> {
        self.control
            .send(command)
            .await
            .map_err(|_| FollowError::Stopped)
    }
}

/// The follower thread's loop: one task per worker, commands, gauges, stop.
async fn drive(
    view: Arc<KvCacheView>,
    settings: Arc<FollowSettings>,
    streams: Vec<KvStream>,
    mut commands: mpsc::Receiver<Command>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut tasks: HashMap<String, Task> = HashMap::new();
    for stream in streams {
        spawn_subscriber(&view, &settings, &mut tasks, stream);
    }
    let mut gauges = tokio::time::interval(GAUGE_PERIOD);
    loop {
        tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => break,
            command = commands.recv() => match command {
                Some(Command::Follow(stream)) => spawn_subscriber(&view, &settings, &mut tasks, stream),
                Some(Command::Unfollow(url)) => {
                    if let Some(task) = tasks.remove(&url) {
                        let worker = task.worker;
                        task.stop().await;
                        // What it applied after `unfollow` unregistered it.
                        view.forget(worker);
                    }
                }
                None => break,
            },
            _ = gauges.tick() => view.publish_gauges(),
        }
    }
    for (_, task) in tasks {
        task.stop().await;
    }
}

/// A running subscriber.
struct Task {
    worker: WorkerId,
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
}

impl Task {
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.handle.await;
    }
}

fn spawn_subscriber(
    view: &Arc<KvCacheView>,
    settings: &Arc<FollowSettings>,
    tasks: &mut HashMap<String, Task>,
    stream: KvStream,
) {
    if let Some(task) = tasks.remove(&stream.worker) {
        // This thread's runtime runs one task at a time: aborted, it applies no more.
        task.handle.abort();
        view.forget(task.worker);
    }
    let live = view.register(&stream.worker);
    let worker_id = live.id;
    let (stop, stopped) = watch::channel(false);
    let worker = stream.worker.clone();
    let subscriber = subscriber::Subscriber {
        view: view.clone(),
        live,
        stream,
        settings: settings.clone(),
    };
    let handle = tokio::spawn(subscriber.run(stopped));
    tasks.insert(
        worker,
        Task {
            worker: worker_id,
            stop,
            handle,
        },
    );
}
