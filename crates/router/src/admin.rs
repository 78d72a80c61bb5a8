//! The admin API, behind `--admin-token`: `GET /workers` lists the workers with their
//! health, circuit and load; `POST /workers {"url", "role"}` adds one (it takes
//! requests at once and is health-checked from then on); `DELETE /workers?url=…`
//! drains one (no new requests), then drops it once its requests have finished.
//!
//! A worker added with `"kv_events": {"endpoint": "tcp://host:port",
//! "replay_endpoint": "tcp://host:port"}` (replay optional) is followed into the KV
//! index at once; removing a worker stops its subscriber and forgets its blocks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tandem_protocol::openai::{ApiError, ErrorKind};

use crate::api::{SharedState, check_bearer};
use crate::config::{KvEventsSource, Mode, normalize_url};
use crate::error::error_response;
use crate::kv_follow::{self, CacheState, KvStream};
use crate::registry::{Role, Worker};

/// Longest a drained worker's requests may run before it is dropped anyway.
const DRAIN_LIMIT: Duration = Duration::from_secs(600);

fn authorize(state: &SharedState, headers: &HeaderMap) -> Result<(), ApiError> {
    match state.admin_token.as_ref() {
        None => Err(ApiError::new(
            ErrorKind::NotFound,
            "the admin API is disabled: start the router with --admin-token",
        )),
        Some(token) => check_bearer(headers, Some(token)),
    }
}

pub async fn list(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    if let Err(error) = authorize(&state, &headers) {
        return error_response(error);
    }
    let workers: Vec<_> = state
        .dispatcher
        .registry
        .all()
        .iter()
        .map(|w| {
            json!({
                "url": w.url,
                "role": w.role,
                "healthy": w.is_healthy(),
                "draining": w.is_draining(),
                "circuit": w.circuit_state().as_str(),
                "in_flight": w.in_flight_requests(),
                "kv_cache": kv_cache_state(&state, &w.url),
            })
        })
        .collect();
    Json(json!({ "workers": workers })).into_response()
}

/// Whether the router knows the worker's KV cache: `known`, `not_followed`,
/// `disconnected`, `stale` or `events_stopped`.
fn kv_cache_state(state: &SharedState, url: &str) -> &'static str {
    let Some(kv) = state.kv.as_ref() else {
        return "not_followed";
    };
    match kv.view().cache_state(url) {
        CacheState::Known => "known",
        CacheState::NotFollowed => "not_followed",
        CacheState::Disconnected => "disconnected",
        CacheState::Stale => "stale",
        CacheState::EventsStopped => "events_stopped",
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewWorker {
    url: String,
    role: Option<Role>,
    kv_events: Option<NewKvEvents>,
}

/// The KV event stream of a worker the admin API adds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKvEvents {
    endpoint: String,
    replay_endpoint: Option<String>,
}

/// The stream to follow for a new worker, validated before the worker is added.
fn kv_stream(url: &str, new: Option<NewKvEvents>) -> Result<Option<KvStream>, ApiError> {
    let Some(new) = new else {
        return Ok(None);
    };
    let source = KvEventsSource {
        worker: url.to_owned(),
        endpoint: new.endpoint,
        replay_endpoint: new.replay_endpoint,
    };
    kv_follow::stream_of(&source)
        .map(Some)
        .map_err(|e| ApiError::invalid_param("kv_events", e.to_string()))
}

pub async fn add(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Result<Json<NewWorker>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let result = async {
        authorize(&state, &headers)?;
        let Json(new) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let url =
            normalize_url(&new.url).map_err(|e| ApiError::invalid_param("url", e.to_string()))?;
        let role = role_for_mode(state.dispatcher.mode, new.role)?;
        let stream = kv_stream(&url, new.kv_events)?;
        let kv = match (stream, state.kv.as_ref()) {
            (Some(stream), Some(kv)) => Some((stream, kv)),
            (Some(_), None) => {
                return Err(ApiError::invalid_param(
                    "kv_events",
                    "the router does not follow KV events",
                ));
            }
            (None, _) => None,
        };
        let worker = Worker::new(url, role, &state.circuit);
        let added = state
            .dispatcher
            .registry
            .add(worker)
            .map_err(|e| ApiError::new(ErrorKind::BadRequest, e.to_string()))?;
        if let Some((stream, kv)) = kv {
            kv.follow(stream)
                .await
                .map_err(|e| ApiError::new(ErrorKind::Unavailable, e.to_string()))?;
        }
        tracing::info!(worker = added.url, role = role.as_str(), "worker added");
        Ok::<_, ApiError>(json!({"url": added.url, "role": role}))
    }
    .await;
    match result {
        Ok(body) => (StatusCode::CREATED, Json(body)).into_response(),
        Err(error) => error_response(error),
    }
}

/// The role a new worker takes: `both` in replicated mode, and in P/D mode the one
/// given (which must be `prefill` or `decode`).
fn role_for_mode(mode: Mode, role: Option<Role>) -> Result<Role, ApiError> {
    match (mode, role) {
        (Mode::Replicated, None | Some(Role::Both)) => Ok(Role::Both),
        (Mode::Disaggregated, Some(role @ (Role::Prefill | Role::Decode))) => Ok(role),
        (Mode::Replicated, Some(_)) => Err(ApiError::invalid_param(
            "role",
            "the router is in replicated mode: workers take role \"both\"",
        )),
        (Mode::Disaggregated, _) => Err(ApiError::invalid_param(
            "role",
            "the router is in P/D mode: give role \"prefill\" or \"decode\"",
        )),
    }
}

pub async fn remove(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Err(error) = authorize(&state, &headers) {
        return error_response(error);
    }
    let Some(url) = query.get("url").and_then(|u| normalize_url(u).ok()) else {
        return error_response(ApiError::invalid_param(
            "url",
            "give the worker as ?url=http://host:port",
        ));
    };
    let workers = state.dispatcher.registry.find(&url);
    if workers.is_empty() {
        return error_response(ApiError::not_found(format!("no worker {url}")));
    }
    if let Some(kv) = state.kv.as_ref()
        && kv.unfollow(&url).await.is_err()
    {
        tracing::warn!(worker = url, "the KV events thread has stopped");
    }
    for worker in workers {
        worker.start_draining();
        tokio::spawn(drop_when_idle(state.clone(), worker));
    }
    tracing::info!(worker = url, "draining worker");
    (
        StatusCode::ACCEPTED,
        Json(json!({"url": url, "draining": true})),
    )
        .into_response()
}

/// Drops a draining worker once its requests have finished (or after a bound).
async fn drop_when_idle(state: SharedState, worker: Arc<Worker>) {
    let started = tokio::time::Instant::now();
    while worker.in_flight_requests() > 0 && started.elapsed() < DRAIN_LIMIT {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    state.dispatcher.registry.remove(&worker);
    state.dispatcher.forget(&worker.url);
    tracing::info!(worker = worker.url, "worker removed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_must_fit_the_mode() {
        assert_eq!(role_for_mode(Mode::Replicated, None).unwrap(), Role::Both);
        assert!(role_for_mode(Mode::Replicated, Some(Role::Decode)).is_err());
        assert!(role_for_mode(Mode::Disaggregated, None).is_err());
        assert_eq!(
            role_for_mode(Mode::Disaggregated, Some(Role::Prefill)).unwrap(),
            Role::Prefill
        );
    }
}
