//! `--kv-events-config`: vLLM's `KVEventsConfig` (`vllm/config/kv_events.py`), parsed
//! from the same JSON, and vLLM's rule for whether the PUB socket binds or connects.

use serde::Deserialize;
use thiserror::Error;

/// vLLM's `KVEventsConfig`, key for key. Unknown keys and wrongly typed values are
/// refused.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvEventsConfig {
    /// The master switch: without it the block pool records nothing.
    pub enable_kv_cache_events: bool,
    /// `"zmq"` or `"null"`; unset, `zmq` when enabled, else `null` (vLLM #26915).
    pub publisher: Option<PublisherKind>,
    /// The PUB socket's address (see [`PubEndpoint`] for bind or connect).
    pub endpoint: String,
    /// The replay ROUTER socket's address (always bound); none: no replay.
    pub replay_endpoint: Option<String>,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// vLLM's PUB send high-water mark. The zeromq crate's PUB socket has a fixed
    /// queue of 100 000 messages per subscriber (vLLM's default) and no option to
    /// change it, so another value is accepted and ignored, with a warning.
    pub hwm: usize,
    /// Batches queued from the engine loop to the publisher; past it, dropped.
    pub max_queue_size: usize,
    /// The first frame of every message.
    pub topic: String,
}

/// The zeromq crate's fixed per-subscriber PUB queue, vLLM's default `hwm`.
pub const PUB_QUEUE_MESSAGES: usize = 100_000;

impl Default for KvEventsConfig {
    fn default() -> Self {
        Self {
            enable_kv_cache_events: false,
            publisher: None,
            endpoint: "tcp://*:5557".to_owned(),
            replay_endpoint: None,
            buffer_steps: 10_000,
            hwm: PUB_QUEUE_MESSAGES,
            max_queue_size: 100_000,
            topic: String::new(),
        }
    }
}

/// `KVEventsConfig.publisher`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublisherKind {
    /// Publish nothing.
    Null,
    /// vLLM's `ZmqEventPublisher`.
    Zmq,
}

/// Why a `--kv-events-config` value was refused.
#[derive(Debug, Error)]
pub enum KvEventsConfigError {
    #[error("invalid KV events config: {0}")]
    Json(#[from] serde_json::Error),
    #[error("a KV events config is a JSON object (e.g. {{\"enable_kv_cache_events\": true}})")]
    NotAnObject,
    #[error("max_queue_size must be at least 1")]
    ZeroQueue,
    #[error("KV events endpoint `{endpoint}`: {reason}")]
    Endpoint {
        endpoint: String,
        reason: &'static str,
    },
}

impl KvEventsConfig {
    /// Parses and checks the JSON of `--kv-events-config`.
    pub fn from_json(text: &str) -> Result<Self, KvEventsConfigError> {
        let value: serde_json::Value = serde_json::from_str(text)?;
        if !value.is_object() {
            return Err(KvEventsConfigError::NotAnObject);
        }
        let config = Self::deserialize(value)?;
        config.validate()?;
        Ok(config)
    }

    /// Whether events are recorded and published: enabled, and the publisher (or its
    /// default) is `zmq`.
    pub fn publishes(&self) -> bool {
        self.enable_kv_cache_events
            && self.publisher.unwrap_or(PublisherKind::Zmq) == PublisherKind::Zmq
    }

    /// The PUB socket's address and whether it binds.
    pub fn pub_endpoint(&self) -> Result<PubEndpoint, KvEventsConfigError> {
        PubEndpoint::parse(&self.endpoint)
    }

    /// The replay socket's address (always bound), if any.
    pub fn replay_address(&self) -> Result<Option<String>, KvEventsConfigError> {
        self.replay_endpoint
            .as_deref()
            .map(|endpoint| Ok(PubEndpoint::parse(endpoint)?.address))
            .transpose()
    }

    fn validate(&self) -> Result<(), KvEventsConfigError> {
        if self.max_queue_size == 0 {
            return Err(KvEventsConfigError::ZeroQueue);
        }
        self.pub_endpoint()?;
        self.replay_address()?;
        Ok(())
    }
}

/// Whether a socket binds its address or connects to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketMode {
    Bind,
    Connect,
}

/// A PUB endpoint as the zeromq crate takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubEndpoint {
    /// The address, with `*` spelled `0.0.0.0` (the crate resolves hosts by name).
    pub address: String,
    /// vLLM's rule: bind if the endpoint contains `*` or `::` or is `ipc://` or
    /// `inproc://`, else connect.
    pub mode: SocketMode,
}

impl PubEndpoint {
    /// Applies vLLM's bind-or-connect rule. Only `tcp://` is supported (the crate is
    /// built without IPC, and has no `inproc://`).
    pub fn parse(endpoint: &str) -> Result<Self, KvEventsConfigError> {
        let refuse = |reason| KvEventsConfigError::Endpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let binds = endpoint.contains('*')
            || endpoint.contains("::")
            || endpoint.starts_with("ipc://")
            || endpoint.starts_with("inproc://");
        let Some(rest) = endpoint.strip_prefix("tcp://") else {
            return Err(refuse("only tcp:// endpoints are supported"));
        };
        let address = match rest.strip_prefix("*:") {
            Some(port) => format!("tcp://0.0.0.0:{port}"),
            None => endpoint.to_owned(),
        };
        address
            .parse::<zeromq::Endpoint>()
            .map_err(|_| refuse("not a tcp://HOST:PORT address"))?;
        let mode = if binds {
            SocketMode::Bind
        } else {
            SocketMode::Connect
        };
        Ok(Self { address, mode })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_vllms() {
        let config = KvEventsConfig::from_json("{}").unwrap();
        assert_eq!(config, KvEventsConfig::default());
        assert!(!config.publishes());
        assert_eq!(config.endpoint, "tcp://*:5557");
        assert_eq!(
            (config.buffer_steps, config.hwm, config.max_queue_size),
            (10_000, 100_000, 100_000)
        );
        assert_eq!(config.replay_endpoint, None);
        assert_eq!(config.topic, "");
    }

    #[test]
    fn the_publisher_defaults_to_zmq_once_enabled() {
        let on = KvEventsConfig::from_json(r#"{"enable_kv_cache_events": true}"#).unwrap();
        assert!(on.publishes());
        let null = r#"{"enable_kv_cache_events": true, "publisher": "null"}"#;
        assert!(!KvEventsConfig::from_json(null).unwrap().publishes());
        let off = r#"{"enable_kv_cache_events": false, "publisher": "zmq"}"#;
        assert!(!KvEventsConfig::from_json(off).unwrap().publishes());
    }

    #[test]
    fn every_key_is_read() {
        let config = KvEventsConfig::from_json(
            r#"{"enable_kv_cache_events": true, "publisher": "zmq",
                "endpoint": "tcp://127.0.0.1:6000", "replay_endpoint": "tcp://*:6001",
                "buffer_steps": 5, "hwm": 7, "max_queue_size": 9, "topic": "kv-events"}"#,
        )
        .unwrap();
        assert_eq!(config.endpoint, "tcp://127.0.0.1:6000");
        assert_eq!(config.replay_endpoint.as_deref(), Some("tcp://*:6001"));
        assert_eq!(
            (config.buffer_steps, config.hwm, config.max_queue_size),
            (5, 7, 9)
        );
        assert_eq!(config.topic, "kv-events");
        assert_eq!(
            config.replay_address().unwrap().as_deref(),
            Some("tcp://0.0.0.0:6001")
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_by_name() {
        let unknown = KvEventsConfig::from_json(r#"{"enable_kv_events": true}"#).unwrap_err();
        assert!(
            unknown.to_string().contains("enable_kv_events"),
            "{unknown}"
        );
        for bad in [
            r#"{"enable_kv_cache_events": "yes"}"#,
            r#"{"buffer_steps": -1}"#,
            r#"{"hwm": 1.5}"#,
            r#"{"topic": 3}"#,
            r#"{"publisher": "kafka"}"#,
            r#"{"max_queue_size": 0}"#,
            r#"{"endpoint": "ipc:///tmp/kv"}"#,
            r#"{"endpoint": "tcp://nohost"}"#,
            r#"{"replay_endpoint": "inproc://x"}"#,
            "[]",
        ] {
            assert!(KvEventsConfig::from_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_pub_socket_binds_or_connects_as_vllms_does() {
        let cases = [
            ("tcp://*:5557", "tcp://0.0.0.0:5557", SocketMode::Bind),
            ("tcp://[::]:5557", "tcp://[::]:5557", SocketMode::Bind),
            (
                "tcp://127.0.0.1:5557",
                "tcp://127.0.0.1:5557",
                SocketMode::Connect,
            ),
            (
                "tcp://router.local:5557",
                "tcp://router.local:5557",
                SocketMode::Connect,
            ),
        ];
        for (endpoint, address, mode) in cases {
            let parsed = PubEndpoint::parse(endpoint).unwrap();
            assert_eq!(parsed.address, address, "{endpoint}");
            assert_eq!(parsed.mode, mode, "{endpoint}");
        }
    }
}
