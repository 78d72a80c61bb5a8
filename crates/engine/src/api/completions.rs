//! `POST /v1/completions`: one choice per prompt (a prompt is text or token ids, and a
//! request may carry a list of them), answered whole or streamed.

use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use futures_util::future::join_all;
use tandem_protocol::openai::response::TEXT_COMPLETION;
use tandem_protocol::openai::{ApiError, CompletionChoice, CompletionRequest, CompletionResponse};

use super::best_of;
use super::error::{HttpError, parse_screened_body};
use super::generation::{ChoiceRun, collect};
use super::handoff;
use super::logprobs::LogprobsWriter;
use super::request_id::RequestId;
use super::sse::{self, ChunkWriter, Endpoint, StreamShape};
use super::validate::{self, OutputOptions, PromptNoun};
use super::{SharedState, prepare, start_choices, unix_seconds};

pub async fn create(
    State(state): State<SharedState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let arrival = Instant::now();
    let (runs, options) = {
        let state = state.clone();
        let request_id = request_id.clone();
        let body_bytes = body.as_ref().map_or(0, Bytes::len);
        prepare(&state.clone(), body_bytes, move || {
            let request: CompletionRequest = parse_screened_body(body, Endpoint::Completions)?;
            start(&state, &request, &request_id, arrival)
        })
        .await?
    };
    let writer = ChunkWriter {
        endpoint: Endpoint::Completions,
        id: format!("cmpl-{request_id}"),
        created: unix_seconds(),
        model: state.model.name.clone(),
    };
    let shape = super::stream_shape(&options, &state);
    if options.stream {
        return Ok(sse::response(writer, runs, shape).into_response());
    }
    let answer = respond_whole(writer, runs, shape, &options, &state).await?;
    Ok(Json(answer).into_response())
}

/// Validates the request and submits its prompts; returns the runs and the stream
/// flags.
fn start(
    state: &SharedState,
    request: &CompletionRequest,
    request_id: &str,
    arrival: Instant,
) -> Result<(Vec<ChoiceRun>, OutputOptions), ApiError> {
    validate::check_model(request.model.as_deref(), &state.model)?;
    let mut options = validate::output_options(
        &request.sampling,
        ("max_tokens", request.sampling.max_tokens),
        &state.tokenizer,
        &state.model,
    )?;
    options.constraint = state.output_constraint(&request.sampling)?;
    options.sampling.logprobs = validate::completion_logprobs(request.sampling.logprobs.as_ref())?;
    options.best_of = validate::best_of(request.best_of, options.n, options.stream)?;
    options.echo = request.wants_echo();
    // Echoed prompt tokens come with their log probabilities (lm-eval's log-likelihood).
    options.echo_logprobs = options.sampling.logprobs.filter(|_| options.echo);
    options.prompt_logprobs = options.prompt_logprobs.max(options.echo_logprobs);
    let inputs = request.prompt.inputs();
    if inputs.is_empty() {
        return Err(ApiError::invalid_param(
            "prompt",
            "The prompt cannot be empty.",
        ));
    }
    options.kv = handoff::kv_role(
        request.sampling.kv_transfer_params.as_ref(),
        options.stream,
        handoff::RequestShape {
            prompts: inputs.len(),
            sequences_per_prompt: options.best_of.unwrap_or(options.n),
        },
        state.handoff.as_ref(),
    )?;
    validate::check_prompt_computed_here(&options)?;
    let prompts = inputs
        .into_iter()
        .map(|input| {
            let add_special_tokens = request.add_special_tokens.unwrap_or(true);
            let ids = validate::completion_prompt_ids(
                input,
                add_special_tokens,
                &state.tokenizer,
                &state.model,
            )?;
            validate::fit_to_context(
                ids,
                options.max_tokens,
                state.model.max_model_len,
                PromptNoun::Prompt,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let runs = match options.best_of {
        Some(candidates) => {
            // Every candidate runs as a choice, its tokens' log probabilities kept to
            // rank it.
            let mut candidate_options = options.clone();
            candidate_options.n = candidates;
            candidate_options.sampling.logprobs.get_or_insert(0);
            start_choices(
                state,
                &format!("cmpl-{request_id}"),
                prompts,
                &candidate_options,
                arrival,
            )?
        }
        None => start_choices(
            state,
            &format!("cmpl-{request_id}"),
            prompts,
            &options,
            arrival,
        )?,
    };
    Ok((runs, options))
}

async fn respond_whole(
    writer: ChunkWriter,
    runs: Vec<ChoiceRun>,
    shape: StreamShape,
    options: &OutputOptions,
    state: &SharedState,
) -> Result<CompletionResponse, ApiError> {
    let collected = join_all(runs.into_iter().map(collect))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|failure| ApiError::internal(failure.to_string()))?;
    // Every choice's output counts, best_of's candidates included: all were computed.
    let per_prompt = options.best_of.unwrap_or(options.n);
    let usage = super::total_usage(
        collected.iter().map(|choice| (choice.index, choice.usage)),
        per_prompt,
    );
    let collected = match options.best_of {
        Some(candidates) => {
            let reported = options.sampling.logprobs.is_some();
            best_of::most_likely(collected, candidates, options.n, reported)
        }
        None => collected,
    };
    let mut choices = Vec::with_capacity(collected.len());
    let mut kv_transfer_params = None;
    for choice in collected {
        if let (Some(handoff), Some(info)) = (&choice.handoff, &state.handoff) {
            kv_transfer_params = handoff::response_params(handoff, info);
        }
        let logprobs = match (&shape.logprobs, &choice.logprobs) {
            (Some(writer), Some(tokens)) => Some(writer.completion(tokens, &mut 0)),
            _ => None,
        };
        let prompt_logprobs = choice
            .prompt_logprobs
            .as_ref()
            .map(|prompt| LogprobsWriter::new(state.tokenizer.clone()).prompt(prompt));
        choices.push(CompletionChoice {
            index: choice.index,
            text: choice.text,
            logprobs,
            finish_reason: Some(choice.finish_reason.as_openai().to_owned()),
            stop_reason: choice.stop_reason,
            prompt_token_ids: choice.prompt_token_ids,
            token_ids: choice.token_ids,
            prompt_logprobs,
        });
    }
    Ok(CompletionResponse {
        id: writer.id,
        object: TEXT_COMPLETION.into(),
        created: writer.created,
        model: writer.model,
        choices,
        usage,
        kv_transfer_params,
    })
}
