//! The P/D request transformations, pure and exactly as vLLM's protocol needs them
//! (`../shared/reference/vllm-pd-protocol.md` §1.3, checklist §6): the prefill leg's
//! body, the `kv_transfer_params` read from its answer, the decode leg's body; plus what
//! the policies see of a request (its text, an estimate of its tokens).

use serde_json::{Map, Value, json};

/// Which OpenAI endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat",
        }
    }
}

/// The prefill leg: the client's body, not streamed, one output token, no options that
/// conflict with one token, and `kv_transfer_params` asking P to keep the KV for a
/// remote decode (the toy proxy's exact dict).
pub fn prefill_leg(body: &Map<String, Value>) -> Map<String, Value> {
    let mut leg = body.clone();
    leg.insert("stream".into(), Value::Bool(false));
    leg.insert("max_tokens".into(), json!(1));
    if leg.contains_key("max_completion_tokens") {
        leg.insert("max_completion_tokens".into(), json!(1));
    }
    for key in ["stream_options", "min_tokens", "min_completion_tokens"] {
        leg.remove(key);
    }
    leg.insert(
        "kv_transfer_params".into(),
        json!({
            "do_remote_decode": true,
            "do_remote_prefill": false,
            "remote_engine_id": null,
            "remote_block_ids": null,
            "remote_host": null,
            "remote_port": null,
        }),
    );
    leg
}

/// The `kv_transfer_params` of P's answer, when it carries a usable (non-empty object)
/// one; `None` means D must prefill itself.
pub fn handoff_params(answer: &Value) -> Option<&Map<String, Value>> {
    answer
        .get("kv_transfer_params")?
        .as_object()
        .filter(|params| !params.is_empty())
}

/// The decode leg: the client's body with P's params verbatim (unknown keys kept).
pub fn decode_leg(body: &Map<String, Value>, params: &Map<String, Value>) -> Map<String, Value> {
    let mut leg = body.clone();
    leg.insert("kv_transfer_params".into(), Value::Object(params.clone()));
    leg
}

/// Why a request in P/D mode skips the prefill leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalReason {
    /// A `/v1/completions` prompt list: P would hand off only one prompt's KV.
    PromptList,
}

impl LocalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LocalReason::PromptList => "prompt_list",
        }
    }
}

/// Whether a P/D request must go to the decode worker alone.
pub fn must_run_locally(endpoint: Endpoint, body: &Map<String, Value>) -> Option<LocalReason> {
    let prompt = body.get("prompt")?;
    let is_list_of_prompts = match prompt.as_array() {
        Some(items) => items.len() > 1 && items.iter().all(|i| i.is_string() || i.is_array()),
        None => false,
    };
    (endpoint == Endpoint::Completions && is_list_of_prompts).then_some(LocalReason::PromptList)
}

/// The text a cache-aware policy matches on: the prompt (token ids as text) or the
/// messages' contents.
pub fn request_text(endpoint: Endpoint, body: &Map<String, Value>) -> String {
    match endpoint {
        Endpoint::Completions => body.get("prompt").map(value_text).unwrap_or_default(),
        Endpoint::Chat => body
            .get("messages")
            .and_then(Value::as_array)
            .map(|messages| {
                messages
                    .iter()
                    .map(|m| {
                        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
                        let content = m.get("content").map(value_text).unwrap_or_default();
                        format!("<{role}>{content}")
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(value_text).collect::<Vec<_>>().join(" "),
        Value::Object(map) => map.get("text").map(value_text).unwrap_or_default(),
        other => other.to_string(),
    }
}

/// Prompt plus output tokens, estimated (about 4 characters per token) for load
/// accounting.
pub fn estimated_tokens(text: &str, body: &Map<String, Value>) -> usize {
    let output = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_u64))
        .unwrap_or(256) as usize;
    text.len().div_ceil(4) + output
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn the_prefill_leg_is_the_toy_proxys() {
        let body = object(json!({"model": "m", "prompt": "hi", "max_tokens": 50,
            "max_completion_tokens": 50, "stream": true,
            "stream_options": {"include_usage": true}, "min_tokens": 5,
            "min_completion_tokens": 5, "temperature": 0.7, "custom": [1]}));
        let leg = Value::Object(prefill_leg(&body));
        assert_eq!(
            leg,
            json!({"model": "m", "prompt": "hi", "max_tokens": 1, "max_completion_tokens": 1,
                "stream": false, "temperature": 0.7, "custom": [1],
                "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false,
                    "remote_engine_id": null, "remote_block_ids": null, "remote_host": null,
                    "remote_port": null}})
        );
        let no_completion_tokens = prefill_leg(&object(json!({"prompt": "x"})));
        assert!(!no_completion_tokens.contains_key("max_completion_tokens"));
    }

    #[test]
    fn params_are_read_from_recorded_answers() {
        // Reference §1.3.2, nested block ids (current vLLM).
        let nested = json!({"id": "cmpl-R", "choices": [], "kv_transfer_params": {
            "do_remote_prefill": true, "do_remote_decode": false,
            "remote_block_ids": [[12, 13, 14]], "remote_engine_id": "3c1e",
            "remote_request_id": "cmpl-R-0-1a2b3c4d", "remote_host": "10.0.0.5",
            "remote_port": 5600, "tp_size": 1, "remote_num_tokens": 37}});
        assert_eq!(handoff_params(&nested).unwrap()["remote_port"], json!(5600));
        // Flat block ids (vLLM before 2026-03) pass through untouched.
        let flat = json!({"kv_transfer_params": {"do_remote_prefill": true,
            "remote_block_ids": [1, 2]}});
        assert_eq!(
            handoff_params(&flat).unwrap()["remote_block_ids"],
            json!([1, 2])
        );
        for missing in [
            json!({"choices": []}),
            json!({"kv_transfer_params": null}),
            json!({"kv_transfer_params": {}}),
            json!({"error": {"code": 500}}),
        ] {
            assert!(handoff_params(&missing).is_none(), "{missing}");
        }
    }

    #[test]
    fn the_decode_leg_keeps_the_body_and_the_params_verbatim() {
        let body = object(json!({"prompt": "hi", "stream": true, "max_tokens": 9,
            "stream_options": {"include_usage": true}}));
        let params = object(json!({"do_remote_prefill": true, "remote_block_ids": [[1]],
            "remote_blocks_expiry_time": null, "future_key": {"a": 1}}));
        let leg = decode_leg(&body, &params);
        assert_eq!(leg["stream"], json!(true));
        assert_eq!(leg["max_tokens"], json!(9));
        assert_eq!(leg["stream_options"], json!({"include_usage": true}));
        assert_eq!(leg["kv_transfer_params"], Value::Object(params));
    }

    #[test]
    fn prompt_lists_run_locally() {
        let list = object(json!({"prompt": ["a", "b"]}));
        assert_eq!(
            must_run_locally(Endpoint::Completions, &list),
            Some(LocalReason::PromptList)
        );
        let ids = object(json!({"prompt": [1, 2, 3]}));
        assert_eq!(must_run_locally(Endpoint::Completions, &ids), None);
        let id_lists = object(json!({"prompt": [[1, 2], [3]]}));
        assert!(must_run_locally(Endpoint::Completions, &id_lists).is_some());
        let one = object(json!({"prompt": ["a"]}));
        assert_eq!(must_run_locally(Endpoint::Completions, &one), None);
    }

    #[test]
    fn request_text_covers_prompts_and_messages() {
        let chat = object(
            json!({"messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}),
        );
        assert_eq!(
            request_text(Endpoint::Chat, &chat),
            "<system>Be brief.<user>Hi"
        );
        let ids = object(json!({"prompt": [1, 2]}));
        assert_eq!(request_text(Endpoint::Completions, &ids), "1 2");
        assert_eq!(
            estimated_tokens("abcdefgh", &object(json!({"max_tokens": 10}))),
            12
        );
    }
}
