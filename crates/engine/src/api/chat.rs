//! `POST /v1/chat/completions`: the conversation rendered through the model's chat
//! template into one prompt, answered whole or streamed.

use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use futures_util::future::join_all;
use tandem_protocol::openai::response::CHAT_COMPLETION;
use tandem_protocol::openai::{
    ApiError, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatResponseMessage,
};

use super::error::{HttpError, parse_screened_body};
use super::generation::{ChoiceRun, collect};
use super::handoff;
use super::logprobs::LogprobsWriter;
use super::request_id::RequestId;
use super::sse::{self, ChunkWriter, Endpoint, StreamShape};
use super::tools::ToolUse;
use super::validate::{self, OutputOptions, PromptNoun};
use super::{SharedState, prepare, start_choices, unix_seconds};
use crate::tools::ToolCallExtractor;

pub async fn create(
    State(state): State<SharedState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let arrival = Instant::now();
    let (runs, options, tool_calls) = {
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
    let mut shape = super::stream_shape(&options, &state);
    shape.tool_calls = tool_calls;
    if options.stream {
        return Ok(sse::response(writer, runs, shape).into_response());
    }
    Ok(Json(respond_whole(writer, runs, shape, &state).await?).into_response())
}

/// Validates the request and submits its `n` choices; returns the runs, the output
/// options and, with tools, what reads calls out of each choice's output.
fn start(
    state: &SharedState,
    request: &ChatCompletionRequest,
    request_id: &str,
    arrival: Instant,
) -> Result<(Vec<ChoiceRun>, OutputOptions, Option<ToolCallExtractor>), ApiError> {
    validate::check_model(request.model.as_deref(), &state.model)?;
    let mut options = validate::output_options(
        &request.sampling,
        (request.max_tokens_field(), request.max_tokens()),
        &state.tokenizer,
        &state.model,
    )?;
    options.constraint = state.output_constraint(&request.sampling)?;
    let tool_use = ToolUse::from_request(request)?;
    if let Some(forced) = tool_use.as_ref().and_then(ToolUse::forced_grammar) {
        if options.constraint.is_some() {
            return Err(ApiError::invalid_param(
                "tool_choice",
                "A required or named `tool_choice` cannot be combined with structured output.",
            ));
        }
        options.constraint = Some(state.compile(&forced)?);
    }
    options.sampling.logprobs = validate::chat_logprobs(
        request.sampling.logprobs.as_ref(),
        request.top_logprobs.as_ref(),
    )?;
    let chat = validate::ChatPromptOptions::from_fields(
        request.add_generation_prompt,
        request.continue_final_message,
        None,
    )?;
    let offer = tool_use.as_ref().map(|tools| validate::ToolOffer {
        tools: &tools.tools,
        format: state.tool_call_format,
    });
    let ids = validate::chat_prompt_ids(
        &request.messages,
        chat,
        offer,
        state.chat_template.as_ref(),
        &state.tokenizer,
        state.model.max_model_len,
    )?;
    options.kv = handoff::kv_role(
        request.sampling.kv_transfer_params.as_ref(),
        options.stream,
        handoff::RequestShape {
            prompts: 1,
            sequences_per_prompt: options.n,
        },
        state.handoff.as_ref(),
    )?;
    validate::check_prompt_computed_here(&options)?;
    let prompt = validate::fit_to_context(
        ids,
        options.max_tokens,
        state.model.max_model_len,
        PromptNoun::Messages,
    )?;
    let runs = start_choices(
        state,
        &format!("chatcmpl-{request_id}"),
        vec![prompt],
        &options,
        arrival,
    )?;
    let extractor = tool_use.and_then(|tools| tools.extractor(state.tool_call_format));
    Ok((runs, options, extractor))
}

async fn respond_whole(
    writer: ChunkWriter,
    runs: Vec<ChoiceRun>,
    shape: StreamShape,
    state: &SharedState,
) -> Result<ChatCompletionResponse, ApiError> {
    let n = runs.len();
    let collected = join_all(runs.into_iter().map(collect)).await;
    let mut choices = Vec::with_capacity(n);
    let mut usage = Vec::with_capacity(n);
    let (mut kv_transfer_params, mut prompt_token_ids, mut prompt_logprobs) = (None, None, None);
    for result in collected {
        let choice = result.map_err(|failure| ApiError::internal(failure.to_string()))?;
        usage.push((choice.index, choice.usage));
        if let (Some(handoff), Some(info)) = (&choice.handoff, &state.handoff) {
            kv_transfer_params = handoff::response_params(handoff, info);
        }
        prompt_token_ids = prompt_token_ids.or(choice.prompt_token_ids);
        prompt_logprobs = prompt_logprobs.or(choice.prompt_logprobs);
        let logprobs = match (&shape.logprobs, &choice.logprobs) {
            (Some(writer), Some(tokens)) => Some(writer.chat(tokens)),
            _ => None,
        };
        let (message, finish_reason) = match &shape.tool_calls {
            Some(extractor) => with_tool_calls(
                extractor.clone(),
                &choice.text,
                choice.finish_reason.as_openai(),
            ),
            None => (
                ChatResponseMessage {
                    role: "assistant".into(),
                    content: Some(choice.text),
                    tool_calls: None,
                },
                choice.finish_reason.as_openai(),
            ),
        };
        choices.push(ChatChoice {
            index: choice.index,
            message,
            logprobs,
            finish_reason: Some(finish_reason.to_owned()),
            stop_reason: choice.stop_reason,
            token_ids: choice.token_ids,
        });
    }
    Ok(ChatCompletionResponse {
        id: writer.id,
        object: CHAT_COMPLETION.into(),
        created: writer.created,
        model: writer.model,
        choices,
        usage: super::total_usage(usage, shape.n),
        kv_transfer_params,
        prompt_token_ids,
        prompt_logprobs: prompt_logprobs
            .map(|prompt| LogprobsWriter::new(state.tokenizer.clone()).prompt(&prompt)),
    })
}

/// A whole answer's message with its tool calls read out of `text`, and its finish
/// reason (`tool_calls` when the model chose to call, as OpenAI reports it).
fn with_tool_calls(
    mut extractor: ToolCallExtractor,
    text: &str,
    finish_reason: &'static str,
) -> (ChatResponseMessage, &'static str) {
    let mut pieces = extractor.push(text);
    pieces.extend(extractor.finish());
    let (content, calls) = sse::split_pieces(pieces);
    let calls: Vec<_> = calls
        .into_iter()
        .map(|call| sse::tool_call_json(&call, None))
        .collect();
    let finish_reason = match finish_reason {
        "stop" if !calls.is_empty() && !extractor.is_named() => "tool_calls",
        other => other,
    };
    let message = ChatResponseMessage {
        role: "assistant".into(),
        content: (!content.is_empty() || calls.is_empty()).then_some(content),
        tool_calls: (!calls.is_empty()).then_some(calls),
    };
    (message, finish_reason)
}
