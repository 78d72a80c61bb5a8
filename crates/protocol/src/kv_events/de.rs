//! Decoding the batch and its events with msgspec's rules (see the module doc).
//!
//! Hand-written rather than derived: the batch is a positional array that tolerates a
//! missing default tail and extra trailing elements, and serde's derive for an
//! internally tagged enum buffers every event whole (each integer of `token_ids`
//! becomes a 32-byte `Content`) before it reads the tag. Here each field is decoded
//! once, straight into its typed slot.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{BlockRemoved, BlockStored, ExtraKeys, KvEvent, KvEventBatch};

impl<'de> Deserialize<'de> for KvEventBatch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(BatchVisitor)
    }
}

struct BatchVisitor;

impl<'de> Visitor<'de> for BatchVisitor {
    type Value = KvEventBatch;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a KVEventBatch array [ts, events, data_parallel_rank]")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KvEventBatch, A::Error> {
        let ts = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(0, &self))?;
        let events = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(1, &self))?;
        // `data_parallel_rank` defaults to None, so a two-element batch is whole.
        let data_parallel_rank = seq.next_element::<Option<u32>>()?.flatten();
        // msgspec skips the trailing elements of an array-like struct (fields a later
        // vLLM appends).
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(KvEventBatch {
            ts,
            events,
            data_parallel_rank,
        })
    }
}

impl<'de> Deserialize<'de> for KvEvent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EventVisitor)
    }
}

struct EventVisitor;

impl<'de> Visitor<'de> for EventVisitor {
    type Value = KvEvent;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a KV event map tagged by \"type\"")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KvEvent, A::Error> {
        let mut fields = EventFields::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Tag => fields.set_kind(map.next_value()?)?,
                Key::Field(field) if fields.wants(field) => fields.read(field, &mut map)?,
                Key::Field(_) | Key::Unknown => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        fields.finish()
    }
}

/// The event types vLLM 0.26 defines, by their tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventKind {
    Stored,
    Removed,
    Cleared,
}

const TAGS: &[&str] = &["BlockStored", "BlockRemoved", "AllBlocksCleared"];

impl EventKind {
    fn has(self, field: Field) -> bool {
        match self {
            EventKind::Stored => true,
            EventKind::Removed => {
                matches!(field, Field::BlockHashes | Field::Medium | Field::GroupIdx)
            }
            EventKind::Cleared => false,
        }
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(KindVisitor)
    }
}

struct KindVisitor;

impl Visitor<'_> for KindVisitor {
    type Value = EventKind;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a KV event type name")
    }

    fn visit_str<E: de::Error>(self, tag: &str) -> Result<EventKind, E> {
        match tag {
            "BlockStored" => Ok(EventKind::Stored),
            "BlockRemoved" => Ok(EventKind::Removed),
            "AllBlocksCleared" => Ok(EventKind::Cleared),
            other => Err(E::unknown_variant(other, TAGS)),
        }
    }
}

/// The data fields of all event types (`BlockStored` has them all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    BlockHashes,
    ParentBlockHash,
    TokenIds,
    BlockSize,
    LoraId,
    Medium,
    LoraName,
    ExtraKeys,
    GroupIdx,
    KvCacheSpecKind,
    KvCacheSpecSlidingWindow,
}

/// A key of an event map.
enum Key {
    Tag,
    Field(Field),
    Unknown,
}

impl Key {
    fn from_name(name: &str) -> Key {
        let field = match name {
            "type" => return Key::Tag,
            "block_hashes" => Field::BlockHashes,
            "parent_block_hash" => Field::ParentBlockHash,
            "token_ids" => Field::TokenIds,
            "block_size" => Field::BlockSize,
            "lora_id" => Field::LoraId,
            "medium" => Field::Medium,
            "lora_name" => Field::LoraName,
            "extra_keys" => Field::ExtraKeys,
            "group_idx" => Field::GroupIdx,
            "kv_cache_spec_kind" => Field::KvCacheSpecKind,
            "kv_cache_spec_sliding_window" => Field::KvCacheSpecSlidingWindow,
            _ => return Key::Unknown,
        };
        Key::Field(field)
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Key, E> {
        Ok(Key::from_name(name))
    }
}

/// What an event map said so far: the tag, and each field once read (outer `Option`:
/// present or not; inner: the value, which may be `nil`).
#[derive(Default)]
struct EventFields {
    kind: Option<EventKind>,
    block_hashes: Option<Vec<u64>>,
    parent_block_hash: Option<Option<u64>>,
    token_ids: Option<Vec<u32>>,
    block_size: Option<u32>,
    lora_id: Option<Option<u64>>,
    medium: Option<Option<String>>,
    lora_name: Option<Option<String>>,
    extra_keys: Option<Option<ExtraKeys>>,
    group_idx: Option<Option<u32>>,
    kv_cache_spec_kind: Option<Option<String>>,
    kv_cache_spec_sliding_window: Option<Option<u32>>,
}

impl EventFields {
    fn set_kind<E: de::Error>(&mut self, kind: EventKind) -> Result<(), E> {
        match self.kind {
            Some(seen) if seen != kind => Err(E::custom("two different event `type` tags")),
            _ => {
                self.kind = Some(kind);
                Ok(())
            }
        }
    }

    /// Whether to decode `field`: it belongs to the tagged type, or the tag is not
    /// known yet (then a field of another type is decoded and later dropped).
    fn wants(&self, field: Field) -> bool {
        self.kind.is_none_or(|kind| kind.has(field))
    }

    /// Decodes the value of `field`; a repeated key keeps the last value, as msgspec.
    fn read<'de, A: MapAccess<'de>>(&mut self, field: Field, map: &mut A) -> Result<(), A::Error> {
        match field {
            Field::BlockHashes => self.block_hashes = Some(map.next_value()?),
            Field::ParentBlockHash => self.parent_block_hash = Some(map.next_value()?),
            Field::TokenIds => self.token_ids = Some(map.next_value()?),
            Field::BlockSize => self.block_size = Some(map.next_value()?),
            Field::LoraId => self.lora_id = Some(map.next_value()?),
            Field::Medium => self.medium = Some(map.next_value()?),
            Field::LoraName => self.lora_name = Some(map.next_value()?),
            Field::ExtraKeys => self.extra_keys = Some(map.next_value()?),
            Field::GroupIdx => self.group_idx = Some(map.next_value()?),
            Field::KvCacheSpecKind => self.kv_cache_spec_kind = Some(map.next_value()?),
            Field::KvCacheSpecSlidingWindow => {
                self.kv_cache_spec_sliding_window = Some(map.next_value()?)
            }
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<KvEvent, E> {
        match self.kind {
            None => Err(E::missing_field("type")),
            Some(EventKind::Stored) => self.stored().map(KvEvent::BlockStored),
            Some(EventKind::Removed) => self.removed().map(KvEvent::BlockRemoved),
            Some(EventKind::Cleared) => Ok(KvEvent::AllBlocksCleared),
        }
    }

    fn stored<E: de::Error>(self) -> Result<BlockStored, E> {
        Ok(BlockStored {
            block_hashes: required(self.block_hashes, "block_hashes")?,
            parent_block_hash: required(self.parent_block_hash, "parent_block_hash")?,
            token_ids: required(self.token_ids, "token_ids")?,
            block_size: required(self.block_size, "block_size")?,
            lora_id: required(self.lora_id, "lora_id")?,
            medium: required(self.medium, "medium")?,
            lora_name: required(self.lora_name, "lora_name")?,
            extra_keys: self.extra_keys.flatten(),
            group_idx: self.group_idx.flatten(),
            kv_cache_spec_kind: self.kv_cache_spec_kind.flatten(),
            kv_cache_spec_sliding_window: self.kv_cache_spec_sliding_window.flatten(),
        })
    }

    fn removed<E: de::Error>(self) -> Result<BlockRemoved, E> {
        Ok(BlockRemoved {
            block_hashes: required(self.block_hashes, "block_hashes")?,
            medium: required(self.medium, "medium")?,
            group_idx: self.group_idx.flatten(),
        })
    }
}

/// A field without a default in vLLM must be present (msgspec: "Object missing
/// required field"), even where its value may be `nil`.
fn required<T, E: de::Error>(slot: Option<T>, name: &'static str) -> Result<T, E> {
    slot.ok_or_else(|| E::missing_field(name))
}
