//! Running a client request through the workers: which worker(s), which legs, retries.
//!
//! Replicated mode sends the request to one worker. P/D mode sends the prefill leg to
//! a prefill worker, reads `kv_transfer_params` from its answer, and sends the decode
//! leg to a decode worker, whose answer is relayed. A leg that fails before any byte
//! reached the client (no connection, a timeout, a 429/5xx answer) is retried on
//! another worker of its pool, with exponential backoff and jitter, a bounded number
//! of times; the failed worker is excluded for the rest of the request.
//!
//! Conditional disaggregation (`local_prefill_threshold`) picks the decode worker
//! first and skips the prefill leg when that worker lacks fewer prompt tokens than the
//! threshold (by the router's own record of the prompts it sent there).
//!
//! With no prefill worker to reach (none available, or none that accepted a
//! connection), the decode worker computes the prompt itself unless `require_prefill`
//! says to refuse. The decode leg carries `kv_transfer_params` only when they came
//! from the prefill worker's answer: the client's own were removed when the request
//! was parsed.
//!
//! With a migration limit, a streamed answer whose worker fails mid-stream continues
//! on another worker ([`resume`], [`crate::migration`]).

mod resume;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::throttle::Throttle;

use axum::http::header;
use axum::response::Response;
use serde_json::{Map, Value};
use tandem_protocol::openai::{ApiError, ErrorKind};

use crate::config::{Mode, RetryConfig};
use crate::disagg::{self, Endpoint};
use crate::error::error_response;
use crate::kv_routing::{KvRouting, Prediction};
use crate::metrics as names;
use crate::migration;
use crate::policy::{Policy, PrefixCache, RequestInfo};
use crate::registry::{LoadGuard, Registry, Role, Worker};
use crate::relay::{self, ForwardHeaders, RequestTimer, Upstream};
use crate::signals::{Signals, Waiting};
use crate::tokens::{TokenCounter, uncached_tokens};
use std::sync::Arc;

/// One policy per pool.
#[derive(Debug)]
pub struct Policies(pub HashMap<Role, Box<dyn Policy>>);

impl Policies {
    fn get(&self, role: Role) -> &dyn Policy {
        self.0
            .get(&role)
            .map(Box::as_ref)
            .expect("a policy for every pool of the mode")
    }

    /// Tells every policy a worker left.
    pub fn forget(&self, url: &str) {
        for policy in self.0.values() {
            policy.forget(url);
        }
    }
}

/// What dispatching needs; shared by all requests.
#[derive(Debug)]
pub struct Dispatcher {
    pub mode: Mode,
    pub registry: Arc<Registry>,
    pub upstream: Upstream,
    pub policies: Arc<Policies>,
    pub retry: RetryConfig,
    pub conditional: Arc<Option<ConditionalDisagg>>,
    /// P/D mode: 503 instead of a decode-only answer when no prefill worker is reached.
    pub require_prefill: bool,
    /// With a `kv_aware` pool: the workers' caches and the requests' token ids.
    pub kv: Option<Arc<KvRouting>>,
    /// How many times one streamed answer may move to another worker (0: never).
    pub migration_limit: u32,
    /// With the online planner: where answers' latencies go.
    pub signals: Option<Arc<Signals>>,
}

/// A leg no worker answered.
#[derive(Debug, thiserror::Error)]
pub enum LegError {
    /// No worker of the pool could be tried (none healthy, all draining or open).
    #[error("no {role} worker is available")]
    NoWorker { role: &'static str },
    /// Every worker tried refused or failed the connection.
    #[error("no {role} worker could be reached (last: {last})")]
    Unreachable { role: &'static str, last: String },
    /// A worker was reached but gave no usable answer (a timeout, a broken body).
    #[error("no {role} worker could serve the request (last: {last})")]
    Failed { role: &'static str, last: String },
}

impl LegError {
    /// Whether no worker of the pool got the request (so another pool may take it).
    fn reached_none(&self) -> bool {
        matches!(
            self,
            LegError::NoWorker { .. } | LegError::Unreachable { .. }
        )
    }
}

impl From<LegError> for ApiError {
    fn from(error: LegError) -> Self {
        match error {
            LegError::NoWorker { .. } => ApiError::unavailable(error.to_string()),
            LegError::Unreachable { .. } | LegError::Failed { .. } => {
                ApiError::new(ErrorKind::BadGateway, error.to_string())
            }
        }
    }
}

/// "Decode workers compute prompts: no prefill worker", at most every 10 s.
static NO_PREFILL_WARNING: Throttle = Throttle::new(Duration::from_secs(10));
/// "A prefill answer had no kv_transfer_params", at most every 10 s.
static NO_PARAMS_WARNING: Throttle = Throttle::new(Duration::from_secs(10));

/// Decode-first routing that keeps short (or mostly cached) prompts on the decode
/// worker.
#[derive(Debug)]
pub struct ConditionalDisagg {
    /// Fewer uncached prompt tokens than this: no prefill leg.
    pub threshold: usize,
    pub counter: TokenCounter,
    /// Which prompts went to which decode worker.
    pub cache: PrefixCache,
}

/// One client request, parsed.
pub struct ClientRequest {
    pub endpoint: Endpoint,
    pub body: Map<String, Value>,
    pub headers: ForwardHeaders,
    pub arrival: Instant,
    /// Set by the dispatcher when the answer may migrate.
    pub resume: Option<ResumeTicket>,
    /// Set by the dispatcher for a streamed request while the planner's signals are
    /// kept: counts it as waiting until its first token is relayed.
    pub waiting: Option<Waiting>,
}

/// A request whose streamed answer may move to another worker: the worker is asked
/// for token ids, which the client sees only if it asked for them too.
#[derive(Debug, Clone, Copy)]
pub struct ResumeTicket {
    pub client_wants_ids: bool,
}

/// One upstream call to make, on some worker of `role`.
struct Leg<'a> {
    role: Role,
    /// The `leg` metric label.
    label: &'static str,
    path: &'static str,
    body: &'a Map<String, Value>,
    tokens: usize,
    /// Until the response headers arrive.
    limit: Duration,
    /// The worker to try first (chosen before the leg), if still available.
    preferred: Option<Selected>,
    /// Whether the worker computes the prompt itself (no KV handed to it), so that its
    /// reported cached tokens check the policy's prediction.
    computes_prompt: bool,
    /// Workers not to try (a migrated answer's failed ones).
    avoid: &'a [String],
}

/// An answered call: the worker's response (any status), its load guard and what the
/// policy predicted of its cache.
struct Called {
    response: reqwest::Response,
    guard: LoadGuard,
    prediction: Option<Prediction>,
}

/// Counts `leg` against `worker`'s load as the work it gives it: prompt tokens the
/// worker is predicted to hold are not part of it (see `Candidate::in_flight_tokens`).
fn load_guard(worker: &Arc<Worker>, leg: &Leg<'_>, prediction: Option<&Prediction>) -> LoadGuard {
    let output = disagg::output_tokens(leg.body).min(leg.tokens);
    let prompt = leg.tokens - output;
    let to_compute = prediction.map_or(prompt, |p| prompt.saturating_sub(p.cached_tokens));
    worker.load_guard(to_compute, output)
}

/// A worker chosen for a leg, with the policy's prediction of its cache.
#[derive(Clone)]
struct Selected {
    worker: Arc<Worker>,
    prediction: Option<Prediction>,
}

impl Dispatcher {
    /// The client's answer to `request`.
    pub async fn dispatch(self: &Arc<Self>, mut request: ClientRequest) -> Response {
        if self.migration_limit > 0 && migration::resumable(request.endpoint, &request.body) {
            let asked = request
                .body
                .insert(migration::RETURN_TOKEN_IDS.into(), Value::Bool(true));
            request.resume = Some(ResumeTicket {
                client_wants_ids: asked == Some(Value::Bool(true)),
            });
        }
        if let (true, Some(signals)) = (disagg::streamed(&request.body), &self.signals) {
            request.waiting = Some(signals.waiting_since(request.arrival));
        }
        let text = disagg::request_text(request.endpoint, &request.body);
        let token_ids = self.prompt_token_ids(&request).await;
        let info = RequestInfo {
            text: &text,
            tokens: token_ids.as_deref(),
        };
        // Exact when the prompt's token ids are known (kv_aware), estimated otherwise.
        let tokens = match &token_ids {
            Some(ids) => ids
                .len()
                .saturating_add(disagg::output_tokens(&request.body)),
            None => disagg::estimated_tokens(&text, &request.body),
        };
        let result = match self.mode {
            Mode::Replicated => self.replicated(&request, &info, tokens).await,
            Mode::Disaggregated => self.disaggregated(&request, &info, tokens).await,
        };
        result.unwrap_or_else(error_response)
    }

    async fn replicated(
        self: &Arc<Self>,
        request: &ClientRequest,
        info: &RequestInfo<'_>,
        tokens: usize,
    ) -> Result<Response, ApiError> {
        let leg = Leg {
            role: Role::Both,
            label: "whole",
            path: request.endpoint.path(),
            body: &request.body,
            tokens,
            limit: self.upstream.timeouts().first_byte(),
            preferred: None,
            computes_prompt: true,
            avoid: &[],
        };
        let called = self.call(&leg, info, &request.headers).await?;
        Ok(self.relay(called, request).await)
    }

    /// Forgets a worker that left (policies and the cache model).
    pub fn forget(&self, url: &str) {
        self.policies.forget(url);
        if let Some(conditional) = self.conditional.as_ref() {
            conditional.cache.forget(url);
        }
    }

    async fn disaggregated(
        self: &Arc<Self>,
        request: &ClientRequest,
        info: &RequestInfo<'_>,
        tokens: usize,
    ) -> Result<Response, ApiError> {
        if let Some(reason) = disagg::must_run_locally(request.endpoint, &request.body) {
            count_decision("local", reason.as_str());
            return self
                .decode(request, &request.body, info, tokens, None)
                .await;
        }
        let (decode_worker, reason) = match self.decode_first(info)? {
            DecodeFirst::Local(selected) => {
                count_decision("local", "below_threshold");
                return self
                    .decode(request, &request.body, info, tokens, Some(selected))
                    .await;
            }
            DecodeFirst::Remote(worker, reason) => (worker, reason),
        };
        let prefill_body = disagg::prefill_leg(&request.body);
        let answer = match self.prefill(request, &prefill_body, info, tokens).await {
            Err(error) if error.reached_none() && !self.require_prefill => {
                return self
                    .without_prefill(&error, request, info, tokens, decode_worker)
                    .await;
            }
            result => {
                count_decision("remote", reason);
                result?
            }
        };
        let answer = match answer {
            PrefillAnswer::Ok(answer) => answer,
            PrefillAnswer::Error(response) => return Ok(response),
        };
        let handoff_started = Instant::now();
        let decode_body = decode_body(&request.body, &answer);
        let response = self
            .decode(request, &decode_body, info, tokens, decode_worker)
            .await;
        metrics::histogram!(names::HANDOFF_SECONDS).record(handoff_started.elapsed().as_secs_f64());
        response
    }

    /// With conditional disaggregation, the decode worker picked first and whether the
    /// prompt stays on it; else a remote prefill on any decode worker.
    fn decode_first(&self, info: &RequestInfo<'_>) -> Result<DecodeFirst, ApiError> {
        let Some(conditional) = self.conditional.as_ref() else {
            return Ok(DecodeFirst::Remote(None, "always"));
        };
        let selected = self
            .select(Role::Decode, &[], info)
            .ok_or_else(|| ApiError::unavailable("no decode worker is available"))?;
        let cached_chars = conditional
            .cache
            .match_and_record(&selected.worker.url, info.text);
        let uncached = match self.exact_uncached(&selected.worker.url, info) {
            Some(uncached) => uncached,
            None => {
                let prompt_tokens = conditional.counter.count(info.text);
                uncached_tokens(prompt_tokens, info.text.len(), cached_chars)
            }
        };
        if uncached < conditional.threshold {
            return Ok(DecodeFirst::Local(selected));
        }
        Ok(DecodeFirst::Remote(Some(selected), "above_threshold"))
    }

    /// The prompt tokens `url` would have to compute, from its KV events, when the
    /// router has the prompt's token ids and knows that worker's cache.
    fn exact_uncached(&self, url: &str, info: &RequestInfo<'_>) -> Option<usize> {
        let tokens = info.tokens?;
        let cached = self.kv.as_ref()?.cached_on(url, tokens)?;
        Some(tokens.len().saturating_sub(cached))
    }

    /// The decode worker alone computes the prompt: no prefill worker was reached.
    /// The body is the client's, whose `kv_transfer_params` are already gone.
    async fn without_prefill(
        self: &Arc<Self>,
        error: &LegError,
        request: &ClientRequest,
        info: &RequestInfo<'_>,
        tokens: usize,
        decode_worker: Option<Selected>,
    ) -> Result<Response, ApiError> {
        count_decision("local", "no_prefill_worker");
        if let Some(held_back) = NO_PREFILL_WARNING.admit(Instant::now()) {
            tracing::warn!(
                %error,
                held_back,
                "decode workers compute prompts themselves until a prefill worker is back"
            );
        }
        self.decode(request, &request.body, info, tokens, decode_worker)
            .await
    }

    async fn prefill(
        &self,
        request: &ClientRequest,
        body: &Map<String, Value>,
        info: &RequestInfo<'_>,
        tokens: usize,
    ) -> Result<PrefillAnswer, LegError> {
        let started = Instant::now();
        let limit = self.upstream.timeouts().prefill();
        let leg = Leg {
            role: Role::Prefill,
            label: "prefill",
            path: request.endpoint.path(),
            body,
            tokens,
            limit,
            preferred: None,
            computes_prompt: true,
            avoid: &[],
        };
        let Called {
            response,
            guard,
            prediction,
        } = self.call(&leg, info, &request.headers).await?;
        let status = response.status();
        let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
        let remaining = limit.saturating_sub(started.elapsed());
        let bytes = match tokio::time::timeout(remaining, response.bytes()).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(err)) => return Err(broken(&guard, format!("reading its answer: {err}"))),
            Err(_) => return Err(broken(&guard, format!("no answer within {limit:?}"))),
        };
        drop(guard);
        metrics::histogram!(names::PREFILL_LEG_SECONDS).record(started.elapsed().as_secs_f64());
        if !status.is_success() {
            // The client learns what P said (a context-length 400, say), as P said it.
            let response = relay::passthrough(status.as_u16(), content_type, bytes);
            return Ok(PrefillAnswer::Error(response));
        }
        let answer = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if let Some(prediction) = prediction {
            prediction.check_answer(&answer);
        }
        Ok(PrefillAnswer::Ok(answer))
    }

    async fn decode(
        self: &Arc<Self>,
        request: &ClientRequest,
        body: &Map<String, Value>,
        info: &RequestInfo<'_>,
        tokens: usize,
        preferred: Option<Selected>,
    ) -> Result<Response, ApiError> {
        let leg = Leg {
            role: Role::Decode,
            label: "decode",
            path: request.endpoint.path(),
            body,
            tokens,
            limit: self.upstream.timeouts().first_byte(),
            preferred,
            computes_prompt: !body.contains_key(disagg::KV_TRANSFER_PARAMS),
            avoid: &[],
        };
        let called = self.call(&leg, info, &request.headers).await?;
        Ok(self.relay(called, request).await)
    }

    /// The latency bookkeeping of `request`'s relayed answer.
    fn timer(&self, request: &ClientRequest, prediction: Option<Prediction>) -> RequestTimer {
        RequestTimer::new(request.arrival)
            .checking(prediction)
            .recording(self.signals.clone(), request.waiting.clone())
    }

    async fn relay(self: &Arc<Self>, called: Called, request: &ClientRequest) -> Response {
        if let Some(ticket) = request.resume
            && resume::is_ok_event_stream(&called.response)
        {
            return self.relay_resumable(called, request, ticket);
        }
        relay::relay(
            called.response,
            &request.headers.request_id,
            vec![called.guard],
            self.timer(request, called.prediction),
            self.upstream.timeouts().idle(),
        )
        .await
    }

    /// Makes `leg`'s call, retrying on other workers; the answer of the last worker
    /// tried, or an error when none answered.
    async fn call(
        &self,
        leg: &Leg<'_>,
        info: &RequestInfo<'_>,
        headers: &ForwardHeaders,
    ) -> Result<Called, LegError> {
        let mut excluded: Vec<String> = leg.avoid.to_vec();
        let mut last_failure = None;
        let mut all_unreachable = true;
        for attempt in 0..self.retry.max_attempts {
            let preferred = leg
                .preferred
                .as_ref()
                .filter(|chosen| attempt == 0 && chosen.worker.is_available());
            let Some(Selected { worker, prediction }) = preferred
                .cloned()
                .or_else(|| self.select(leg.role, &excluded, info))
            else {
                break;
            };
            let prediction = prediction.filter(|_| leg.computes_prompt);
            if attempt > 0 {
                metrics::counter!(names::RETRIES_TOTAL, names::LEG => leg.label).increment(1);
                tokio::time::sleep(self.retry.backoff(attempt, rand::random())).await;
            }
            let guard = load_guard(&worker, leg, prediction.as_ref());
            if let Some(kv) = &self.kv {
                kv.lookup.note_routed(&worker.url);
            }
            match self
                .upstream
                .post(&worker.url, leg.path, leg.body, headers, leg.limit)
                .await
            {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let failed = is_retryable(status);
                    worker.record_call(leg.label, !failed);
                    excluded.push(worker.url.clone());
                    let last_try = attempt + 1 == self.retry.max_attempts
                        || !self.registry.has_available(leg.role, &excluded);
                    if !failed || last_try {
                        return Ok(Called {
                            response,
                            guard,
                            prediction,
                        });
                    }
                    tracing::warn!(
                        worker = worker.url,
                        status,
                        leg = leg.label,
                        "retrying on another worker"
                    );
                }
                Err(err) => {
                    worker.record_call(leg.label, false);
                    all_unreachable &= err.is_connect();
                    tracing::warn!(worker = worker.url, %err, leg = leg.label, "upstream call failed");
                    last_failure = Some(format!("{}: {err}", worker.url));
                    excluded.push(worker.url.clone());
                }
            }
        }
        let role = leg.role.as_str();
        Err(match last_failure {
            Some(last) if all_unreachable => LegError::Unreachable { role, last },
            Some(last) => LegError::Failed { role, last },
            None => LegError::NoWorker { role },
        })
    }

    /// The policy's pick among the available workers of `role`, minus `excluded`.
    fn select(&self, role: Role, excluded: &[String], info: &RequestInfo<'_>) -> Option<Selected> {
        let workers = self.registry.available(role, excluded);
        let candidates: Vec<_> = workers.iter().map(|w| w.candidate()).collect();
        let pick = self.policies.get(role).pick(&candidates, info)?;
        let worker = workers.get(pick.index).cloned()?;
        let prediction = pick
            .predicted_cached_tokens
            .map(|cached_tokens| Prediction { cached_tokens });
        Some(Selected { worker, prediction })
    }

    /// The prompt's token ids for `kv_aware`, when a pool uses it and they can be had;
    /// a worker that would compute the prompt tokenizes it.
    async fn prompt_token_ids(&self, request: &ClientRequest) -> Option<Vec<u32>> {
        let kv = self.kv.as_ref()?;
        let role = match self.mode {
            Mode::Replicated => Role::Both,
            Mode::Disaggregated if self.registry.has_available(Role::Prefill, &[]) => Role::Prefill,
            Mode::Disaggregated => Role::Decode,
        };
        let workers = self.registry.available(role, &[]);
        let client = self.upstream.client();
        kv.prompt_token_ids(client, request.endpoint, &request.body, &workers)
            .await
    }
}

/// The decode leg: the client's body (its own params already gone) with the params of
/// P's answer; without usable ones, the body alone (D computes the prompt), counted.
fn decode_body(body: &Map<String, Value>, answer: &Value) -> Map<String, Value> {
    if let Some(params) = disagg::handoff_params(answer) {
        return disagg::decode_leg(body, params);
    }
    if let Some(held_back) = NO_PARAMS_WARNING.admit(Instant::now()) {
        tracing::warn!(
            held_back,
            "a prefill answer has no kv_transfer_params: the decode worker computes the prompt"
        );
    }
    metrics::counter!(names::PD_FALLBACKS_TOTAL).increment(1);
    body.clone()
}

/// Where a P/D request's decode leg goes, decided before any prefill leg.
enum DecodeFirst {
    /// Straight to this decode worker (few uncached tokens).
    Local(Selected),
    /// After a prefill leg, to this decode worker if chosen already; the reason label.
    Remote(Option<Selected>, &'static str),
}

enum PrefillAnswer {
    Ok(Value),
    /// P's non-success answer, to relay as is.
    Error(Response),
}

/// A prefill worker answered headers but no usable body.
fn broken(guard: &LoadGuard, what: String) -> LegError {
    let worker = guard.worker();
    worker.record_outcome(false);
    LegError::Failed {
        role: Role::Prefill.as_str(),
        last: format!("{}: {what}", worker.url),
    }
}

/// Statuses another worker may answer better: overload and server-side failures.
fn is_retryable(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

fn count_decision(decision: &'static str, reason: &'static str) {
    metrics::counter!(names::DISAGG_DECISIONS_TOTAL,
        names::DECISION => decision, names::REASON => reason)
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_and_server_errors_are_retried_client_errors_are_not() {
        for status in [429, 500, 502, 503, 504] {
            assert!(is_retryable(status));
        }
        for status in [200, 400, 401, 404, 413, 422] {
            assert!(!is_retryable(status));
        }
    }

    #[test]
    fn only_a_pool_nobody_reached_lets_another_pool_take_the_request() {
        let last = || "http://p:1: refused".to_owned();
        let none = LegError::NoWorker { role: "prefill" };
        let unreachable = LegError::Unreachable {
            role: "prefill",
            last: last(),
        };
        let failed = LegError::Failed {
            role: "prefill",
            last: last(),
        };
        assert!(none.reached_none() && unreachable.reached_none());
        assert!(!failed.reached_none());
        assert_eq!(ApiError::from(none).status(), 503);
        assert_eq!(ApiError::from(unreachable).status(), 502);
        assert_eq!(ApiError::from(failed).status(), 502);
    }
}
