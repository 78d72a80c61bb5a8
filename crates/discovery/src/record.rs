//! What a worker announces about itself, and where in etcd: one JSON value per worker
//! at `/tandem/<namespace>/workers/<instance>`.

use serde::{Deserialize, Serialize};

/// What a worker does. A tandem worker may change role in place, so the role is in
/// the value, not the key: a change is one put.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerRole {
    /// Whole requests (replicated serving).
    Both,
    Prefill,
    Decode,
}

impl WorkerRole {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerRole::Both => "both",
            WorkerRole::Prefill => "prefill",
            WorkerRole::Decode => "decode",
        }
    }
}

impl std::str::FromStr for WorkerRole {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "both" => Ok(WorkerRole::Both),
            "prefill" => Ok(WorkerRole::Prefill),
            "decode" => Ok(WorkerRole::Decode),
            other => Err(format!("{other:?}: give prefill, decode or both")),
        }
    }
}

/// A worker's KV event stream (vLLM's ZMQ PUB and replay endpoints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEventsEndpoints {
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_endpoint: Option<String>,
}

/// How much a worker can hold, for placement and planning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Sequences it runs at once.
    pub max_num_seqs: usize,
    /// Tokens its KV cache holds.
    pub kv_cache_tokens: usize,
}

/// The value under a worker's key. Unknown fields are ignored on read, so that newer
/// workers can announce more to older routers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Its OpenAI-compatible HTTP endpoint, `http://host:port`.
    pub url: String,
    pub role: WorkerRole,
    /// The model it serves (as `/v1/models` names it).
    pub model: String,
    /// `tandem`, `vllm`, or another engine's name.
    pub engine: String,
    /// The engine's id for this process, when it has one (changes on restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_id: Option<String>,
    /// Where decode workers pull this worker's KV (`host:port`), when it serves
    /// hand-offs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_handoff: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_events: Option<KvEventsEndpoints>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
}

/// The prefix every key of `namespace` starts with.
pub fn namespace_prefix(namespace: &str) -> String {
    format!("/tandem/{namespace}/workers/")
}

/// The key of one worker instance.
pub fn worker_key(namespace: &str, instance: &str) -> String {
    format!("{}{instance}", namespace_prefix(namespace))
}

/// A fresh instance id: 16 hex digits, unique per registration.
pub fn new_instance_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_tolerate_newer_fields() {
        let record = WorkerRecord {
            url: "http://10.0.0.2:8000".into(),
            role: WorkerRole::Decode,
            model: "m".into(),
            engine: "tandem".into(),
            engine_id: Some("e1".into()),
            kv_handoff: Some("10.0.0.2:5600".into()),
            kv_events: Some(KvEventsEndpoints {
                endpoint: "tcp://10.0.0.2:5557".into(),
                replay_endpoint: None,
            }),
            capacity: Some(Capacity {
                max_num_seqs: 64,
                kv_cache_tokens: 100_000,
            }),
        };
        let text = serde_json::to_string(&record).unwrap();
        assert_eq!(serde_json::from_str::<WorkerRecord>(&text).unwrap(), record);
        let newer = r#"{"url":"http://a:1","role":"both","model":"m","engine":"vllm","gpus":8}"#;
        let read: WorkerRecord = serde_json::from_str(newer).unwrap();
        assert_eq!(read.role, WorkerRole::Both);
        assert!(read.kv_events.is_none());
        let nested = r#"{"url":"http://a:1","role":"both","model":"m","engine":"tandem",
            "kv_events":{"endpoint":"tcp://a:2","transport":"zmq"},
            "capacity":{"max_num_seqs":8,"kv_cache_tokens":4096,"lora_slots":2}}"#;
        let read: WorkerRecord = serde_json::from_str(nested).unwrap();
        assert_eq!(read.kv_events.unwrap().endpoint, "tcp://a:2");
        assert_eq!(read.capacity.unwrap().max_num_seqs, 8);
        assert!(serde_json::from_str::<WorkerRecord>(r#"{"url":"http://a:1"}"#).is_err());
    }

    #[test]
    fn keys_live_under_the_namespace() {
        assert_eq!(worker_key("prod", "00ff"), "/tandem/prod/workers/00ff");
        assert!(worker_key("prod", "x").starts_with(&namespace_prefix("prod")));
        assert_ne!(new_instance_id(), new_instance_id());
    }
}
