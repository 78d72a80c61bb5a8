//! The relay of a streamed answer that may migrate: events pass through a
//! [`StreamLedger`]; when the worker fails mid-stream (a broken connection, nothing
//! within the idle timeout, an end without `[DONE]`), the answer continues on another
//! worker of the pool, up to the migration limit, and the client's stream goes on
//! with no gap and no repeated token. Dropping the body (the client left) drops the
//! upstream request, as with the plain relay.

use std::pin::Pin;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use serde_json::{Map, Value};
use tokio::time::Sleep;

use super::{Called, ClientRequest, Dispatcher, Leg, LegError, ResumeTicket};
use crate::config::Mode;
use crate::disagg;
use crate::metrics as names;
use crate::migration::{NextStep, StreamLedger};
use crate::policy::RequestInfo;
use crate::registry::{LoadGuard, Role};
use crate::relay::{self, ForwardHeaders, RequestTimer};

/// Whether a worker's response is a successful event stream (what can migrate).
pub(super) fn is_ok_event_stream(response: &reqwest::Response) -> bool {
    response.status().is_success()
        && response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// A streamed answer on its way to the client, and what it takes to continue it.
struct ResumableStream {
    dispatcher: Arc<Dispatcher>,
    /// The request as the client sent it (plus `return_token_ids`).
    client_body: Map<String, Value>,
    headers: ForwardHeaders,
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    /// The current worker's load guard.
    guards: Vec<LoadGuard>,
    timer: RequestTimer,
    ledger: StreamLedger,
    migrations_left: u32,
    /// Workers that failed this answer.
    failed: Vec<String>,
    /// When the current worker has been silent for the idle timeout.
    deadline: Pin<Box<Sleep>>,
    ended: bool,
}

impl Dispatcher {
    /// The client's response for `called`, relayed through a ledger so that it can
    /// continue elsewhere.
    pub(super) fn relay_resumable(
        self: &Arc<Self>,
        called: Called,
        request: &ClientRequest,
        ticket: ResumeTicket,
    ) -> Response {
        let content_type = called.response.headers().get(header::CONTENT_TYPE).cloned();
        let mut timer = self.timer(request, called.prediction);
        timer.ok_stream();
        let state = ResumableStream {
            dispatcher: Arc::clone(self),
            client_body: request.body.clone(),
            headers: request.headers.clone(),
            upstream: called.response.bytes_stream().boxed(),
            guards: vec![called.guard],
            timer,
            ledger: StreamLedger::new(request.endpoint, &request.body, ticket.client_wants_ids),
            migrations_left: self.migration_limit,
            failed: Vec::new(),
            deadline: Box::pin(tokio::time::sleep(self.upstream.timeouts().idle())),
            ended: false,
        };
        let body = stream::unfold(state, |mut state| async move {
            let bytes = state.next_bytes().await?;
            Some((Ok::<_, std::io::Error>(bytes), state))
        });
        relay::streamed_response(
            StatusCode::OK,
            content_type,
            &request.headers.request_id,
            true,
            Body::from_stream(body),
        )
    }

    /// Sends a continuation to `path` on a worker of the decoding pool other than
    /// `avoid`.
    async fn resume(
        &self,
        path: &'static str,
        body: &Map<String, Value>,
        prompt_ids: &[u32],
        avoid: &[String],
        headers: &ForwardHeaders,
    ) -> Result<Called, LegError> {
        let (role, label) = match self.mode {
            Mode::Replicated => (Role::Both, "whole"),
            Mode::Disaggregated => (Role::Decode, "decode"),
        };
        let leg = Leg {
            role,
            label,
            path,
            body,
            tokens: prompt_ids.len() + disagg::output_tokens(body),
            limit: self.upstream.timeouts().first_byte(),
            preferred: None,
            computes_prompt: true,
            avoid,
        };
        let info = RequestInfo {
            text: "",
            tokens: Some(prompt_ids),
        };
        self.call(&leg, &info, headers).await
    }
}

impl ResumableStream {
    /// The next bytes for the client; `None` at the end.
    async fn next_bytes(&mut self) -> Option<Bytes> {
        loop {
            if self.ended {
                return None;
            }
            let idle = self.dispatcher.upstream.timeouts().idle();
            let next = tokio::select! {
                next = self.upstream.next() => Ok(next),
                () = self.deadline.as_mut() => Err(()),
            };
            let failure = match next {
                Ok(Some(Ok(chunk))) => {
                    self.deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + idle);
                    self.timer.chunk_relayed(&chunk, true, &mut self.guards);
                    let out = self.ledger.relay(&chunk);
                    self.ended = self.ledger.is_done();
                    if out.is_empty() {
                        continue;
                    }
                    return Some(Bytes::from(out));
                }
                Ok(None) if self.ledger.is_done() => return None,
                Ok(None) => "the worker's answer ended before [DONE]".to_owned(),
                Ok(Some(Err(err))) => format!("the worker's answer broke off: {err}"),
                Err(_) => format!("the worker sent nothing for {idle:?}"),
            };
            if let Some(end) = self.recover(failure).await {
                self.ended = true;
                return Some(end);
            }
        }
    }

    /// After the worker failed: continues on another worker (`None`), or the bytes
    /// that end the client's stream.
    async fn recover(&mut self, failure: String) -> Option<Bytes> {
        if let Some(guard) = self.guards.first() {
            let worker = guard.worker();
            worker.record_outcome(false);
            self.failed.push(worker.url.clone());
        }
        let worker = self.failed.last().cloned().unwrap_or_default();
        match self
            .ledger
            .next_step(&self.client_body, self.migrations_left)
        {
            NextStep::Finish(tail) => {
                count("completed");
                tracing::warn!(%worker, %failure, "a worker failed after its answer's last token; the router ended the stream");
                Some(Bytes::from(tail))
            }
            NextStep::GiveUp(why) => {
                count("not_resumable");
                tracing::warn!(%worker, %failure, why, "a streamed answer broke off and cannot migrate");
                Some(relay::sse_error_end(&format!(
                    "{failure}; the answer cannot continue elsewhere: {why}"
                )))
            }
            NextStep::Resume {
                path,
                body,
                prompt_ids,
            } => {
                self.migrations_left -= 1;
                let resumed = self
                    .dispatcher
                    .resume(path, &body, &prompt_ids, &self.failed, &self.headers)
                    .await;
                self.continue_with(resumed, &worker, &failure)
            }
        }
    }

    /// Relays the continuation's answer from now on, or ends the stream with why not.
    fn continue_with(
        &mut self,
        resumed: Result<Called, LegError>,
        worker: &str,
        failure: &str,
    ) -> Option<Bytes> {
        let error = match resumed {
            Ok(called) if is_ok_event_stream(&called.response) => {
                let to = called.guard.worker().url.clone();
                self.guards = vec![called.guard];
                self.upstream = called.response.bytes_stream().boxed();
                let idle = self.dispatcher.upstream.timeouts().idle();
                self.deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + idle);
                self.ledger.begin_continuation();
                self.timer.forget_prediction();
                count("resumed");
                tracing::warn!(
                    from = worker,
                    %to,
                    %failure,
                    tokens = self.ledger.generated_tokens(),
                    "a streamed answer migrated"
                );
                return None;
            }
            Ok(called) => format!(
                "the continuation was refused ({})",
                called.response.status()
            ),
            Err(error) => error.to_string(),
        };
        count("failed");
        tracing::warn!(from = worker, %failure, %error, "a streamed answer could not migrate");
        Some(relay::sse_error_end(&format!(
            "{failure}; continuing elsewhere failed: {error}"
        )))
    }
}

fn count(outcome: &'static str) {
    metrics::counter!(names::MIGRATIONS_TOTAL, names::OUTCOME => outcome).increment(1);
}
