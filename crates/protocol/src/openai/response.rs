//! Response bodies and stream chunks, field for field as vLLM returns them: full
//! responses carry their null fields (`logprobs`, `stop_reason`, ...), stream chunks
//! carry the fields vLLM sets, and the usage chunk has `choices: []`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `object` of a completion response and of its stream chunks.
pub const TEXT_COMPLETION: &str = "text_completion";
pub const CHAT_COMPLETION: &str = "chat.completion";
pub const CHAT_COMPLETION_CHUNK: &str = "chat.completion.chunk";

/// Token accounting of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UsageInfo {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
    pub completion_tokens: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

impl UsageInfo {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            completion_tokens,
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens }),
        }
    }

    /// The sum of several choices' usage.
    pub fn sum(parts: impl IntoIterator<Item = UsageInfo>) -> Self {
        let (mut prompt, mut completion, mut cached) = (0, 0, 0);
        for part in parts {
            prompt += part.prompt_tokens;
            completion += part.completion_tokens;
            cached += part.cached_tokens();
        }
        Self::new(prompt, completion, cached)
    }

    pub fn cached_tokens(&self) -> usize {
        self.prompt_tokens_details.map_or(0, |d| d.cached_tokens)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// A non-streamed `/v1/completions` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: UsageInfo,
    #[serde(default)]
    pub kv_transfer_params: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    #[serde(default)]
    pub logprobs: Option<Value>,
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub stop_reason: Option<Value>,
    /// vLLM's `return_token_ids`: the prompt's ids (the first chunk only when streamed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// vLLM's `return_token_ids`: the ids of this choice's output (of this chunk's
    /// text when streamed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    /// vLLM's `prompt_logprobs`: `null` for the first prompt token, then a map from
    /// token id to `{"logprob", "rank", "decoded_token"}` for each later one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Value>,
}

/// One `data:` event of a streamed `/v1/completions` response. The usage chunk has no
/// choices and a `usage`; other chunks have no `usage` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChunkChoice {
    pub index: usize,
    pub text: String,
    #[serde(default)]
    pub logprobs: Option<Value>,
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub stop_reason: Option<Value>,
    /// vLLM's `return_token_ids`: the prompt's ids (the first chunk only when streamed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// vLLM's `return_token_ids`: the ids of this choice's output (of this chunk's
    /// text when streamed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// A non-streamed `/v1/chat/completions` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: UsageInfo,
    /// vLLM's `return_token_ids`: the prompt's ids (the first chunk only when streamed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// vLLM's `prompt_logprobs` (see [`CompletionChoice::prompt_logprobs`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Value>,
    #[serde(default)]
    pub kv_transfer_params: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatResponseMessage,
    #[serde(default)]
    pub logprobs: Option<Value>,
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub stop_reason: Option<Value>,
    /// vLLM's `return_token_ids`: the ids of this choice's output (of this chunk's
    /// text when streamed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponseMessage {
    pub role: String,
    /// `null` when the answer is only tool calls.
    pub content: Option<String>,
    /// `[{"id", "type": "function", "function": {"name", "arguments"}}]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
}

/// One `data:` event of a streamed `/v1/chat/completions` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageInfo>,
    /// vLLM's `return_token_ids`: the prompt's ids (the first chunk only when streamed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    #[serde(default)]
    pub logprobs: Option<Value>,
    pub finish_reason: Option<String>,
    /// vLLM's `return_token_ids`: the ids of this choice's output (of this chunk's
    /// text when streamed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// What a chunk adds to a message: the role in the first chunk, then content.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Tool calls, each whole: `[{"index", "id", "type", "function": {"name",
    /// "arguments"}}]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

impl ModelList {
    pub fn new(data: Vec<ModelCard>) -> Self {
        Self {
            object: "list".into(),
            data,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    /// The model's path.
    pub root: String,
    #[serde(default)]
    pub parent: Option<String>,
    pub max_model_len: usize,
}

impl ModelCard {
    pub fn new(id: String, root: String, created: u64, max_model_len: usize) -> Self {
        Self {
            id,
            object: "model".into(),
            created,
            owned_by: "tandem".into(),
            root,
            parent: None,
            max_model_len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn completion_response_matches_vllms_shape() {
        let response = CompletionResponse {
            id: "cmpl-R".into(),
            object: TEXT_COMPLETION.into(),
            created: 1716,
            model: "m".into(),
            choices: vec![CompletionChoice {
                index: 0,
                text: " Paris".into(),
                logprobs: None,
                finish_reason: Some("length".into()),
                stop_reason: None,
                prompt_token_ids: None,
                token_ids: None,
                prompt_logprobs: None,
            }],
            usage: UsageInfo::new(5, 1, 0),
            kv_transfer_params: None,
        };
        assert_eq!(
            serde_json::to_value(&response).unwrap(),
            json!({"id": "cmpl-R", "object": "text_completion", "created": 1716, "model": "m",
                   "choices": [{"index": 0, "text": " Paris", "logprobs": null,
                                "finish_reason": "length", "stop_reason": null}],
                   "usage": {"prompt_tokens": 5, "total_tokens": 6, "completion_tokens": 1,
                             "prompt_tokens_details": {"cached_tokens": 0}},
                   "kv_transfer_params": null})
        );
    }

    #[test]
    fn usage_chunk_has_no_choices_and_other_chunks_no_usage() {
        let chunk = |choices, usage| CompletionChunk {
            id: "cmpl-R".into(),
            object: TEXT_COMPLETION.into(),
            created: 1,
            model: "m".into(),
            choices,
            usage,
        };
        let text = chunk(
            vec![CompletionChunkChoice {
                index: 0,
                text: " Par".into(),
                logprobs: None,
                finish_reason: None,
                stop_reason: None,
                prompt_token_ids: None,
                token_ids: None,
            }],
            None,
        );
        let json = serde_json::to_value(&text).unwrap();
        assert!(json.get("usage").is_none());
        assert_eq!(json["choices"][0]["finish_reason"], Value::Null);
        let usage = serde_json::to_value(chunk(vec![], Some(UsageInfo::new(5, 16, 0)))).unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 21);
    }

    #[test]
    fn first_chat_delta_has_role_and_empty_content_later_ones_content_only() {
        let first = ChatDelta {
            role: Some("assistant".into()),
            content: Some(String::new()),
            tool_calls: None,
        };
        assert_eq!(
            serde_json::to_value(first).unwrap(),
            json!({"role": "assistant", "content": ""})
        );
        let later = ChatDelta {
            role: None,
            content: Some("Hi".into()),
            tool_calls: None,
        };
        assert_eq!(
            serde_json::to_value(later).unwrap(),
            json!({"content": "Hi"})
        );
        assert_eq!(
            serde_json::to_value(ChatDelta::default()).unwrap(),
            json!({})
        );
    }

    #[test]
    fn model_list_matches_vllms_shape() {
        let list = ModelList::new(vec![ModelCard::new("m".into(), "/p".into(), 3, 2048)]);
        assert_eq!(
            serde_json::to_value(list).unwrap(),
            json!({"object": "list", "data": [{"id": "m", "object": "model", "created": 3,
                   "owned_by": "tandem", "root": "/p", "parent": null, "max_model_len": 2048}]})
        );
    }
}
