//! vLLM's KV-cache events: the messages a worker publishes over ZMQ PUB whenever
//! blocks enter or leave its prefix cache, as Rust types and codecs that are exact on
//! the wire. A router that knows which worker holds which blocks can send a request
//! where its prefix is already cached (issue 16).
//!
//! This module owns the event types ([`KvEventBatch`], [`KvEvent`], [`BlockStored`],
//! [`BlockRemoved`]), the payload codec ([`encode_batch`], [`decode_batch`]) and the
//! three-part ZMQ message framing ([`encode_message`], [`decode_message`]), as pure
//! functions: sockets, the replay channel and the router's index live elsewhere.
//!
//! # What it follows
//!
//! `vllm/distributed/kv_events.py` of **vLLM 0.26.0**, checked byte for byte against a
//! recording of real vLLM 0.26.0 (`shared/fixtures/vllm-0.26/kv_events.jsonl`). The
//! payload is msgspec's msgpack encoding of a `KVEventBatch`:
//!
//! - the batch (`EventBatch`, `array_like=True`) is a 3-element array
//!   `[ts, events, data_parallel_rank]`, every element always present;
//! - each event (`KVCacheEvent`, `tag=True`, `omit_defaults=True`, *not* array-like
//!   since vLLM PR #42892) is a map whose first key is the tag `"type"` (the class
//!   name), then the fields in declaration order, where a field that has a default
//!   (`= None`) is left out while it holds that default and a field without one is
//!   always written, `nil` included;
//! - every integer takes msgpack's smallest form for its value (msgspec encodes
//!   Python's `int` by value: `100` is `0x64`, `128000` is `ce 0001f400`, a block hash
//!   at or above 2^32 is `cf` + 8 bytes and a small one would be a fixint), `ts` is
//!   always a float64 (`cb`), strings are fixstr/str8/str16/str32 by length.
//!
//! The hand-built cases in the tests, and each decoding rule below, were checked against
//! msgspec 0.23.0 with vLLM 0.26's class options.
//!
//! Older vLLM releases wrote events as positional arrays (`["BlockStored", …]`); 0.26
//! does not, and neither does this module: such an event is refused.
//!
//! # Decoding rules (msgspec's, for hostile input)
//!
//! [`decode_batch`] refuses a payload over [`MAX_BATCH_BYTES`] before parsing it,
//! never panics, and otherwise decides as msgspec's decoder in vLLM would:
//!
//! - an event map's unknown keys are ignored (msgspec's default for structs), so a
//!   field a later vLLM adds does not break decoding; an unknown `type` is an error
//!   (msgspec fails on an unknown tag), as is an event without one;
//! - the tag may come anywhere in the map (msgspec looks it up first); a known key that
//!   does not belong to the tagged event type is ignored; a key given twice keeps its
//!   last value; two different tags are an error. One difference, where vLLM never
//!   goes: keys before a late tag are decoded with `BlockStored`'s types, so a
//!   mistyped key that the tagged type lacks is an error where msgspec ignores it;
//! - a field without a default must be present, even when its value may be `nil`;
//!   missing defaulted fields take `None`;
//! - the batch array may be shorter by its defaulted tail (`data_parallel_rank`) and
//!   may carry extra trailing elements, which are ignored (msgspec's `array_like`);
//!   `ts` may be any msgpack number;
//! - bytes after the batch are an error, as in `msgspec.msgpack.decode`.
//!
//! Where the Rust types are narrower than Python's `int` (see each field), a value out
//! of their range is refused; vLLM never writes one. Block hashes must be integers:
//! the `bytes` form of `ExternalBlockHash` (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`)
//! is refused.

mod codec;
mod de;
mod value;

#[cfg(test)]
mod tests;

use serde::Serialize;
use serde::ser::{SerializeTuple, Serializer};

pub use codec::{
    KvEventError, KvEventMessage, MAX_BATCH_BYTES, SEQ_BYTES, decode_batch, decode_batch_limited,
    decode_message, decode_seq, encode_batch, encode_message,
};
pub use value::AnyValue;

/// vLLM's `KVEventBatch`: the events of one scheduler step, published as one message.
#[derive(Debug, Clone, PartialEq)]
pub struct KvEventBatch {
    /// `time.time()` when the step's events were taken, in seconds.
    pub ts: f64,
    pub events: Vec<KvEvent>,
    /// The publisher's data-parallel rank; vLLM's publisher fills it (0 without DP).
    pub data_parallel_rank: Option<u32>,
}

/// `BlockStored.extra_keys`: per block, the tuple of extra keys of its hash, or `None`.
pub type ExtraKeys = Vec<Option<Vec<AnyValue>>>;

/// One KV-cache event, tagged on the wire by `"type"`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum KvEvent {
    BlockStored(BlockStored),
    BlockRemoved(BlockRemoved),
    /// The whole prefix cache was reset (`reset_prefix_cache`).
    AllBlocksCleared,
}

/// Newly full blocks of one request entered the prefix cache (one contiguous run, one
/// KV-cache group). Fields in vLLM 0.26's order, which is the wire order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockStored {
    /// The 64-bit form of each block's hash (`ExternalBlockHash` as an int).
    pub block_hashes: Vec<u64>,
    /// The hash of the block before the first stored one; `None` from block 0.
    pub parent_block_hash: Option<u64>,
    /// The tokens of the stored blocks, `block_size` per block.
    pub token_ids: Vec<u32>,
    pub block_size: u32,
    /// Deprecated in vLLM in favour of `lora_name`; still always written.
    pub lora_id: Option<u64>,
    /// Where the blocks live: `"GPU"` from the block pool, `"CPU"` from offloading.
    pub medium: Option<String>,
    pub lora_name: Option<String>,
    /// The extra keys of each block's hash (LoRA name, multimodal ids, cache salt…),
    /// one entry per block; omitted from the wire when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_keys: Option<ExtraKeys>,
    /// The KV-cache group; omitted from the wire when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_idx: Option<u32>,
    /// The group's attention kind (`"full_attention"`, `"sliding_window"`, …), kept as
    /// a string since vLLM adds kinds; omitted from the wire when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_cache_spec_kind: Option<String>,
    /// The sliding window of a sliding-window group; omitted from the wire when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_cache_spec_sliding_window: Option<u32>,
}

impl BlockStored {
    /// A run of blocks in KV-cache group 0 with none of the optional extras (no LoRA,
    /// no extra keys, no attention kind): the plain case of a vLLM GPU block pool.
    pub fn new(
        block_hashes: Vec<u64>,
        parent_block_hash: Option<u64>,
        token_ids: Vec<u32>,
        block_size: u32,
        medium: &str,
    ) -> Self {
        Self {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            lora_id: None,
            medium: Some(medium.to_owned()),
            lora_name: None,
            extra_keys: None,
            group_idx: Some(0),
            kv_cache_spec_kind: None,
            kv_cache_spec_sliding_window: None,
        }
    }
}

/// Cached blocks were evicted. Fields in vLLM 0.26's order, which is the wire order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockRemoved {
    pub block_hashes: Vec<u64>,
    pub medium: Option<String>,
    /// The KV-cache group; omitted from the wire when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_idx: Option<u32>,
}

/// The batch is an array (msgspec `array_like`): `[ts, events, data_parallel_rank]`,
/// every element written, `nil` included. A struct-map serializer (which the events
/// need) would make a derived impl a map, hence this one.
impl Serialize for KvEventBatch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut array = serializer.serialize_tuple(3)?;
        array.serialize_element(&self.ts)?;
        array.serialize_element(&self.events)?;
        array.serialize_element(&self.data_parallel_rank)?;
        array.end()
    }
}
