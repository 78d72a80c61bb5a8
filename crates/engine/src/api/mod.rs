//! The worker's OpenAI-compatible HTTP API (axum), shaped as vLLM serves it.
//!
//! - `POST /v1/completions`, `POST /v1/chat/completions`: validated into engine
//!   requests ([`validate`]), run through the engine loop and turned back into text
//!   ([`generation`], [`stop`]), answered whole or as server-sent events ([`sse`]).
//!   Fields the server does not honour are refused by name ([`fields`]); structured
//!   output fields become the grammar the output follows ([`structured`]).
//! - `POST /tokenize`, `POST /detokenize`: a prompt or conversation as the token ids
//!   the generation endpoints would feed the model, and ids back into text
//!   ([`tokenize`]).
//! - `GET /v1/models`, `GET /health`, `/ping`, `GET /version`, `GET /metrics`
//!   ([`info`]).
//! - An optional API key on the `/v1/*` routes, `/tokenize` and `/detokenize`
//!   ([`auth`]).
//!
//! Connections, timeouts and body limits are `tandem_httpd`'s: handlers get bodies
//! that arrived whole within the limits. Prompts that cannot fit the context are
//! refused before they are tokenized ([`validate`]).
//!
//! Handlers never touch engine state: they submit requests over the
//! [`EngineHandle`] and read token events back. Dropping a response (a client that
//! disconnects) drops its [`crate::sched::GenerationStream`], which cancels the request
//! and frees its KV blocks.

mod auth;
mod best_of;
mod chat;
mod completions;
mod error;
mod fields;
mod generation;
mod handoff;
mod info;
mod logprobs;
mod request_id;
mod sse;
mod stop;
mod structured;
mod tokenize;
mod tools;
mod validate;

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tandem_httpd::HttpLimits;

use tandem_protocol::openai::ApiError;

use crate::chat::ChatTemplate;
use crate::constrain::{Constrainer, ConstraintError, OutputConstraint};
use crate::sched::{EngineHandle, GenerationRequest, SeqId};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};
use crate::tools::ToolCallFormat;
use crate::transfer::KvRole;

use generation::{ChoiceRun, TokenReport};
use stop::StopMatcher as Stops;
use validate::{OutputOptions, PreparedPrompt};

pub use error::HttpError;
pub use handoff::HandoffInfo;
pub use stop::{StopMatcher, StopOutcome};

/// What the server says about the model it serves.
#[derive(Debug, Clone)]
pub struct ServedModel {
    /// The name clients use (`model` in requests, `--served-model-name`).
    pub name: String,
    /// Where the model was loaded from (`root` in `/v1/models`).
    pub root: String,
    /// Most tokens (prompt plus output) of one request.
    pub max_model_len: usize,
    /// Number of token ids the model has embeddings for.
    pub vocab_size: usize,
}

/// Everything a handler needs; shared by all requests.
pub struct ServerState {
    engine: EngineHandle,
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    model: ServedModel,
    metrics: Option<PrometheusHandle>,
    /// Unix seconds the server started (`created` of the model card).
    started: u64,
    handoff: Option<HandoffInfo>,
    /// Clients of `/v1/*` must send `Authorization: Bearer <api_key>`.
    api_key: Option<Arc<str>>,
    /// Turns to prepare a large body (see [`prepare`]).
    large_bodies: Arc<tokio::sync::Semaphore>,
    /// How the model writes tool calls (`--tool-call-parser`).
    tool_call_format: ToolCallFormat,
    /// Compiles structured-output grammars; built on first use (it indexes the
    /// vocabulary, which servers that never constrain output need not pay for).
    constrainer: OnceLock<Result<Constrainer, String>>,
}

impl ServerState {
    /// `metrics` renders `/metrics`; `None` serves an empty exposition.
    pub fn new(
        engine: EngineHandle,
        tokenizer: Tokenizer,
        chat_template: Option<ChatTemplate>,
        model: ServedModel,
        metrics: Option<PrometheusHandle>,
    ) -> Self {
        Self {
            engine,
            tokenizer,
            chat_template,
            model,
            metrics,
            started: unix_seconds(),
            handoff: None,
            api_key: None,
            large_bodies: Arc::new(tokio::sync::Semaphore::new(LARGE_BODY_PERMITS)),
            constrainer: OnceLock::new(),
            tool_call_format: ToolCallFormat::default(),
        }
    }

    /// Lets requests take part in the KV hand-off (`kv_transfer_params`).
    pub fn with_handoff(mut self, handoff: HandoffInfo) -> Self {
        self.handoff = Some(handoff);
        self
    }

    /// How the model writes tool calls, to read them out of its output and to tell a
    /// model whose template has no place for tools.
    pub fn with_tool_call_format(mut self, format: ToolCallFormat) -> Self {
        self.tool_call_format = format;
        self
    }

    /// Requires `Authorization: Bearer <key>` on the `/v1/*` routes; an empty key is
    /// no key (as vLLM treats an empty `VLLM_API_KEY`).
    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key.filter(|key| !key.is_empty()).map(Arc::from);
        self
    }

    pub fn served_model(&self) -> &ServedModel {
        &self.model
    }

    /// The grammar a request's structured-output fields ask for, compiled; `None` for
    /// free text. CPU work: call it while preparing the request, off the runtime.
    fn output_constraint(
        &self,
        fields: &tandem_protocol::openai::SamplingFields,
    ) -> Result<Option<OutputConstraint>, ApiError> {
        match structured::requested_grammar(fields)? {
            Some(requested) => self.compile(&requested).map(Some),
            None => Ok(None),
        }
    }

    fn compile(
        &self,
        requested: &structured::RequestedGrammar,
    ) -> Result<OutputConstraint, ApiError> {
        let constrainer = self
            .constrainer
            .get_or_init(|| {
                Constrainer::new(&self.tokenizer, self.model.vocab_size).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| ApiError::invalid_param(requested.field, e.clone()))?;
        match constrainer.compile(&requested.grammar, &requested.layout) {
            Ok(constraint) => Ok(constraint),
            Err(ConstraintError::Invalid(detail)) => Err(ApiError::invalid_param(
                requested.field,
                format!("`{}` cannot be used: {detail}", requested.field),
            )),
            Err(other) => Err(ApiError::invalid_param(requested.field, other.to_string())),
        }
    }
}

type SharedState = Arc<ServerState>;

/// The API's routes, with the API key (when set) on all but `/health` and `/metrics`,
/// the body size limit and request ids.
pub fn router(state: ServerState, max_body_bytes: usize) -> Router {
    let mut openai = Router::new()
        .route("/v1/completions", post(completions::create))
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/models", get(info::models))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/tokenizer_info", get(tokenize::tokenizer_info));
    if let Some(key) = state.api_key.clone() {
        openai = openai.route_layer(axum::middleware::from_fn_with_state(key, auth::require_key));
    }
    openai
        .route("/health", get(info::health))
        // SageMaker's liveness path, as vLLM serves it.
        .route("/ping", get(info::health).post(info::health))
        .route("/version", get(info::version))
        .route("/metrics", get(info::metrics))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(request_id::assign))
        .with_state(Arc::new(state))
}

/// Serves the API on `listener` within `limits` until `shutdown` completes, then
/// until the requests in flight have finished.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ServerState,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = router(state, limits.max_body_bytes);
    tandem_httpd::serve(listener, app, limits, shutdown).await;
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Submits `options.n` choices of each prompt (`{id_prefix}-{index}` in the engine,
/// prompt by prompt, as vLLM numbers them). A seeded request's choice `i` of a prompt
/// samples with seed + i, so that the choices differ and each is reproducible. When
/// the prompt's KV is pulled from a prefill worker, the first choice pulls it and the
/// others wait for it in the prefix cache.
fn start_choices(
    state: &ServerState,
    id_prefix: &str,
    prompts: Vec<PreparedPrompt>,
    options: &OutputOptions,
    arrival: Instant,
) -> Result<Vec<ChoiceRun>, ApiError> {
    let n = options.n;
    let mut runs = Vec::with_capacity(prompts.len() * n);
    let pulls = matches!(options.kv, KvRole::RemotePrefill(_));
    for (prompt_index, prompt) in prompts.into_iter().enumerate() {
        let mut puller = None;
        for choice in 0..n {
            let slot = ChoiceSlot {
                index: prompt_index * n + choice,
                choice,
                after_prompt_of: puller,
            };
            let run = start_choice(state, id_prefix, slot, &prompt, options, arrival)?;
            if pulls && puller.is_none() {
                puller = Some(run.seq_id());
            }
            runs.push(run);
        }
    }
    Ok(runs)
}

/// Where a choice goes among a request's.
struct ChoiceSlot {
    /// Its index in the answer.
    index: usize,
    /// Its place among its prompt's choices.
    choice: usize,
    /// The sibling that pulls the prompt's KV, if another does.
    after_prompt_of: Option<SeqId>,
}

fn start_choice(
    state: &ServerState,
    id_prefix: &str,
    slot: ChoiceSlot,
    prompt: &PreparedPrompt,
    options: &OutputOptions,
    arrival: Instant,
) -> Result<ChoiceRun, ApiError> {
    let ChoiceSlot {
        index,
        choice,
        after_prompt_of,
    } = slot;
    let decoder = IncrementalDecoder::with_context(
        &state.tokenizer,
        &prompt.ids,
        options.skip_special_tokens,
    );
    let mut sampling = options.sampling.clone();
    sampling.seed = sampling.seed.map(|seed| seed.wrapping_add(choice as u64));
    let request = GenerationRequest {
        request_id: format!("{id_prefix}-{index}"),
        prompt: prompt.ids.clone(),
        sampling,
        max_tokens: prompt.max_tokens,
        stop_token_ids: options.stop_token_ids.clone(),
        // A sibling pulls the prompt's KV; this one finds it in the prefix cache.
        kv: match after_prompt_of {
            Some(_) => KvRole::Local,
            None => options.kv.clone(),
        },
        constraint: options.constraint.clone(),
        prompt_logprobs: options.prompt_logprobs,
        after_prompt_of,
    };
    let stream = state
        .engine
        .submit(request)
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let stops = Stops::new(options.stop_strings.clone())
        .with_stop_tokens(options.requested_stop_token_ids.clone())
        .including_stop_string(options.include_stop_string);
    let echo = options.echo.then(|| {
        state
            .tokenizer
            .decode(&prompt.ids, options.skip_special_tokens)
    });
    let run = ChoiceRun::new(index, stream, decoder, stops, prompt.ids.len(), arrival)
        .with_min_tokens(options.sampling.min_tokens)
        .echoing(echo)
        .echoing_tokens(options.echo_logprobs.map(|top| (prompt.ids.clone(), top)))
        .keeping_prompt_logprobs(
            options
                .reported_prompt_logprobs
                .map(|top| (prompt.ids.clone(), top)),
        );
    let prompt_ids = options.return_token_ids.then(|| prompt.ids.clone());
    let logprobs = options.sampling.logprobs.is_some();
    Ok(run.reporting(TokenReport::new(prompt_ids, logprobs)))
}

/// How an answer is told, from its options.
fn stream_shape(options: &OutputOptions, state: &ServerState) -> sse::StreamShape {
    sse::StreamShape {
        n: options.n,
        include_usage: options.include_usage,
        continuous_usage: options.continuous_usage,
        logprobs: options
            .sampling
            .logprobs
            .map(|_| logprobs::LogprobsWriter::new(state.tokenizer.clone())),
        tool_calls: None,
    }
}

/// The usage of a request's choices, `n` per prompt: each prompt's tokens counted
/// once (as vLLM counts them), every choice's output.
fn total_usage(
    choices: impl IntoIterator<Item = (usize, tandem_protocol::openai::UsageInfo)>,
    n: usize,
) -> tandem_protocol::openai::UsageInfo {
    tandem_protocol::openai::UsageInfo::sum(choices.into_iter().map(|(index, usage)| {
        if index % n.max(1) == 0 {
            usage
        } else {
            tandem_protocol::openai::UsageInfo::new(0, usage.completion_tokens, 0)
        }
    }))
}

/// Bodies larger than this are prepared one at a time: parsing and tokenizing text
/// costs ~80 bytes of memory per byte of text, and the prompt length check
/// ([`validate`]) bounds the text of one request, not how many arrive at once
/// (8 concurrent prompts of 1.3 MB, just under what 8192 tokens of the default model
/// can hold: RSS +540 MB all at once, +176 MB one at a time). Smaller bodies never
/// wait.
const LARGE_BODY_BYTES: usize = 256 << 10;
const LARGE_BODY_PERMITS: usize = 1;

/// Prepares a request of `body_bytes` bytes with `work` off the runtime, waiting for a
/// turn first if the body is large.
async fn prepare<T: Send + 'static>(
    state: &ServerState,
    body_bytes: usize,
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let turn = if body_bytes > LARGE_BODY_BYTES {
        let turn = state.large_bodies.clone().acquire_owned().await;
        Some(turn.map_err(|e| ApiError::internal(format!("preparing the request failed: {e}")))?)
    } else {
        None
    };
    // The turn ends with the work, even if the client leaves first.
    off_runtime(move || {
        let _turn = turn;
        work()
    })
    .await
}

/// Runs CPU-heavy request preparation (parsing, chat templates, tokenizing a prompt of
/// up to the body size limit) on the blocking pool, so it never stalls the connections
/// the runtime's few threads serve. A panic in it becomes a 500.
async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("preparing the request failed: {e}")))?
}
