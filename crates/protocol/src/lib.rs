//! Shared wire types, with no I/O.
//!
//! - [`openai`]: the OpenAI-compatible API as vLLM serves it: requests, responses,
//!   stream chunks, the model list and the error body.

pub mod openai;
