//! [`AnyValue`]: a msgpack value where vLLM's type is `Any` (the items of
//! `BlockStored.extra_keys`), kept so that it re-encodes as msgspec would.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};

/// At most this many elements are reserved up front for an array or map, whatever
/// length its header claims; longer ones grow as their elements actually arrive.
const MAX_RESERVED: usize = 1024;

/// One msgpack value as msgspec decodes it into a Python object and encodes it back.
///
/// Integers: `UInt` holds every value ≥ 0 and `Int` the negative ones (decoding keeps
/// that split; both encode in msgpack's smallest form for the value, as msgspec does).
/// Floats are `f64` (msgspec turns a float32 into a Python float, written back as
/// float64). Msgpack extension types are refused: vLLM's extra keys are strings,
/// integers, bytes and tuples of them.
#[derive(Debug, Clone, PartialEq)]
pub enum AnyValue {
    Nil,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Bin(Vec<u8>),
    Array(Vec<AnyValue>),
    Map(Vec<(AnyValue, AnyValue)>),
}

impl Serialize for AnyValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            AnyValue::Nil => serializer.serialize_unit(),
            AnyValue::Bool(b) => serializer.serialize_bool(*b),
            AnyValue::Int(i) => serializer.serialize_i64(*i),
            AnyValue::UInt(u) => serializer.serialize_u64(*u),
            AnyValue::Float(x) => serializer.serialize_f64(*x),
            AnyValue::Str(s) => serializer.serialize_str(s),
            AnyValue::Bin(bytes) => serializer.serialize_bytes(bytes),
            AnyValue::Array(items) => serializer.collect_seq(items),
            AnyValue::Map(entries) => serialize_entries(entries, serializer),
        }
    }
}

fn serialize_entries<S: Serializer>(
    entries: &[(AnyValue, AnyValue)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut map = serializer.serialize_map(Some(entries.len()))?;
    for (key, value) in entries {
        map.serialize_entry(key, value)?;
    }
    map.end()
}

impl<'de> Deserialize<'de> for AnyValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(AnyVisitor)
    }
}

struct AnyVisitor;

impl<'de> Visitor<'de> for AnyVisitor {
    type Value = AnyValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a msgpack value other than an extension type")
    }

    fn visit_unit<E: de::Error>(self) -> Result<AnyValue, E> {
        Ok(AnyValue::Nil)
    }

    fn visit_none<E: de::Error>(self) -> Result<AnyValue, E> {
        Ok(AnyValue::Nil)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<AnyValue, D::Error> {
        AnyValue::deserialize(deserializer)
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<AnyValue, E> {
        Ok(AnyValue::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, i: i64) -> Result<AnyValue, E> {
        Ok(u64::try_from(i).map_or(AnyValue::Int(i), AnyValue::UInt))
    }

    fn visit_u64<E: de::Error>(self, u: u64) -> Result<AnyValue, E> {
        Ok(AnyValue::UInt(u))
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> Result<AnyValue, E> {
        Ok(AnyValue::Float(x))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<AnyValue, E> {
        Ok(AnyValue::Str(s.to_owned()))
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<AnyValue, E> {
        Ok(AnyValue::Bin(bytes.to_vec()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AnyValue, A::Error> {
        let mut items = Vec::with_capacity(reserve(seq.size_hint()));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(AnyValue::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnyValue, A::Error> {
        let mut entries = Vec::with_capacity(reserve(map.size_hint()));
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(AnyValue::Map(entries))
    }
}

/// How many elements to reserve for a container whose header claims `hint`.
fn reserve(hint: Option<usize>) -> usize {
    hint.unwrap_or(0).min(MAX_RESERVED)
}
