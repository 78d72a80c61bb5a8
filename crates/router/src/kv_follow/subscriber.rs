//! One worker's subscriber: a ZMQ SUB socket on its PUB endpoint, feeding the view in
//! sequence, filling gaps by replay and resetting the worker when it cannot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tandem_protocol::kv_events::{KvEventError, KvEventMessage, decode_message};
use tokio::sync::watch;
use zeromq::{Socket, SocketEvent, SocketOptions, SocketRecv, SubSocket, ZmqMessage};

use super::replay::{self, ReplayLimits};
use super::view::{KvCacheView, WorkerLive};
use super::{FollowSettings, KvStream};
use crate::metrics as names;
use crate::throttle::Throttle;

/// Longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

static GARBAGE_WARNING: Throttle = Throttle::new(Duration::from_secs(30));
static RESET_WARNING: Throttle = Throttle::new(Duration::from_secs(30));
static CONNECT_WARNING: Throttle = Throttle::new(Duration::from_secs(60));

/// Follows one worker until `stop` turns true.
pub(crate) struct Subscriber {
    pub(crate) view: Arc<KvCacheView>,
    pub(crate) live: Arc<WorkerLive>,
    pub(crate) stream: KvStream,
    pub(crate) settings: Arc<FollowSettings>,
}

impl Subscriber {
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            tokio::select! {
                biased;
                _ = stop.wait_for(|stop| *stop) => return,
                connected = self.session() => {
                    self.view.set_connected(&self.live, false);
                    self.view.reset(&self.live);
                    if connected {
                        backoff = FIRST_BACKOFF;
                    }
                }
            }
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Connects and follows until the socket fails; whether it connected at all.
    async fn session(&self) -> bool {
        let mut options = SocketOptions::default();
        options.connect_timeout(MAX_BACKOFF);
        let mut socket = SubSocket::with_options(options);
        let mut monitor = socket.monitor();
        if let Err(error) = self.connect(&mut socket).await {
            if let Some(held) = CONNECT_WARNING.admit(Instant::now()) {
                tracing::warn!(
                    worker = self.stream.worker,
                    endpoint = self.stream.endpoint,
                    %error,
                    held_back = held,
                    "cannot subscribe to KV events; retrying"
                );
            }
            return false;
        }
        tracing::debug!(worker = self.stream.worker, "subscribed to KV events");
        self.view.reset(&self.live);
        self.view.set_connected(&self.live, true);
        loop {
            tokio::select! {
                biased;
                event = monitor.next() => match event {
                    Some(event) => self.on_socket_event(event),
                    None => return true,
                },
                message = socket.recv() => match message {
                    Ok(message) => self.on_message(&message).await,
                    Err(error) => {
                        tracing::debug!(worker = self.stream.worker, %error, "KV events socket failed");
                        return true;
                    }
                },
            }
        }
    }

    async fn connect(&self, socket: &mut SubSocket) -> zeromq::ZmqResult<()> {
        socket.connect(&self.stream.endpoint).await?;
        socket.subscribe(&self.settings.topic).await
    }

    /// The crate reconnects by itself; what was published meanwhile is lost, so a
    /// disconnect makes the worker's cache unknown and a reconnect starts it afresh.
    fn on_socket_event(&self, event: SocketEvent) {
        match event {
            SocketEvent::Disconnected(_) => {
                tracing::debug!(
                    worker = self.stream.worker,
                    "KV events publisher disconnected"
                );
                self.view.set_connected(&self.live, false);
                self.view.reset(&self.live);
                count_dropped("disconnect");
            }
            SocketEvent::Connected(..) => {
                self.view.reset(&self.live);
                self.view.set_connected(&self.live, true);
            }
            _ => {}
        }
    }

    async fn on_message(&self, message: &ZmqMessage) {
        let parts: Vec<&[u8]> = message.iter().map(|frame| frame.as_ref()).collect();
        let message = match decode_message(&parts) {
            Ok(message) => message,
            Err(error) => return self.garbage(decode_reason(&error), &error),
        };
        if message.topic != self.settings.topic {
            // SUB filters by prefix: `kv` also lets `kv-events` through.
            return count_dropped("topic");
        }
        self.view.event_arrived(&self.live);
        self.sequence(message).await;
    }

    /// Applies a live message after what it follows: see the module doc of `kv_follow`.
    async fn sequence(&self, message: KvEventMessage) {
        match self.view.last_seq(&self.live) {
            Some(last) if message.seq <= last => {
                count_dropped("restart");
                self.warn_reset("the publisher restarted (sequence went back)");
                self.view.reset(&self.live);
            }
            Some(last) if message.seq > last + 1 => {
                count_dropped("gap");
                self.fill_gap(last + 1, message.seq).await;
            }
            _ => {}
        }
        self.view.apply(&self.live, message.seq, &message.batch);
    }

    /// Replays `from..until`, or resets the worker when that cannot be done.
    async fn fill_gap(&self, from: u64, until: u64) {
        let Some(endpoint) = &self.stream.replay_endpoint else {
            metrics::counter!(names::KV_REPLAYS_TOTAL, names::OUTCOME => "unavailable")
                .increment(1);
            self.warn_reset("messages were lost and no replay endpoint is configured");
            return self.view.reset(&self.live);
        };
        let limits = ReplayLimits {
            timeout: self.settings.replay_timeout,
            max_bytes: self.settings.max_replay_bytes,
        };
        match replay::fetch(endpoint, from, until, limits).await {
            Ok(batches) => {
                metrics::counter!(names::KV_REPLAYS_TOTAL, names::OUTCOME => "ok").increment(1);
                for (seq, batch) in &batches {
                    self.view.apply(&self.live, *seq, batch);
                }
            }
            Err(error) => {
                metrics::counter!(names::KV_REPLAYS_TOTAL, names::OUTCOME => "failed").increment(1);
                self.warn_reset(&format!("replay failed: {error}"));
                self.view.reset(&self.live);
            }
        }
    }

    fn garbage(&self, reason: &'static str, error: &KvEventError) {
        count_dropped(reason);
        if let Some(held) = GARBAGE_WARNING.admit(Instant::now()) {
            tracing::warn!(worker = self.stream.worker, %error, held_back = held, "dropped a KV event message");
        }
    }

    fn warn_reset(&self, why: &str) {
        if let Some(held) = RESET_WARNING.admit(Instant::now()) {
            tracing::warn!(
                worker = self.stream.worker,
                held_back = held,
                "{why}: the worker's KV cache is unknown until its events rebuild it"
            );
        }
    }
}

fn count_dropped(reason: &'static str) {
    metrics::counter!(names::KV_EVENTS_DROPPED_TOTAL, names::REASON => reason).increment(1);
}

/// The metric reason for a message that did not decode.
fn decode_reason(error: &KvEventError) -> &'static str {
    match error {
        KvEventError::TooLarge { .. } => "too_large",
        KvEventError::PartCount(_) | KvEventError::SeqLength(_) | KvEventError::TopicNotUtf8 => {
            "bad_frames"
        }
        _ => "decode_error",
    }
}
