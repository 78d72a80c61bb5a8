//! `POST /tokenize` and `POST /detokenize`, shaped as vLLM's: a prompt or a
//! conversation turned into the token ids a generation request with the same prompt
//! or messages would feed the model (through the same functions in [`validate`]), and
//! token ids back into text. The router asks for them to learn a request's prompt
//! tokens (KV-aware routing).
//!
//! Unknown fields are refused by name (a misspelt `add_special_tokens` would silently
//! change the ids), as are vLLM's fields this server does not honour
//! (`chat_template`, `chat_template_kwargs`, `tools`) when they ask for anything.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tandem_protocol::openai::tokenize::{
    DETOKENIZE_FIELDS, TOKENIZE_CHAT_FIELDS, TOKENIZE_PROMPT_FIELDS,
};
use tandem_protocol::openai::{
    ApiError, DetokenizeRequest, DetokenizeResponse, PromptInput, TokenizeChatRequest,
    TokenizeCompletionRequest, TokenizeResponse,
};

use super::error::{HttpError, parse_json_body};
use super::validate::{self, ChatPromptOptions};
use super::{ServerState, SharedState, prepare};

pub async fn tokenize(
    State(state): State<SharedState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TokenizeResponse>, HttpError> {
    let body_bytes = body.as_ref().map_or(0, Bytes::len);
    let worker = state.clone();
    let response = prepare(&state, body_bytes, move || {
        let fields: Map<String, Value> = parse_json_body(body)?;
        tokenize_body(&worker, fields)
    })
    .await?;
    Ok(Json(response))
}

pub async fn detokenize(
    State(state): State<SharedState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<DetokenizeResponse>, HttpError> {
    let body_bytes = body.as_ref().map_or(0, Bytes::len);
    let worker = state.clone();
    let response = prepare(&state, body_bytes, move || {
        let fields: Map<String, Value> = parse_json_body(body)?;
        let request: DetokenizeRequest = typed(fields, DETOKENIZE_FIELDS, "/detokenize")?;
        detokenize_request(&worker, &request)
    })
    .await?;
    Ok(Json(response))
}

/// A body with `prompt` or with `messages` (exactly one of them).
fn tokenize_body(
    state: &ServerState,
    fields: Map<String, Value>,
) -> Result<TokenizeResponse, ApiError> {
    match (
        fields.contains_key("prompt"),
        fields.contains_key("messages"),
    ) {
        (true, true) => Err(ApiError::invalid_param(
            "messages",
            "Give either `prompt` or `messages`, not both.",
        )),
        (false, false) => Err(ApiError::bad_request(
            "The body needs `prompt` (text) or `messages` (a conversation).",
        )),
        (true, false) => {
            let request = typed(fields, TOKENIZE_PROMPT_FIELDS, "/tokenize with `prompt`")?;
            tokenize_prompt(state, &request)
        }
        (false, true) => {
            let request = typed(fields, TOKENIZE_CHAT_FIELDS, "/tokenize with `messages`")?;
            tokenize_chat(state, &request)
        }
    }
}

/// `fields` as a `T`, once every field is one of `known`.
fn typed<T: DeserializeOwned>(
    fields: Map<String, Value>,
    known: &[&str],
    what: &str,
) -> Result<T, ApiError> {
    if let Some(unknown) = fields.keys().find(|key| !known.contains(&key.as_str())) {
        return Err(ApiError::invalid_param(
            unknown,
            format!(
                "Unknown field `{unknown}`; {what} accepts {}.",
                known.join(", ")
            ),
        ));
    }
    serde_json::from_value(Value::Object(fields))
        .map_err(|e| ApiError::bad_request(format!("Invalid request: {e}")))
}

fn tokenize_prompt(
    state: &ServerState,
    request: &TokenizeCompletionRequest,
) -> Result<TokenizeResponse, ApiError> {
    validate::check_model(request.model.as_deref(), &state.model)?;
    let ids = validate::completion_prompt_ids(
        PromptInput::Text(&request.prompt),
        request.add_special_tokens.unwrap_or(true),
        &state.tokenizer,
        &state.model,
    )?;
    answer(state, ids, request.return_token_strs.unwrap_or(false))
}

fn tokenize_chat(
    state: &ServerState,
    request: &TokenizeChatRequest,
) -> Result<TokenizeResponse, ApiError> {
    validate::check_model(request.model.as_deref(), &state.model)?;
    refuse_if_set("chat_template", request.chat_template.as_ref())?;
    refuse_if_set(
        "chat_template_kwargs",
        request.chat_template_kwargs.as_ref(),
    )?;
    refuse_if_set("tools", request.tools.as_ref())?;
    let options = ChatPromptOptions::from_fields(
        request.add_generation_prompt,
        request.continue_final_message,
        request.add_special_tokens,
    )?;
    let ids = validate::chat_prompt_ids(
        &request.messages,
        options,
        None,
        state.chat_template.as_ref(),
        &state.tokenizer,
        state.model.max_model_len,
    )?;
    answer(state, ids, request.return_token_strs.unwrap_or(false))
}

/// Refuses a field this server does not honour unless it asks for nothing (`null`,
/// `{}`, `[]`).
fn refuse_if_set(name: &str, value: Option<&Value>) -> Result<(), ApiError> {
    let asks = match value {
        None | Some(Value::Null) => false,
        Some(Value::Object(map)) => !map.is_empty(),
        Some(Value::Array(list)) => !list.is_empty(),
        Some(_) => true,
    };
    if asks {
        return Err(ApiError::invalid_param(
            name,
            format!("{name} is not supported by this server."),
        ));
    }
    Ok(())
}

/// The response for `ids`; a prompt longer than the context is refused, as vLLM does.
fn answer(
    state: &ServerState,
    ids: Vec<u32>,
    token_strs: bool,
) -> Result<TokenizeResponse, ApiError> {
    let max_model_len = state.model.max_model_len;
    if ids.len() > max_model_len {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {max_model_len} tokens. However, the \
             prompt has {} tokens.",
            ids.len()
        )));
    }
    let token_strs = token_strs.then(|| {
        ids.iter()
            .map(|&id| state.tokenizer.id_to_token(id).unwrap_or_default())
            .collect()
    });
    Ok(TokenizeResponse {
        count: ids.len(),
        max_model_len,
        tokens: ids,
        token_strs,
    })
}

fn detokenize_request(
    state: &ServerState,
    request: &DetokenizeRequest,
) -> Result<DetokenizeResponse, ApiError> {
    validate::check_model(request.model.as_deref(), &state.model)?;
    let max_model_len = state.model.max_model_len;
    if request.tokens.len() > max_model_len {
        return Err(ApiError::invalid_param(
            "tokens",
            format!(
                "At most {max_model_len} tokens (the model's context) are accepted, got {}.",
                request.tokens.len()
            ),
        ));
    }
    let vocab = state.model.vocab_size.min(state.tokenizer.vocab_size());
    if let Some(&bad) = request.tokens.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid_param(
            "tokens",
            format!("Token id {bad} is out of vocabulary (the tokenizer has {vocab} tokens)."),
        ));
    }
    Ok(DetokenizeResponse {
        prompt: state.tokenizer.decode(&request.tokens, false),
    })
}

/// `GET /tokenizer_info`: the tokenizer's special tokens and chat template, in the
/// keys of a Hugging Face `tokenizer_config.json` (vLLM's endpoint; what lm-eval's
/// `tokenizer_backend=remote` reads).
pub async fn tokenizer_info(State(state): State<SharedState>) -> Json<Value> {
    let tokenizer = &state.tokenizer;
    Json(serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token(),
        "eos_token": tokenizer.eos_token(),
        "pad_token": null,
        "unk_token": null,
        "add_bos_token": tokenizer.add_bos_by_default(),
        "model_max_length": state.model.max_model_len,
        "chat_template": state.chat_template.as_ref().map(|template| template.source()),
    }))
}
