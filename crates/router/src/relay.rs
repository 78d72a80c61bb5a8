//! Upstream calls and the relay of their answers: one pooled HTTP client for every
//! worker; a response is passed to the client with the worker's status and content
//! type, its body streamed chunk by chunk as it arrives. The relayed body owns the
//! request's load guards and latency timer, so a worker's in-flight count falls when
//! the client has the last byte, or the moment it goes away (which also drops, and so
//! cancels, the upstream request).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{BoxStream, Stream, StreamExt};
use serde_json::{Map, Value};
use tokio::time::Sleep;

use crate::config::Timeouts;
use crate::kv_routing::Prediction;
use crate::metrics as names;
use crate::registry::LoadGuard;
use crate::secret::Secret;
use crate::signals::{EventClock, Signals, Waiting};

/// How long an idle upstream connection is kept for reuse.
const UPSTREAM_IDLE: Duration = Duration::from_secs(4);

/// The request id header, shared by both legs of a P/D request.
pub const REQUEST_ID: &str = "x-request-id";

/// What goes with every upstream call of one client request. The client's own
/// headers (its `Authorization` above all) are not among them: workers get the
/// router's worker key, set on the client (see [`Upstream::new`]).
#[derive(Debug, Clone)]
pub struct ForwardHeaders {
    pub request_id: String,
}

/// The HTTP client for every worker.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: reqwest::Client,
    timeouts: Timeouts,
}

/// The upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Client(#[from] reqwest::Error),
    #[error("the worker API key cannot be sent as an HTTP header")]
    WorkerKey(#[from] header::InvalidHeaderValue),
}

/// An upstream call that produced no response.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    Transport(#[from] reqwest::Error),
    #[error("no response within {0:?}")]
    Timeout(Duration),
}

impl CallError {
    /// Whether the worker was never reached (the connection failed).
    pub fn is_connect(&self) -> bool {
        matches!(self, CallError::Transport(err) if err.is_connect())
    }
}

impl Upstream {
    /// The client for every call to workers. With `worker_key`, each of its calls
    /// (both legs, retries, `/v1/models`, health checks) carries
    /// `Authorization: Bearer <worker_key>`, marked sensitive so no `Debug` shows it.
    /// Redirects are not followed: a worker cannot send the router, and its key,
    /// elsewhere.
    pub fn new(timeouts: Timeouts, worker_key: Option<&Secret>) -> Result<Self, UpstreamError> {
        let client = reqwest::Client::builder()
            .default_headers(worker_headers(worker_key)?)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeouts.connect())
            .tcp_nodelay(true)
            // Enough for steady load; a burst's extra connections are closed when
            // idle instead of each holding its buffers (RSS with 1,000 streams
            // 119 -> 100 MiB).
            .pool_max_idle_per_host(128)
            // Workers close idle keep-alive connections (tandem's after its header read
            // timeout, 10 s by default; uvicorn's after 5 s): drop them first, so a
            // request never goes out on a connection the worker is closing.
            .pool_idle_timeout(UPSTREAM_IDLE)
            .http1_only()
            .build()?;
        Ok(Self { client, timeouts })
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// POSTs `body` to `base + path`; returns once the response headers are in.
    pub async fn post(
        &self,
        base: &str,
        path: &str,
        body: &Map<String, Value>,
        headers: &ForwardHeaders,
        limit: Duration,
    ) -> Result<reqwest::Response, CallError> {
        let json = serde_json::to_vec(body).expect("a JSON map serializes");
        let request = self
            .client
            .post(format!("{base}{path}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header(REQUEST_ID, &headers.request_id)
            .body(json);
        match tokio::time::timeout(limit, request.send()).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(CallError::Timeout(limit)),
        }
    }
}

/// The headers of every upstream call: the worker key's `Authorization`, if any.
fn worker_headers(worker_key: Option<&Secret>) -> Result<HeaderMap, UpstreamError> {
    let mut headers = HeaderMap::new();
    if let Some(key) = worker_key {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose()))?;
        value.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, value);
    }
    Ok(headers)
}

/// Latency bookkeeping of one client request, recorded by the relayed body.
#[derive(Debug)]
pub struct RequestTimer {
    arrival: Instant,
    first_byte_seen: bool,
    /// The policy's cache prediction, checked against the usage in the answer.
    prediction: Option<Prediction>,
    /// Where a successful streamed answer's latencies go for the planner.
    signals: Option<Arc<Signals>>,
    /// The request counted as waiting for its first token, until it comes.
    waiting: Option<Waiting>,
    /// The answer is a successful event stream (only those are signals).
    ok_stream: bool,
    events: EventClock,
}

impl RequestTimer {
    pub fn new(arrival: Instant) -> Self {
        Self {
            arrival,
            first_byte_seen: false,
            prediction: None,
            signals: None,
            waiting: None,
            ok_stream: false,
            events: EventClock::default(),
        }
    }

    /// Also records the answer's latencies in `signals`, if it is a successful stream,
    /// and ends `waiting` with its first byte.
    pub fn recording(mut self, signals: Option<Arc<Signals>>, waiting: Option<Waiting>) -> Self {
        self.signals = signals;
        self.waiting = waiting;
        self
    }

    /// The answer is a successful event stream: its latencies are signals.
    pub(crate) fn ok_stream(&mut self) {
        self.ok_stream = true;
    }

    /// Also checks `prediction` against the cached tokens the answer reports.
    pub fn checking(mut self, prediction: Option<Prediction>) -> Self {
        self.prediction = prediction;
        self
    }

    /// Stops checking the prediction (the answer moved to another worker).
    pub(crate) fn forget_prediction(&mut self) {
        self.prediction = None;
    }

    /// Checks the prediction against a whole answer.
    fn check_whole(&mut self, body: &[u8]) {
        if let Some(prediction) = self.prediction.take()
            && let Ok(answer) = serde_json::from_slice::<serde_json::Value>(body)
        {
            prediction.check_answer(&answer);
        }
    }

    /// Checks the prediction against an SSE chunk, if it holds the usage.
    fn check_chunk(&mut self, chunk: &[u8]) {
        if let Some(prediction) = self.prediction
            && prediction.check_sse_chunk(chunk)
        {
            self.prediction = None;
        }
    }

    /// Bookkeeping of a relayed chunk: the first one marks the worker's prompt as
    /// computed (`guards`) and the time to first byte; an SSE chunk may hold the usage
    /// that checks the prediction.
    pub(crate) fn chunk_relayed(&mut self, chunk: &[u8], is_sse: bool, guards: &mut [LoadGuard]) {
        if !self.first_byte_seen {
            guards.iter_mut().for_each(LoadGuard::prompt_computed);
        }
        self.first_byte();
        if is_sse {
            self.check_chunk(chunk);
            if let (true, Some(signals)) = (self.ok_stream, &self.signals)
                && let Some(tpot) = self.events.chunk(chunk)
            {
                signals.record_tpot(tpot);
            }
        }
    }

    fn first_byte(&mut self) {
        if !self.first_byte_seen {
            self.first_byte_seen = true;
            if let Some(waiting) = self.waiting.take() {
                waiting.answered();
            }
            let secs = self.arrival.elapsed().as_secs_f64();
            metrics::histogram!(names::TIME_TO_FIRST_BYTE_SECONDS).record(secs);
            if let (true, Some(signals)) = (self.ok_stream, &self.signals) {
                signals.record_ttft(secs);
            }
        }
    }
}

/// Largest answer with a known length that is read whole and sent in one piece
/// (no chunked encoding, fewer writes); longer or unsized answers are streamed.
const WHOLE_BODY_LIMIT: u64 = 1 << 20;

/// Turns an upstream response into the client's: same status, same content type, the
/// body relayed as it arrives (a small answer of known length, read whole first).
/// `guards` and `timer` live as long as the body.
pub async fn relay(
    upstream: reqwest::Response,
    request_id: &str,
    guards: Vec<LoadGuard>,
    mut timer: RequestTimer,
    idle: Duration,
) -> Response {
    let status =
        StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
    let is_sse = content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let small = upstream
        .content_length()
        .is_some_and(|length| length <= WHOLE_BODY_LIMIT);
    if small && !is_sse {
        let body = match tokio::time::timeout(idle, upstream.bytes()).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(err)) => return broken_answer(format!("the worker's answer broke off: {err}")),
            Err(_) => return broken_answer(format!("the worker sent nothing for {idle:?}")),
        };
        timer.first_byte();
        timer.check_whole(&body);
        drop(guards);
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        set_headers(response.headers_mut(), content_type, request_id, false);
        return response;
    }
    if is_sse && status.is_success() {
        timer.ok_stream();
    }
    let body = RelayBody {
        inner: upstream.bytes_stream().boxed(),
        idle,
        deadline: Box::pin(tokio::time::sleep(idle)),
        is_sse,
        ended: false,
        guards,
        timer,
    };
    streamed_response(
        status,
        content_type,
        request_id,
        is_sse,
        Body::from_stream(body),
    )
}

fn set_headers(
    headers: &mut HeaderMap,
    content_type: Option<HeaderValue>,
    request_id: &str,
    is_sse: bool,
) {
    if let Some(content_type) = content_type {
        headers.insert(header::CONTENT_TYPE, content_type);
    }
    if let Ok(id) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID, id);
    }
    if is_sse {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
}

/// The end of an SSE answer that broke off: an in-band error event (the client has a
/// 200 already), then `[DONE]`.
pub(crate) fn sse_error_end(message: &str) -> Bytes {
    let error = serde_json::json!({"error": {"message": message,
        "type": "BadGateway", "param": null, "code": 502}});
    Bytes::from(format!("data: {error}\n\ndata: [DONE]\n\n"))
}

/// A streamed response to the client: the worker's status and content type, the
/// request id, `body`.
pub(crate) fn streamed_response(
    status: StatusCode,
    content_type: Option<HeaderValue>,
    request_id: &str,
    is_sse: bool,
    body: Body,
) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    set_headers(response.headers_mut(), content_type, request_id, is_sse);
    response
}

/// The client's answer when a worker's whole answer could not be read.
fn broken_answer(message: String) -> Response {
    tracing::warn!(%message, "upstream answer failed");
    crate::error::error_response(tandem_protocol::openai::ApiError::new(
        tandem_protocol::openai::ErrorKind::BadGateway,
        message,
    ))
}

/// An upstream body on its way to the client, with an idle deadline between chunks.
struct RelayBody {
    inner: BoxStream<'static, reqwest::Result<Bytes>>,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    is_sse: bool,
    ended: bool,
    guards: Vec<LoadGuard>,
    timer: RequestTimer,
}

impl RelayBody {
    /// Ends the body after an upstream failure: an in-band error event for SSE (the
    /// client has a 200 already), a broken body otherwise.
    fn fail(&mut self, message: String) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        self.ended = true;
        tracing::warn!(%message, "upstream body failed mid-relay");
        if self.is_sse {
            return Poll::Ready(Some(Ok(sse_error_end(&message))));
        }
        Poll::Ready(Some(Err(std::io::Error::other(message))))
    }
}

impl Stream for RelayBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                let this = &mut *self;
                this.timer
                    .chunk_relayed(&chunk, this.is_sse, &mut this.guards);
                let next = tokio::time::Instant::now() + self.idle;
                self.deadline.as_mut().reset(next);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(err))) => {
                self.fail(format!("the worker's answer broke off: {err}"))
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let idle = self.idle;
                    self.fail(format!("the worker sent nothing for {idle:?}"))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        metrics::histogram!(names::E2E_SECONDS).record(self.arrival.elapsed().as_secs_f64());
        if let (true, Some(signals)) = (self.ok_stream, &self.signals)
            && let Some(tpot) = self.events.rest(Instant::now())
        {
            signals.record_tpot(tpot);
        }
    }
}

/// A response made of a worker's status and body, already read (a prefill error).
pub fn passthrough(status: u16, content_type: Option<HeaderValue>, body: Bytes) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, body).into_response();
    if let Some(content_type) = content_type {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_key_is_a_sensitive_bearer_header() {
        assert!(worker_headers(None).unwrap().is_empty());
        let headers = worker_headers(Some(&Secret::new("w-key"))).unwrap();
        let value = &headers[header::AUTHORIZATION];
        assert_eq!(value, "Bearer w-key");
        assert!(value.is_sensitive());
        assert!(!format!("{headers:?}").contains("w-key"));
        let upstream = Upstream::new(Timeouts::default(), Some(&Secret::new("w-key"))).unwrap();
        assert!(!format!("{upstream:?}").contains("w-key"));
        assert!(worker_headers(Some(&Secret::new("a\nb"))).is_err());
    }
}
