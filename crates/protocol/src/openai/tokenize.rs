//! Bodies of `/tokenize` and `/detokenize`, shaped as vLLM's (`TokenizeCompletionRequest`,
//! `TokenizeChatRequest`, `TokenizeResponse`, `DetokenizeRequest`,
//! `DetokenizeResponse`): the router asks a worker for a request's prompt token ids
//! exactly as the worker feeds them to its model.
//!
//! Unlike the generation bodies, these are small and a misspelt field would silently
//! change the answer, so servers refuse unknown fields ([`TOKENIZE_PROMPT_FIELDS`],
//! [`TOKENIZE_CHAT_FIELDS`], [`DETOKENIZE_FIELDS`] list the known ones).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ChatMessage;

/// Fields of a `/tokenize` body with a `prompt`.
pub const TOKENIZE_PROMPT_FIELDS: &[&str] =
    &["model", "prompt", "add_special_tokens", "return_token_strs"];

/// Fields of a `/tokenize` body with `messages` (vLLM's; a server may still refuse
/// some of them by value, such as `tools`).
pub const TOKENIZE_CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "return_token_strs",
    "chat_template",
    "chat_template_kwargs",
    "tools",
];

/// Fields of a `/detokenize` body.
pub const DETOKENIZE_FIELDS: &[&str] = &["model", "tokens"];

/// `POST /tokenize` with a text prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizeCompletionRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub prompt: String,
    /// Default true: the BOS token (if the model uses one) is added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_special_tokens: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_token_strs: Option<bool>,
}

/// `POST /tokenize` with a conversation, rendered through the chat template.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TokenizeChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    /// Default true.
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    /// Default false.
    #[serde(default)]
    pub continue_final_message: Option<bool>,
    /// Default false (the template writes the special tokens).
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    #[serde(default)]
    pub return_token_strs: Option<bool>,
    #[serde(default)]
    pub chat_template: Option<Value>,
    #[serde(default)]
    pub chat_template_kwargs: Option<Value>,
    #[serde(default)]
    pub tools: Option<Value>,
}

/// The answer of `/tokenize`. `token_strs` is `null` unless asked for (as vLLM
/// serializes it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    #[serde(default)]
    pub token_strs: Option<Vec<String>>,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetokenizeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

/// The answer of `/detokenize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_strs_is_null_when_not_asked_for() {
        let response = TokenizeResponse {
            count: 1,
            max_model_len: 8,
            tokens: vec![5],
            token_strs: None,
        };
        assert_eq!(
            serde_json::to_value(&response).unwrap(),
            serde_json::json!({"count": 1, "max_model_len": 8, "tokens": [5], "token_strs": null})
        );
    }

    #[test]
    fn chat_bodies_parse_with_defaults_left_to_the_server() {
        let request: TokenizeChatRequest =
            serde_json::from_str(r#"{"messages": [{"role": "user", "content": "hi"}]}"#).unwrap();
        assert_eq!(request.messages.len(), 1);
        assert_eq!(request.add_generation_prompt, None);
        assert!(
            serde_json::from_str::<DetokenizeRequest>(r#"{"tokens": [-1]}"#).is_err(),
            "negative ids are not token ids"
        );
    }
}
