//! tandem's built-in inference engine.
//!
//! - [`model`]: model configuration, loading (GGUF, Hugging Face safetensors) and the
//!   batched forward pass over a paged KV store.
//! - [`kernels`]: CPU compute kernels (quantized mat-vec, f32 GEMM, a spinning thread pool).
//! - [`kv`]: the block-addressed KV store the forward pass reads and writes.
//! - [`exec`]: where forward passes run (CPU, or a GPU with the `cuda` feature);
//!   [`cuda`]: the GPU engine; [`e4m3`]: the FP8 format of its `--quantization fp8`.
//! - [`tokenizer`], [`chat`]: text in and out; [`tools`]: tool calls in generated text.
//! - [`sample`]: turning logits into the next token; [`constrain`]: structured output
//!   (the grammar a sequence's tokens must follow).
//! - [`generate`]: one prompt, one sequence, no server (what `tandem generate` runs).
//! - [`sched`]: the engine loop that serves many sequences at once.
//! - [`fetch`]: where the default model lives and how it is obtained.
//! - [`loaded`]: weights, tokenizer and chat template loaded together.
//! - [`transfer`]: the prefill/decode KV hand-off between workers.
//! - [`kv_events`]: publishing the prefix cache's block events (vLLM's KV events).
//! - [`api`]: the worker's OpenAI-compatible HTTP API; [`metrics`]: its metric names.

pub mod api;
pub mod chat;
pub mod constrain;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod e4m3;
pub mod error;
pub mod exec;
pub mod fetch;
pub mod generate;
pub mod kernels;
pub mod kv;
pub mod kv_events;
pub mod loaded;
pub mod metrics;
pub mod model;
pub mod sample;
pub mod sched;
pub mod tokenizer;
pub mod tools;
pub mod transfer;

pub use error::ModelError;
pub use loaded::LoadedModel;
