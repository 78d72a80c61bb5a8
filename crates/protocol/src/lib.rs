//! Shared wire types, with no I/O.
//!
//! - [`openai`]: the OpenAI-compatible API as vLLM serves it: requests, responses,
//!   stream chunks, the model list and the error body.
//! - [`pd`]: `kv_transfer_params`, the field of vLLM's prefill/decode protocol.
//! - [`kv_events`]: vLLM's KV-cache event messages (ZMQ PUB, msgpack) and their framing.
//! - [`exposition`]: the Prometheus text format of engines' `/metrics`, read.

pub mod exposition;
pub mod kv_events;
pub mod openai;
pub mod pd;
