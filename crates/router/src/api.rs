//! The router's HTTP surface (axum): the OpenAI endpoints it routes, the endpoints it
//! answers itself (`/v1/models` from a healthy worker, `/health` by the mode's
//! readiness rule, `/healthcheck` in the toy proxy's shape, `/metrics`), client API
//! keys, and request ids. A request is screened once, here, for what only the router
//! may send workers: its `kv_transfer_params` are removed (or refused), and none of
//! its headers but the request id go upstream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Map, Value, json};
use tandem_protocol::openai::{ApiError, ErrorKind};

use crate::admin;
use crate::config::{ClientParamsPolicy, Mode};
use crate::disagg::{self, Endpoint};
use crate::dispatch::{ClientRequest, Dispatcher};
use crate::error::error_response;
use crate::metrics as names;
use crate::registry::Role;
use crate::relay::{ForwardHeaders, REQUEST_ID};
use crate::secret::Secret;

/// Everything the handlers share.
#[derive(Debug)]
pub struct AppState {
    pub dispatcher: Arc<Dispatcher>,
    pub api_key: Option<Secret>,
    pub admin_token: Option<Secret>,
    /// What a client's own `kv_transfer_params` get.
    pub client_params: ClientParamsPolicy,
    pub circuit: crate::config::CircuitConfig,
    pub metrics: Option<PrometheusHandle>,
    /// The KV event follower's handle (the admin API adds and removes streams).
    pub kv: Option<crate::kv_follow::KvFollowHandle>,
    /// The online planner's journal, when it runs (`GET /planner`).
    pub planner: Option<Arc<crate::rebalance::Journal>>,
    /// `/metrics` also carries the workers' own series ([`crate::federation`]).
    pub federate_worker_metrics: bool,
    /// The live view's snapshots (`/dashboard/events`).
    pub live: Option<Arc<crate::live::Live>>,
}

pub type SharedState = Arc<AppState>;

pub fn router(state: SharedState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/ping", get(health).post(health))
        .route("/version", get(version))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/tokenizer_info", get(tokenizer_info))
        .route("/healthcheck", get(healthcheck))
        .route("/metrics", get(metrics))
        .route(
            "/workers",
            get(admin::list).post(admin::add).delete(admin::remove),
        )
        .route("/workers/{id}/drain", post(admin::drain))
        .route("/workers/{id}/move", post(admin::move_worker))
        .route("/planner", get(admin::planner))
        .route("/dashboard", get(crate::live::page))
        .route("/dashboard/events", get(crate::live::events))
        .fallback(|| async { error_response(ApiError::not_found("Not Found")) })
        .method_not_allowed_fallback(|| async {
            error_response(ApiError::new(
                ErrorKind::MethodNotAllowed,
                "Method Not Allowed",
            ))
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn completions(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(&state, Endpoint::Completions, &headers, body).await
}

async fn chat(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(&state, Endpoint::Chat, &headers, body).await
}

async fn generate(
    state: &AppState,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrival = Instant::now();
    let mut outcome = OutcomeRecorder::new(state.dispatcher.mode, endpoint);
    let response = match prepare(state, endpoint, headers, body, arrival) {
        Ok(request) => state.dispatcher.dispatch(request).await,
        Err(error) => error_response(error),
    };
    outcome.record(response.status());
    response
}

fn prepare(
    state: &AppState,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    arrival: Instant,
) -> Result<ClientRequest, ApiError> {
    check_bearer(headers, state.api_key.as_ref())?;
    let bytes = body.map_err(|rejection| body_error(&rejection))?;
    let mut body: Map<String, Value> = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON in the request body: {e}")))?;
    screen_client_params(&mut body, state.client_params)?;
    Ok(ClientRequest {
        endpoint,
        body,
        headers: ForwardHeaders {
            request_id: request_id(headers),
        },
        arrival,
        resume: None,
        waiting: None,
    })
}

/// The client's error for a body that could not be read.
fn body_error(rejection: &BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            ErrorKind::PayloadTooLarge,
            "The request body is larger than the router accepts.",
        )
    } else {
        ApiError::bad_request(format!("Could not read the request body: {rejection}"))
    }
}

/// Removes (or refuses) the client's own `kv_transfer_params`, counting each.
fn screen_client_params(
    body: &mut Map<String, Value>,
    policy: ClientParamsPolicy,
) -> Result<(), ApiError> {
    let count = |action: &'static str| {
        metrics::counter!(names::CLIENT_KV_TRANSFER_PARAMS_TOTAL, names::ACTION => action)
            .increment(1);
    };
    match disagg::screen_client_params(body, policy) {
        Ok(true) => count("stripped"),
        Ok(false) => {}
        Err(refused) => {
            count("rejected");
            return Err(ApiError::invalid_param(refused.param, refused.to_string()));
        }
    }
    Ok(())
}

/// The client's `X-Request-Id` if it sent a usable one, else a fresh one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|id| !id.is_empty() && id.len() <= 256)
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned)
}

/// Requires `Authorization: Bearer <expected>` when a key is configured.
pub fn check_bearer(headers: &HeaderMap, expected: Option<&Secret>) -> Result<(), ApiError> {
    let Some(expected) = expected.map(Secret::expose) else {
        return Ok(());
    };
    if tandem_httpd::auth::bearer_matches(headers, expected) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorKind::Unauthorized,
            "Unauthorized: a valid API key is required.",
        ))
    }
}

/// Counts a client request by how it ended; `cancelled` if the client left first.
struct OutcomeRecorder {
    mode: Mode,
    endpoint: Endpoint,
    recorded: bool,
}

impl OutcomeRecorder {
    fn new(mode: Mode, endpoint: Endpoint) -> Self {
        Self {
            mode,
            endpoint,
            recorded: false,
        }
    }

    fn record(&mut self, status: StatusCode) {
        let class = match status.as_u16() {
            200..=299 => "2xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.count(class);
    }

    fn count(&mut self, outcome: &'static str) {
        self.recorded = true;
        metrics::counter!(names::REQUESTS_TOTAL, names::MODE => self.mode.as_str(),
            names::ENDPOINT => self.endpoint.as_str(), names::OUTCOME => outcome)
        .increment(1);
    }
}

impl Drop for OutcomeRecorder {
    fn drop(&mut self) {
        if !self.recorded {
            self.count("cancelled");
        }
    }
}

/// `/v1/models` of the first healthy worker that answers (decode or replicated
/// workers first), relayed as is so `root` and `max_model_len` survive. The call
/// carries the worker key (if any), never the client's `Authorization`.
async fn models(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    if let Err(error) = check_bearer(&headers, state.api_key.as_ref()) {
        return error_response(error);
    }
    let registry = &state.dispatcher.registry;
    let client = state.dispatcher.upstream.client();
    let workers = [Role::Both, Role::Decode, Role::Prefill]
        .into_iter()
        .flat_map(|role| registry.available(role, &[]));
    for worker in workers {
        let request = client
            .get(format!("{}/v1/models", worker.url))
            .timeout(Duration::from_secs(10));
        if let Ok(response) = request.send().await
            && response.status().is_success()
            && let Ok(body) = response.bytes().await
        {
            return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
        }
    }
    error_response(ApiError::unavailable("no worker answered /v1/models"))
}

/// `{"version": …}`: the router's (tandem's) version, as vLLM answers it.
async fn version() -> Response {
    axum::Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

async fn tokenize(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return error_response(body_error(&rejection)),
    };
    forward_to_a_worker(&state, "/tokenize", &headers, Some(body)).await
}

async fn detokenize(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return error_response(body_error(&rejection)),
    };
    forward_to_a_worker(&state, "/detokenize", &headers, Some(body)).await
}

/// The workers' tokenizer description (vLLM's `GET /tokenizer_info`; lm-eval reads it
/// for `tokenizer_backend=remote`).
async fn tokenizer_info(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    forward_to_a_worker(&state, "/tokenizer_info", &headers, None).await
}

/// A request the workers all answer alike (`/tokenize`, `/detokenize`,
/// `/tokenizer_info`), sent to the first available worker that answers (prefill
/// workers first in P/D mode: they tokenize what the decode workers would) and relayed
/// as it answered: a POST of `body`, or a GET without one. The call carries the worker
/// key (if any), never the client's `Authorization`.
async fn forward_to_a_worker(
    state: &AppState,
    path: &str,
    headers: &HeaderMap,
    body: Option<Bytes>,
) -> Response {
    if let Err(error) = check_bearer(headers, state.api_key.as_ref()) {
        return error_response(error);
    }
    let registry = &state.dispatcher.registry;
    let client = state.dispatcher.upstream.client();
    let workers = [Role::Both, Role::Prefill, Role::Decode]
        .into_iter()
        .flat_map(|role| registry.available(role, &[]));
    for worker in workers {
        let url = format!("{}{path}", worker.url);
        let request = match &body {
            Some(body) => client
                .post(url)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.clone()),
            None => client.get(url),
        }
        .timeout(Duration::from_secs(30));
        let Ok(response) = request.send().await else {
            continue;
        };
        let status = response.status().as_u16();
        if status >= 500 {
            continue;
        }
        let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
        if let Ok(bytes) = response.bytes().await {
            return crate::relay::passthrough(status, content_type, bytes);
        }
    }
    error_response(ApiError::unavailable(format!("no worker answered {path}")))
}

/// 200 when the mode can serve (see [`readiness`]), with `"status": "degraded"` while
/// decode workers compute prompts for want of a prefill worker; else 503 naming what
/// is missing.
async fn health(State(state): State<SharedState>) -> Response {
    let dispatcher = &state.dispatcher;
    let healthy = |role| dispatcher.registry.has_healthy(role);
    let body = match readiness(dispatcher.mode, dispatcher.require_prefill, healthy) {
        Readiness::Ready => json!({"status": "ok"}),
        Readiness::Degraded => json!({"status": "degraded",
            "message": "no healthy prefill worker: decode workers compute prompts"}),
        Readiness::Missing(missing) => {
            return error_response(ApiError::unavailable(format!(
                "not ready: no healthy {}",
                missing.join(" and no healthy ")
            )));
        }
    };
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// Whether the router can serve.
#[derive(Debug, PartialEq, Eq)]
enum Readiness {
    Ready,
    /// P/D mode without a healthy prefill worker: decode workers compute prompts.
    Degraded,
    /// Not ready: the kinds of worker with none healthy.
    Missing(Vec<&'static str>),
}

/// A healthy worker (replicated); in P/D mode a healthy decode worker, and a healthy
/// prefill worker too under `require_prefill` (without one, the router degrades).
fn readiness(mode: Mode, require_prefill: bool, healthy: impl Fn(Role) -> bool) -> Readiness {
    let needed: &[Role] = match mode {
        Mode::Replicated => &[Role::Both],
        Mode::Disaggregated if require_prefill => &[Role::Prefill, Role::Decode],
        Mode::Disaggregated => &[Role::Decode],
    };
    let missing: Vec<_> = needed
        .iter()
        .filter(|&&role| !healthy(role))
        .map(|&role| match role {
            Role::Both => "worker",
            Role::Prefill => "prefill worker",
            Role::Decode => "decode worker",
        })
        .collect();
    if !missing.is_empty() {
        Readiness::Missing(missing)
    } else if mode == Mode::Disaggregated && !healthy(Role::Prefill) {
        Readiness::Degraded
    } else {
        Readiness::Ready
    }
}

/// The toy proxy's `/healthcheck`: registered instances, no checks.
async fn healthcheck(State(state): State<SharedState>) -> Response {
    let workers = state.dispatcher.registry.all();
    let count = |role| workers.iter().filter(|w| w.role == role).count();
    axum::Json(json!({
        "status": "ok",
        "prefill_instances": count(Role::Prefill),
        "decode_instances": count(Role::Decode),
        "instances": workers.len(),
    }))
    .into_response()
}

async fn metrics(State(state): State<SharedState>) -> Response {
    let mut text = state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    if state.federate_worker_metrics {
        let workers = state.dispatcher.registry.urls();
        let own = tandem_protocol::exposition::family_names(&text);
        let client = state.dispatcher.upstream.client();
        text.push_str(&crate::federation::worker_metrics(client, &workers, &own).await);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys_are_checked_only_when_configured() {
        let mut headers = HeaderMap::new();
        let key = Secret::new("k");
        assert!(check_bearer(&headers, None).is_ok());
        assert_eq!(
            check_bearer(&headers, Some(&key)).unwrap_err().status(),
            401
        );
        headers.insert(header::AUTHORIZATION, "Bearer wrong".parse().unwrap());
        assert!(check_bearer(&headers, Some(&key)).is_err());
        headers.insert(header::AUTHORIZATION, "Bearer k".parse().unwrap());
        assert!(check_bearer(&headers, Some(&key)).is_ok());
    }

    #[test]
    fn pd_mode_is_ready_without_prefill_workers_unless_they_are_required() {
        let only = |up: Role| move |role| role == up;
        let pd = Mode::Disaggregated;
        assert_eq!(readiness(pd, false, |_| true), Readiness::Ready);
        assert_eq!(
            readiness(pd, false, only(Role::Decode)),
            Readiness::Degraded
        );
        assert_eq!(
            readiness(pd, true, only(Role::Decode)),
            Readiness::Missing(vec!["prefill worker"])
        );
        assert_eq!(
            readiness(pd, false, only(Role::Prefill)),
            Readiness::Missing(vec!["decode worker"])
        );
        assert_eq!(
            readiness(Mode::Replicated, false, |_| false),
            Readiness::Missing(vec!["worker"])
        );
        assert_eq!(
            readiness(Mode::Replicated, false, only(Role::Both)),
            Readiness::Ready
        );
    }

    #[test]
    fn request_ids_come_from_the_client_when_usable() {
        let mut headers = HeaderMap::new();
        assert_eq!(request_id(&headers).len(), 32);
        headers.insert(REQUEST_ID, "abc".parse().unwrap());
        assert_eq!(request_id(&headers), "abc");
        headers.insert(REQUEST_ID, " ".parse().unwrap());
        assert_ne!(request_id(&headers), " ");
    }
}
