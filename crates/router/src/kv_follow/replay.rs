//! The replay client: asks a worker's replay ROUTER socket for the batches a
//! subscriber missed. The request is `[b"", start_seq as 8 bytes BE]` from a DEALER;
//! the server answers one `[b"", seq, payload]` per buffered batch with
//! `seq >= start_seq`, then the terminator `[b"", ff×8, b""]`.

use std::time::Duration;

use tandem_protocol::kv_events::{KvEventBatch, decode_batch, decode_seq};
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend, ZmqMessage};

/// The sequence number frame that ends a replay.
const TERMINATOR: u64 = u64::MAX;

/// Why a replay could not bring back what was missed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("replay socket: {0}")]
    Socket(#[from] zeromq::ZmqError),
    #[error("replay took longer than {0:?}")]
    Timeout(Duration),
    #[error("a replay reply is malformed: {0}")]
    Malformed(&'static str),
    #[error("a replayed batch does not decode: {0}")]
    Decode(#[from] tandem_protocol::kv_events::KvEventError),
    #[error("the replay buffer starts after {wanted}: those batches are gone")]
    Overrun { wanted: u64 },
    #[error("the replay ended before {missing}")]
    Incomplete { missing: u64 },
    #[error("replay brought more than {0} bytes")]
    TooLarge(usize),
}

/// What a replay may cost.
#[derive(Debug, Clone, Copy)]
pub struct ReplayLimits {
    pub timeout: Duration,
    pub max_bytes: usize,
}

/// The batches `from..until` of the worker behind `endpoint`, in order, or why not.
/// Replies past `until` are not read; replies before `from` are skipped.
pub async fn fetch(
    endpoint: &str,
    from: u64,
    until: u64,
    limits: ReplayLimits,
) -> Result<Vec<(u64, KvEventBatch)>, ReplayError> {
    tokio::time::timeout(
        limits.timeout,
        fetch_unbounded(endpoint, from, until, limits),
    )
    .await
    .map_err(|_| ReplayError::Timeout(limits.timeout))?
}

async fn fetch_unbounded(
    endpoint: &str,
    from: u64,
    until: u64,
    limits: ReplayLimits,
) -> Result<Vec<(u64, KvEventBatch)>, ReplayError> {
    let mut options = SocketOptions::default();
    options.connect_timeout(limits.timeout);
    let mut socket = DealerSocket::with_options(options);
    socket.connect(endpoint).await?;
    let mut request = ZmqMessage::from(Vec::<u8>::new());
    request.push_back(from.to_be_bytes().to_vec().into());
    socket.send(request).await?;
    let mut batches = Vec::new();
    let mut next = from;
    let mut bytes = 0usize;
    while next < until {
        let reply = socket.recv().await?;
        let (seq, payload) = split_reply(&reply)?;
        if seq == TERMINATOR {
            return Err(ReplayError::Incomplete { missing: next });
        }
        // Every reply counts, skipped ones too: a server cannot stream forever.
        bytes = bytes.saturating_add(payload.len());
        if bytes > limits.max_bytes {
            return Err(ReplayError::TooLarge(limits.max_bytes));
        }
        if seq < next {
            continue;
        }
        if seq > next {
            return Err(ReplayError::Overrun { wanted: next });
        }
        batches.push((seq, decode_batch(payload)?));
        next += 1;
    }
    Ok(batches)
}

/// `(seq, payload)` of a reply `[b"", seq, payload]` (the empty delimiter may be
/// missing, as from a server that does not echo it).
fn split_reply(reply: &ZmqMessage) -> Result<(u64, &[u8]), ReplayError> {
    let frames: Vec<&[u8]> = reply.iter().map(|frame| frame.as_ref()).collect();
    let (seq, payload) = match frames.as_slice() {
        [[], seq, payload] => (*seq, *payload),
        [seq, payload] => (*seq, *payload),
        _ => return Err(ReplayError::Malformed("expected [\"\", seq, payload]")),
    };
    let seq = decode_seq(seq).map_err(|_| ReplayError::Malformed("seq is not 8 bytes"))?;
    Ok((seq, payload))
}
