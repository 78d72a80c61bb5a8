//! Which request fields `tandem serve` honours. Every field of a completions or chat
//! request is screened before the request is parsed: a field the server honours
//! passes (its value is checked later); a field it does not honour passes only with a
//! value that asks for nothing (`null`, or its default); anything else, unknown
//! fields included, is refused with a 400 that names it. Nothing a client sends is
//! silently dropped. Message parts the model cannot take (images, audio) are refused
//! the same way.

use serde_json::{Map, Value, json};
use tandem_protocol::openai::ApiError;

use super::sse::Endpoint;

/// Fields both endpoints honour.
const HONOURED: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "min_tokens",
    "ignore_eos",
    // Checked later: 1 only.
    "n",
    "stream",
    "stream_options",
    // Checked later: refused when set.
    "logprobs",
    // An end-user id for the operator's logs; nothing to do with the output.
    "user",
    "kv_transfer_params",
    "return_token_ids",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "prompt_logprobs",
    // Structured output (checked in `structured`).
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_whitespace_pattern",
    "guided_decoding_backend",
];

/// Fields only completions honour.
const HONOURED_COMPLETIONS: &[&str] = &["prompt", "echo", "add_special_tokens", "best_of"];

/// Fields only chat honours.
const HONOURED_CHAT: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "add_generation_prompt",
    "continue_final_message",
    // Checked in `tools`.
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    // Without reasoning parsing, there is nothing to hold apart.
    "include_reasoning",
    // OpenAI's prompt-cache routing hint and abuse id: the prefix cache is always on.
    "prompt_cache_key",
    "safety_identifier",
];

/// The values of a field that ask for nothing, besides `null`.
fn inert_values(field: &str, endpoint: Endpoint) -> Option<Vec<Value>> {
    let values = match field {
        "suffix" if endpoint == Endpoint::Completions => vec![json!("")],
        "echo" if endpoint == Endpoint::Chat => vec![json!(false)],
        "functions" | "documents" if endpoint == Endpoint::Chat => vec![json!([])],
        "function_call" if endpoint == Endpoint::Chat => vec![json!("none"), json!("auto")],
        "chat_template" if endpoint == Endpoint::Chat => vec![],
        "chat_template_kwargs" | "mm_processor_kwargs" if endpoint == Endpoint::Chat => {
            vec![json!({})]
        }
        "reasoning_effort" | "audio" | "prediction" | "web_search_options" | "verbosity"
        | "metadata"
            if endpoint == Endpoint::Chat =>
        {
            vec![]
        }
        "store" | "add_special_tokens" if endpoint == Endpoint::Chat => vec![json!(false)],
        "service_tier" if endpoint == Endpoint::Chat => vec![json!("auto"), json!("default")],
        "modalities" if endpoint == Endpoint::Chat => vec![json!(["text"])],
        "use_beam_search"
        | "return_tokens_as_token_ids"
        | "return_token_offsets"
        | "include_stop_str_in_output" => vec![json!(false)],
        "skip_special_tokens" | "spaces_between_special_tokens" => vec![json!(true)],
        "length_penalty" => vec![json!(1), json!(1.0)],
        "priority" => vec![json!(0)],
        "bad_words" => vec![json!([])],
        "vllm_xargs" => vec![json!({})],
        "logprob_token_ids"
        | "allowed_token_ids"
        | "truncate_prompt_tokens"
        | "truncation_side"
        | "request_id"
        | "cache_salt"
        | "logits_processors"
        | "prompt_embeds"
        | "thinking_token_budget"
        | "repetition_detection"
        | "ec_transfer_params" => vec![],
        _ => return None,
    };
    Some(values)
}

/// Refuses a body with a field `tandem serve` does not honour (see the module doc).
pub fn screen(endpoint: Endpoint, body: &Map<String, Value>) -> Result<(), ApiError> {
    let own = match endpoint {
        Endpoint::Completions => HONOURED_COMPLETIONS,
        Endpoint::Chat => HONOURED_CHAT,
    };
    for (field, value) in body {
        if HONOURED.contains(&field.as_str()) || own.contains(&field.as_str()) {
            continue;
        }
        let Some(inert) = inert_values(field, endpoint) else {
            return Err(ApiError::invalid_param(
                field,
                format!(
                    "Unrecognized request field `{field}`: tandem serve refuses the fields \
                     it does not honour."
                ),
            ));
        };
        if !(value.is_null() || inert.contains(value)) {
            return Err(ApiError::invalid_param(
                field,
                format!("`{field}` is not supported by tandem serve (send it unset)."),
            ));
        }
    }
    if let Some(options) = body.get("stream_options").and_then(Value::as_object) {
        screen_stream_options(options)?;
    }
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for (i, message) in messages.iter().enumerate() {
            screen_message(i, message)?;
        }
    }
    Ok(())
}

fn screen_stream_options(options: &Map<String, Value>) -> Result<(), ApiError> {
    let unknown = options
        .keys()
        .find(|field| !matches!(field.as_str(), "include_usage" | "continuous_usage_stats"));
    match unknown {
        Some(field) => Err(ApiError::invalid_param(
            &format!("stream_options.{field}"),
            format!("`stream_options.{field}` is not supported by tandem serve."),
        )),
        None => Ok(()),
    }
}

/// A message's fields and content parts: text only.
fn screen_message(index: usize, message: &Value) -> Result<(), ApiError> {
    let Some(message) = message.as_object() else {
        return Ok(()); // The parser names what is wrong with it.
    };
    for (field, value) in message {
        let honoured = matches!(
            field.as_str(),
            "role" | "content" | "name" | "tool_calls" | "tool_call_id"
        );
        let inert = value.is_null();
        if !(honoured || inert) {
            return Err(ApiError::invalid_param(
                &format!("messages[{index}].{field}"),
                format!("`{field}` in a message is not supported by tandem serve."),
            ));
        }
    }
    let parts = message.get("content").and_then(Value::as_array);
    for (part_index, part) in parts.into_iter().flatten().enumerate() {
        let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
        if kind == "text" {
            continue;
        }
        let what = match kind {
            "image_url" | "image" | "image_pil" | "image_embeds" => {
                "this model has no vision input"
            }
            "input_audio" | "audio_url" => "this model has no audio input",
            "video_url" => "this model has no video input",
            _ => "only text parts are supported",
        };
        return Err(ApiError::invalid_param(
            &format!("messages[{index}].content[{part_index}]"),
            format!("A `{kind}` content part cannot be used: {what}."),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn screened(endpoint: Endpoint, body: Value) -> Result<(), String> {
        screen(endpoint, body.as_object().unwrap()).map_err(|e| e.body().error.param.unwrap())
    }

    #[test]
    fn honoured_fields_pass_and_others_pass_only_asking_for_nothing() {
        let chat = |body| screened(Endpoint::Chat, body);
        assert!(chat(json!({"messages": [], "min_p": 0.1, "user": "u"})).is_ok());
        assert!(chat(json!({"tools": [], "tool_choice": "none", "response_format": null})).is_ok());
        assert!(chat(json!({"response_format": {"type": "json_object"}, "priority": 0})).is_ok());
        assert_eq!(
            chat(json!({"functions": [{"name": "f"}]})),
            Err("functions".into())
        );
        assert_eq!(chat(json!({"cache_salt": "s"})), Err("cache_salt".into()));
        assert_eq!(chat(json!({"frobnicate": 1})), Err("frobnicate".into()));
        assert_eq!(chat(json!({"prompt": "x"})), Err("prompt".into()));
        let completions = |body| screened(Endpoint::Completions, body);
        assert!(completions(json!({"prompt": "x", "best_of": 1, "echo": true})).is_ok());
        assert_eq!(completions(json!({"suffix": "z"})), Err("suffix".into()));
        assert_eq!(completions(json!({"messages": []})), Err("messages".into()));
        assert_eq!(
            completions(json!({"stream_options": {"chunk_size": 2}})),
            Err("stream_options.chunk_size".into())
        );
    }

    #[test]
    fn images_and_unknown_message_fields_are_refused_by_where_they_are() {
        let image = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:,"}}]}]});
        let error = screen(Endpoint::Chat, image.as_object().unwrap()).unwrap_err();
        let body = error.body().error;
        assert_eq!(body.param.as_deref(), Some("messages[0].content[1]"));
        assert!(body.message.contains("no vision input"), "{}", body.message);
        let reasoning = json!({"messages": [{"role": "assistant", "content": "x",
            "reasoning_content": "because"}]});
        assert_eq!(
            screened(Endpoint::Chat, reasoning),
            Err("messages[0].reasoning_content".into())
        );
        let plain = json!({"messages": [{"role": "user", "content": "hi", "name": "a",
            "tool_calls": []}]});
        assert!(screened(Endpoint::Chat, plain).is_ok());
    }
}
