//! The publisher task: vLLM 0.26's `ZmqEventPublisher` over the zeromq crate. A PUB
//! socket sends each queued batch as `[topic, seq (8 bytes, big-endian), payload]`; a
//! ring keeps the last `buffer_steps` of them; a ROUTER socket, when
//! `replay_endpoint` is set, answers replay requests from that ring.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tandem_protocol::kv_events::{SEQ_BYTES, encode_message};
use thiserror::Error;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqError, ZmqMessage};

use super::config::{KvEventsConfig, KvEventsConfigError, PUB_QUEUE_MESSAGES, SocketMode};
use super::sink::{KvEventSource, NumberedBatch};
use crate::metrics as names;

/// The sequence frame of the replay terminator: -1 as 8 big-endian bytes.
pub const END_SEQ: [u8; SEQ_BYTES] = [0xff; SEQ_BYTES];

/// How long one replay answer may wait on a client that does not read it; then the
/// rest of that answer is abandoned, so that one client cannot stall the others.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the publisher could not start.
#[derive(Debug, Error)]
pub enum KvEventsError {
    #[error(transparent)]
    Config(#[from] KvEventsConfigError),
    #[error("could not bind the KV event {socket} socket to {address}: {source}")]
    Bind {
        socket: &'static str,
        address: String,
        source: ZmqError,
    },
}

/// Where the started publisher is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherEndpoints {
    /// The PUB socket's bound address (its port resolved), or the address it connects
    /// to.
    pub publish: String,
    pub mode: SocketMode,
    /// The replay socket's bound address.
    pub replay: Option<String>,
}

/// Binds the sockets (a failure is returned, nothing is left running) and spawns the
/// tasks on the current tokio runtime. The PUB task ends once `source` does; a
/// connecting PUB socket connects in its task, retrying, while batches queue.
pub async fn start_publisher(
    config: &KvEventsConfig,
    source: KvEventSource,
) -> Result<PublisherEndpoints, KvEventsError> {
    if config.hwm != PUB_QUEUE_MESSAGES {
        tracing::warn!(
            hwm = config.hwm,
            "kv events: hwm is ignored; the PUB socket queues {PUB_QUEUE_MESSAGES} messages per subscriber"
        );
    }
    let endpoint = config.pub_endpoint()?;
    let mut socket = PubSocket::new();
    let publish = match endpoint.mode {
        SocketMode::Bind => bind(&mut socket, "PUB", &endpoint.address).await?,
        SocketMode::Connect => endpoint.address.clone(),
    };
    let ring = Arc::new(Mutex::new(Ring::new(config.buffer_steps)));
    let replay = match config.replay_address()? {
        Some(address) => {
            let mut router = RouterSocket::new();
            let bound = bind(&mut router, "replay ROUTER", &address).await?;
            tokio::spawn(serve_replay(router, ring.clone()));
            Some(bound)
        }
        None => None,
    };
    let connect = (endpoint.mode == SocketMode::Connect).then(|| endpoint.address.clone());
    let publisher = Publisher {
        socket,
        ring,
        topic: config.topic.clone(),
    };
    tokio::spawn(publisher.run(source, connect));
    Ok(PublisherEndpoints {
        publish,
        mode: endpoint.mode,
        replay,
    })
}

async fn bind(
    socket: &mut impl Socket,
    name: &'static str,
    address: &str,
) -> Result<String, KvEventsError> {
    let bound = socket
        .bind(address)
        .await
        .map_err(|source| KvEventsError::Bind {
            socket: name,
            address: address.to_owned(),
            source,
        })?;
    Ok(bound.to_string())
}

/// The last `capacity` published `(seq, payload)` pairs.
#[derive(Debug)]
struct Ring {
    capacity: usize,
    entries: VecDeque<(u64, Bytes)>,
}

impl Ring {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: VecDeque::with_capacity(capacity.min(1024)),
        }
    }

    fn push(&mut self, seq: u64, payload: Bytes) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back((seq, payload));
    }

    fn since(&self, start: u64) -> Vec<(u64, Bytes)> {
        let first = self.entries.partition_point(|(seq, _)| *seq < start);
        self.entries.range(first..).cloned().collect()
    }
}

/// The PUB side: owns the socket, fills the ring.
struct Publisher {
    socket: PubSocket,
    ring: Arc<Mutex<Ring>>,
    topic: String,
}

impl Publisher {
    async fn run(mut self, mut source: KvEventSource, connect: Option<String>) {
        if let Some(address) = connect {
            self.connect(&address).await;
        }
        while let Some(batch) = source.recv().await {
            self.publish(batch).await;
        }
    }

    /// Connects, retrying (each try waits up to the crate's connect timeout).
    async fn connect(&mut self, address: &str) {
        while let Err(err) = self.socket.connect(address).await {
            tracing::warn!(%err, address, "kv events: could not connect the PUB socket; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn publish(&mut self, numbered: NumberedBatch) {
        let NumberedBatch { seq, batch } = numbered;
        let [topic, seq_frame, payload] = match encode_message(&self.topic, seq, &batch) {
            Ok(frames) => frames,
            Err(err) => {
                tracing::error!(%err, seq, "kv events: could not encode a batch");
                return;
            }
        };
        let payload = Bytes::from(payload);
        lock(&self.ring).push(seq, payload.clone());
        let frames = vec![Bytes::from(topic), Bytes::from(seq_frame), payload];
        let message = ZmqMessage::try_from(frames).expect("three frames");
        match self.socket.send(message).await {
            Ok(()) => metrics::counter!(names::KV_EVENTS_PUBLISHED_TOTAL).increment(1),
            Err(err) => tracing::debug!(%err, seq, "kv events: PUB send failed"),
        }
    }
}

fn lock(ring: &Mutex<Ring>) -> std::sync::MutexGuard<'_, Ring> {
    ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Answers replay requests until the socket fails, as vLLM's `_service_replay` does.
async fn serve_replay(mut router: RouterSocket, ring: Arc<Mutex<Ring>>) {
    loop {
        let request = match router.recv().await {
            Ok(request) => request,
            Err(err) => {
                tracing::warn!(%err, "kv events: the replay socket stopped");
                return;
            }
        };
        let Some((identity, start)) = parse_request(request) else {
            metrics::counter!(names::KV_EVENTS_REPLAY_REFUSED_TOTAL).increment(1);
            continue;
        };
        let entries = lock(&ring).since(start);
        let answer = send_replay(&mut router, &identity, entries);
        match tokio::time::timeout(REPLY_TIMEOUT, answer).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::debug!(%err, "kv events: replay answer failed"),
            Err(_) => tracing::debug!("kv events: replay client did not read; answer abandoned"),
        }
    }
}

/// `[identity, "", start_seq (8 bytes, big-endian)]`, else `None` (logged).
fn parse_request(request: ZmqMessage) -> Option<(Bytes, u64)> {
    let frames = request.into_vec();
    let [identity, empty, start] = frames.as_slice() else {
        tracing::debug!(
            frames = frames.len(),
            "kv events: replay request ignored (not 3 frames)"
        );
        return None;
    };
    let Ok(start) = <[u8; SEQ_BYTES]>::try_from(start.as_ref()) else {
        tracing::debug!(
            len = start.len(),
            "kv events: replay request ignored (start is not 8 bytes)"
        );
        return None;
    };
    if !empty.is_empty() {
        tracing::debug!("kv events: replay request ignored (no empty delimiter)");
        return None;
    }
    Some((identity.clone(), u64::from_be_bytes(start)))
}

/// One `[identity, "", seq, payload]` per entry, then `[identity, "", ff×8, ""]`.
async fn send_replay(
    router: &mut RouterSocket,
    identity: &Bytes,
    entries: Vec<(u64, Bytes)>,
) -> Result<(), ZmqError> {
    for (seq, payload) in entries {
        let seq = Bytes::copy_from_slice(&seq.to_be_bytes());
        router.send(reply(identity, seq, payload)).await?;
    }
    let end = reply(identity, Bytes::from_static(&END_SEQ), Bytes::new());
    router.send(end).await
}

fn reply(identity: &Bytes, seq: Bytes, payload: Bytes) -> ZmqMessage {
    let frames = vec![identity.clone(), Bytes::new(), seq, payload];
    ZmqMessage::try_from(frames).expect("four frames")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(frames: &[&[u8]]) -> ZmqMessage {
        let frames: Vec<Bytes> = frames.iter().map(|f| Bytes::copy_from_slice(f)).collect();
        ZmqMessage::try_from(frames).unwrap()
    }

    #[test]
    fn the_ring_keeps_the_last_entries_in_order() {
        let mut ring = Ring::new(3);
        for seq in 0..5 {
            ring.push(seq, Bytes::from(vec![seq as u8]));
        }
        let seqs = |entries: Vec<(u64, Bytes)>| entries.iter().map(|e| e.0).collect::<Vec<_>>();
        assert_eq!(seqs(ring.since(0)), [2, 3, 4]);
        assert_eq!(seqs(ring.since(3)), [3, 4]);
        assert!(ring.since(5).is_empty());
        let mut none = Ring::new(0);
        none.push(0, Bytes::new());
        assert!(none.since(0).is_empty());
    }

    #[test]
    fn only_well_formed_replay_requests_are_answered() {
        let start = 7u64.to_be_bytes();
        let good = parse_request(message(&[b"id", b"", &start])).unwrap();
        assert_eq!(good, (Bytes::from_static(b"id"), 7));
        for bad in [
            message(&[b"id", &start]),
            message(&[b"id", b"", &start, b""]),
            message(&[b"id", b"", &start[..4]]),
            message(&[b"id", b"x", &start]),
            message(&[b"id", b"", &[0; 9]]),
        ] {
            assert_eq!(parse_request(bad), None);
        }
    }
}
