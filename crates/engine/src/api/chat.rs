//! `POST /v1/chat/completions`: the conversation rendered through the model's chat
//! template into one prompt, answered whole or streamed.

use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use tandem_protocol::openai::response::CHAT_COMPLETION;
use tandem_protocol::openai::{
    ApiError, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatResponseMessage,
};

use super::error::{HttpError, parse_screened_body};
use super::generation::{ChoiceRun, collect};
use super::handoff;
use super::request_id::RequestId;
use super::sse::{self, ChunkWriter, Endpoint};
use super::validate::{self, PromptNoun};
use super::{SharedState, prepare, start_choices, unix_seconds};

pub async fn create(
    State(state): State<SharedState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let arrival = Instant::now();
    let (run, stream, include_usage) = {
        let state = state.clone();
        let request_id = request_id.clone();
        let body_bytes = body.as_ref().map_or(0, Bytes::len);
        prepare(&state.clone(), body_bytes, move || {
            let request: ChatCompletionRequest = parse_screened_body(body, Endpoint::Chat)?;
            start(&state, &request, &request_id, arrival)
        })
        .await?
    };
    let writer = ChunkWriter {
        endpoint: Endpoint::Chat,
        id: format!("chatcmpl-{request_id}"),
        created: unix_seconds(),
        model: state.model.name.clone(),
    };
    if stream {
        return Ok(sse::response(writer, vec![run], include_usage).into_response());
    }
    Ok(Json(respond_whole(writer, run, &state).await?).into_response())
}

/// Validates the request and submits it; returns the run and the stream flags.
fn start(
    state: &SharedState,
    request: &ChatCompletionRequest,
    request_id: &str,
    arrival: Instant,
) -> Result<(ChoiceRun, bool, bool), ApiError> {
    validate::check_model(request.model.as_deref(), &state.model)?;
    if request.wants_logprobs() {
        let field = if request.sampling.wants_logprobs() {
            "logprobs"
        } else {
            "top_logprobs"
        };
        return Err(ApiError::invalid_param(
            field,
            format!("{field} is not supported."),
        ));
    }
    let mut options = validate::output_options(
        &request.sampling,
        (request.max_tokens_field(), request.max_tokens()),
        &state.tokenizer,
        &state.model,
    )?;
    let chat = validate::ChatPromptOptions::from_fields(
        request.add_generation_prompt,
        request.continue_final_message,
        None,
    )?;
    let ids = validate::chat_prompt_ids(
        &request.messages,
        chat,
        state.chat_template.as_ref(),
        &state.tokenizer,
        state.model.max_model_len,
    )?;
    options.kv = handoff::kv_role(
        request.sampling.kv_transfer_params.as_ref(),
        options.stream,
        1,
        state.handoff.as_ref(),
    )?;
    let prompt = validate::fit_to_context(
        ids,
        options.max_tokens,
        state.model.max_model_len,
        PromptNoun::Messages,
    )?;
    let mut runs = start_choices(
        state,
        &format!("chatcmpl-{request_id}"),
        vec![prompt],
        &options,
        arrival,
    )?;
    let run = runs
        .pop()
        .ok_or_else(|| ApiError::internal("no choice was started"))?;
    Ok((run, options.stream, options.include_usage))
}

async fn respond_whole(
    writer: ChunkWriter,
    run: ChoiceRun,
    state: &SharedState,
) -> Result<ChatCompletionResponse, ApiError> {
    let choice = collect(run)
        .await
        .map_err(|failure| ApiError::internal(failure.to_string()))?;
    let kv_transfer_params = match (&choice.handoff, &state.handoff) {
        (Some(handoff), Some(info)) => handoff::response_params(handoff, info),
        _ => None,
    };
    Ok(ChatCompletionResponse {
        id: writer.id,
        object: CHAT_COMPLETION.into(),
        created: writer.created,
        model: writer.model,
        choices: vec![ChatChoice {
            index: choice.index,
            message: ChatResponseMessage {
                role: "assistant".into(),
                content: choice.text,
            },
            logprobs: None,
            finish_reason: Some(choice.finish_reason.as_openai().to_owned()),
            stop_reason: choice.stop_reason,
            token_ids: choice.token_ids,
        }],
        usage: choice.usage,
        prompt_token_ids: choice.prompt_token_ids,
        kv_transfer_params,
    })
}
