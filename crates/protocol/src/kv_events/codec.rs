//! The payload codec (msgpack, msgspec's rules) and the ZMQ message framing, as pure
//! functions over bytes.

use std::io::Cursor;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::KvEventBatch;

/// The largest payload [`decode_batch`] parses: 16 MiB.
///
/// One batch is one scheduler step. Its bulk is `token_ids` (at most 5 bytes a token)
/// and the block hashes (9 bytes a block): a step of 2 million new tokens, e.g. a
/// decode worker caching 64 transferred 32k-token prompts at once, is about 10 MiB.
/// The limit bounds what a hostile peer can make a decoder hold: decoded, a payload
/// takes some tens of times its size at worst (one-byte values inside `extra_keys`
/// take 32 bytes each, plus vector growth), and a real one about 4 times (a token
/// id takes 4 bytes for its 1 to 5 on the wire).
pub const MAX_BATCH_BYTES: usize = 16 << 20;

/// The sequence number frame: a big-endian `u64`.
pub const SEQ_BYTES: usize = 8;

/// Containers nest at most this deep in a payload (the batch, its events, an event,
/// `extra_keys`, an entry, then values inside it), so hostile nesting cannot exhaust
/// the stack.
const MAX_DEPTH: usize = 32;

/// Why a KV event payload or message was refused (or, never in practice, could not be
/// encoded).
#[derive(Debug, Error)]
pub enum KvEventError {
    #[error("KV event payload of {len} bytes is over the {limit}-byte limit")]
    TooLarge { len: usize, limit: usize },
    #[error("malformed KV event batch: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
    #[error("{0} bytes follow the KV event batch")]
    TrailingBytes(usize),
    #[error("could not encode a KV event batch: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("a KV event message has {0} parts; vLLM sends 3 (topic, sequence number, payload)")]
    PartCount(usize),
    #[error("a KV event sequence number is {0} bytes; vLLM sends {SEQ_BYTES} (big-endian)")]
    SeqLength(usize),
    #[error("a KV event topic is not UTF-8")]
    TopicNotUtf8,
}

/// One published message, decoded: `[topic, seq, payload]`.
#[derive(Debug, Clone, PartialEq)]
pub struct KvEventMessage {
    /// The publisher's configured topic (`KVEventsConfig.topic`, often empty).
    pub topic: String,
    /// Counts the publisher's messages from 0; a gap means lost messages.
    pub seq: u64,
    pub batch: KvEventBatch,
}

/// The payload of a batch, byte-identical to what vLLM 0.26's msgspec encoder writes.
///
/// A `Result` rather than a panic: it fails only if the msgpack serializer does, which
/// writing these types into a `Vec` does not.
pub fn encode_batch(batch: &KvEventBatch) -> Result<Vec<u8>, KvEventError> {
    let mut payload = Vec::new();
    // Struct-as-map for the events; the batch writes itself as an array.
    let mut serializer = rmp_serde::Serializer::new(&mut payload).with_struct_map();
    batch.serialize(&mut serializer)?;
    Ok(payload)
}

/// Decodes a payload of at most [`MAX_BATCH_BYTES`] (see the module doc for the rules).
pub fn decode_batch(payload: &[u8]) -> Result<KvEventBatch, KvEventError> {
    decode_batch_limited(payload, MAX_BATCH_BYTES)
}

/// [`decode_batch`] with another size limit; a longer payload is refused unread.
pub fn decode_batch_limited(payload: &[u8], limit: usize) -> Result<KvEventBatch, KvEventError> {
    if payload.len() > limit {
        return Err(KvEventError::TooLarge {
            len: payload.len(),
            limit,
        });
    }
    // Over a reader, a string or bin is read as far as its bytes go, whatever length
    // its header claims; containers reserve at most a bounded count up front.
    let mut deserializer = rmp_serde::Deserializer::new(Cursor::new(payload));
    deserializer.set_max_depth(MAX_DEPTH);
    let batch = KvEventBatch::deserialize(&mut deserializer)?;
    let read = usize::try_from(deserializer.position()).unwrap_or(usize::MAX);
    match payload.len().saturating_sub(read) {
        0 => Ok(batch),
        trailing => Err(KvEventError::TrailingBytes(trailing)),
    }
}

/// The three frames vLLM's `ZmqEventPublisher` sends for one batch: the topic, the
/// sequence number as 8 big-endian bytes, the payload.
pub fn encode_message(
    topic: &str,
    seq: u64,
    batch: &KvEventBatch,
) -> Result<[Vec<u8>; 3], KvEventError> {
    Ok([
        topic.as_bytes().to_vec(),
        seq.to_be_bytes().to_vec(),
        encode_batch(batch)?,
    ])
}

/// Decodes the frames of one received message; anything but 3 frames, or a sequence
/// frame of other than 8 bytes, is refused.
pub fn decode_message(parts: &[&[u8]]) -> Result<KvEventMessage, KvEventError> {
    let [topic, seq, payload] = parts else {
        return Err(KvEventError::PartCount(parts.len()));
    };
    Ok(KvEventMessage {
        topic: std::str::from_utf8(topic)
            .map_err(|_| KvEventError::TopicNotUtf8)?
            .to_owned(),
        seq: decode_seq(seq)?,
        batch: decode_batch(payload)?,
    })
}

/// A sequence number frame: exactly 8 bytes, big-endian.
pub fn decode_seq(frame: &[u8]) -> Result<u64, KvEventError> {
    let bytes: [u8; SEQ_BYTES] = frame
        .try_into()
        .map_err(|_| KvEventError::SeqLength(frame.len()))?;
    Ok(u64::from_be_bytes(bytes))
}
