//! The OpenAI-compatible HTTP API, shaped exactly as vLLM returns it, so that clients,
//! the router and the benchmark treat tandem and vLLM workers alike.
//!
//! - [`request`]: `/v1/completions` and `/v1/chat/completions` request bodies.
//! - [`response`]: full responses, stream chunks, usage and the model list.
//! - [`tokenize`]: `/tokenize` and `/detokenize` bodies.
//! - [`error`]: the `{"error":{...}}` body and [`ApiError`], which carries its status.

pub mod error;
pub mod request;
pub mod response;
pub mod tokenize;

pub use error::{ApiError, ErrorBody, ErrorDetail, ErrorKind};
pub use request::{
    ChatCompletionRequest, ChatMessage, CompletionRequest, ContentPart, MessageContent, Prompt,
    PromptInput, SamplingFields, StopStrings, StreamOptions,
};
pub use response::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta,
    ChatResponseMessage, CompletionChoice, CompletionChunk, CompletionChunkChoice,
    CompletionResponse, ModelCard, ModelList, PromptTokensDetails, UsageInfo,
};
pub use tokenize::{
    DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest, TokenizeCompletionRequest,
    TokenizeResponse,
};
