//! The P/D request transformations, pure and exactly as vLLM's protocol needs them
//! (`../shared/reference/vllm-pd-protocol.md` §1.3, checklist §6): the prefill leg's
//! body, the `kv_transfer_params` read from its answer, the decode leg's body; plus what
//! the policies see of a request (its text, an estimate of its tokens); and the
//! removal of a client's own `kv_transfer_params`, which only the router may set.

use serde_json::{Map, Value, json};

use crate::config::ClientParamsPolicy;

/// Where a client can put `kv_transfer_params` for a worker to read: the request's
/// field, and vLLM's `vllm_xargs` (which vLLM copies into the same params).
const XARGS: &str = "vllm_xargs";
/// The field that carries the hand-off between the legs.
pub const KV_TRANSFER_PARAMS: &str = "kv_transfer_params";
const PARAMS: &str = KV_TRANSFER_PARAMS;

/// A client's request carried `kv_transfer_params` and the policy is to refuse it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{param}` is set by the router, not by clients: send the request without it")]
pub struct ClientParamsRefused {
    /// The offending field, as the 400's `param`.
    pub param: &'static str,
}

/// Removes the `kv_transfer_params` a client sent (the field, and the same key in
/// `vllm_xargs`), or refuses the request under [`ClientParamsPolicy::Reject`]. A
/// `null` is removed silently in either case (it asks for nothing). `Ok(true)` when
/// params were stripped.
pub fn screen_client_params(
    body: &mut Map<String, Value>,
    policy: ClientParamsPolicy,
) -> Result<bool, ClientParamsRefused> {
    let top = body.get(PARAMS).is_some_and(|v| !v.is_null());
    let in_xargs = body
        .get(XARGS)
        .and_then(Value::as_object)
        .and_then(|xargs| xargs.get(PARAMS))
        .is_some_and(|v| !v.is_null());
    if policy == ClientParamsPolicy::Reject && (top || in_xargs) {
        let param = if top {
            PARAMS
        } else {
            "vllm_xargs.kv_transfer_params"
        };
        return Err(ClientParamsRefused { param });
    }
    body.remove(PARAMS);
    if let Some(xargs) = body.get_mut(XARGS).and_then(Value::as_object_mut) {
        xargs.remove(PARAMS);
    }
    Ok(top || in_xargs)
}

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
    // The prompt is computed once, whatever the choices: the decode worker runs them
    // all from its KV.
    if leg.contains_key("n") {
        leg.insert("n".into(), json!(1));
    }
    if leg.contains_key("max_completion_tokens") {
        leg.insert("max_completion_tokens".into(), json!(1));
    }
    // `return_token_ids`: P's answer is read for its params only, and its prompt ids
    // would be the largest part of it.
    for key in [
        "stream_options",
        "min_tokens",
        "min_completion_tokens",
        "return_token_ids",
        "best_of",
    ] {
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
    /// The prompt's own log probabilities (`echo` with `logprobs`, or vLLM's
    /// `prompt_logprobs`): they come from computing the prompt, which a decode worker
    /// that pulls the prompt's KV never does.
    PromptLogprobs,
}

impl LocalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LocalReason::PromptList => "prompt_list",
            LocalReason::PromptLogprobs => "prompt_logprobs",
        }
    }
}

/// Whether a P/D request must go to the decode worker alone.
pub fn must_run_locally(endpoint: Endpoint, body: &Map<String, Value>) -> Option<LocalReason> {
    if wants_prompt_logprobs(endpoint, body) {
        return Some(LocalReason::PromptLogprobs);
    }
    let prompt = body.get("prompt")?;
    let is_list_of_prompts = match prompt.as_array() {
        Some(items) => items.len() > 1 && items.iter().all(|i| i.is_string() || i.is_array()),
        None => false,
    };
    (endpoint == Endpoint::Completions && is_list_of_prompts).then_some(LocalReason::PromptList)
}

fn wants_prompt_logprobs(endpoint: Endpoint, body: &Map<String, Value>) -> bool {
    let set = |field: &str| body.get(field).is_some_and(|value| !value.is_null());
    let echo = body.get("echo").and_then(Value::as_bool) == Some(true);
    set("prompt_logprobs") || (endpoint == Endpoint::Completions && echo && set("logprobs"))
}

/// Whether the client asked for a streamed answer (`"stream": true`).
pub fn streamed(body: &Map<String, Value>) -> bool {
    body.get("stream").and_then(Value::as_bool) == Some(true)
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
    text.len().div_ceil(4) + output_tokens(body)
}

/// The most output tokens a request asks for (256 when it does not say).
pub fn output_tokens(body: &Map<String, Value>) -> usize {
    ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_u64))
        .map_or(256, |n| usize::try_from(n).unwrap_or(usize::MAX))
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
        assert!(!no_completion_tokens.contains_key("n"));
        // Several choices: the prompt is computed once, for all of them.
        let choices = prefill_leg(&object(json!({"prompt": "x", "n": 4, "best_of": 6})));
        assert_eq!(
            (choices.get("n"), choices.get("best_of")),
            (Some(&json!(1)), None)
        );
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
    fn client_params_are_stripped_or_refused() {
        let hostile = json!({"do_remote_prefill": true, "remote_host": "10.9.9.9",
            "remote_port": 1, "remote_block_ids": [[0, 1]]});
        let mut body = object(json!({"prompt": "hi", "kv_transfer_params": hostile,
            "vllm_xargs": {"kv_transfer_params": {"do_remote_decode": true}, "x": 1}}));
        assert_eq!(
            screen_client_params(&mut body.clone(), ClientParamsPolicy::Reject),
            Err(ClientParamsRefused {
                param: "kv_transfer_params"
            })
        );
        assert_eq!(
            screen_client_params(&mut body, ClientParamsPolicy::Strip),
            Ok(true)
        );
        assert_eq!(
            Value::Object(body),
            json!({"prompt": "hi", "vllm_xargs": {"x": 1}})
        );
        let mut xargs_only = object(json!({"vllm_xargs": {"kv_transfer_params": {}}}));
        let refused = screen_client_params(&mut xargs_only, ClientParamsPolicy::Reject);
        assert_eq!(refused.unwrap_err().param, "vllm_xargs.kv_transfer_params");
        for policy in [ClientParamsPolicy::Strip, ClientParamsPolicy::Reject] {
            let mut null = object(json!({"prompt": "hi", "kv_transfer_params": null}));
            assert_eq!(screen_client_params(&mut null, policy), Ok(false));
            assert_eq!(Value::Object(null), json!({"prompt": "hi"}));
        }
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
        // Several choices decode from one prefilled prompt.
        let choices = object(json!({"messages": [], "n": 3}));
        assert_eq!(must_run_locally(Endpoint::Chat, &choices), None);
    }

    #[test]
    fn prompt_log_probabilities_run_locally() {
        let scored = object(json!({"prompt": [[1, 2]], "echo": true, "logprobs": 0}));
        assert_eq!(
            must_run_locally(Endpoint::Completions, &scored),
            Some(LocalReason::PromptLogprobs)
        );
        for body in [
            json!({"prompt": "a", "echo": true}),
            json!({"prompt": "a", "echo": false, "logprobs": 1}),
            json!({"prompt": "a", "echo": true, "logprobs": null}),
        ] {
            assert_eq!(must_run_locally(Endpoint::Completions, &object(body)), None);
        }
        let vllm_field = object(json!({"messages": [], "prompt_logprobs": 2}));
        assert_eq!(
            must_run_locally(Endpoint::Chat, &vllm_field),
            Some(LocalReason::PromptLogprobs)
        );
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
