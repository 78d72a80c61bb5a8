//! KV-cache events published by this worker, in vLLM 0.26's exact format
//! (`--kv-events-config`, issue 16): which blocks enter and leave the prefix cache, so
//! that a router can send a request where its prefix is already cached.
//!
//! This module owns the configuration ([`KvEventsConfig`], vLLM's `KVEventsConfig`),
//! the queue from the engine loop ([`KvEventSink`], numbering each step's batch) and
//! the publisher task ([`start_publisher`]: a ZMQ PUB socket, a replay ring and the
//! replay ROUTER socket). The block pool records the events themselves
//! (`crate::kv::pool`); the message types and codecs are `tandem_protocol::kv_events`.
//!
//! - `config`: parsing `--kv-events-config` and vLLM's bind-or-connect rule.
//! - `sink`: the engine's non-blocking end; a batch that finds the queue full is
//!   dropped but keeps its sequence number, so subscribers see a gap.
//! - `publisher`: the sockets.

mod config;
mod publisher;
mod sink;

pub use config::{
    KvEventsConfig, KvEventsConfigError, PUB_QUEUE_MESSAGES, PubEndpoint, PublisherKind, SocketMode,
};
pub use publisher::{END_SEQ, KvEventsError, PublisherEndpoints, start_publisher};
pub use sink::{KvEventSink, KvEventSource, NumberedBatch, Sent, channel};
