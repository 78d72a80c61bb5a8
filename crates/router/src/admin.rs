//! The admin API, behind `--admin-token`: `GET /workers` lists the workers with their
//! health, circuit and load; `POST /workers {"url", "role"}` adds one (it takes
//! requests at once and is health-checked from then on); `POST /workers/{url}/drain`
//! stops new requests to one (its requests finish; it stays listed, draining);
//! `DELETE /workers?url=…` drains one, then drops it once its requests have finished;
//! `POST /workers/{url}/move {"role"}` moves a P/D worker to the other pool (drained
//! first, no restart); `GET /planner` shows the online planner's settings and recent
//! verdicts (`?since=<unix seconds>`). The work itself is
//! [`membership`](crate::membership)'s, shared with discovery and the planner.
//!
//! A worker added with `"kv_events": {"endpoint": "tcp://host:port",
//! "replay_endpoint": "tcp://host:port"}` (replay optional) is followed into the KV
//! index at once; removing a worker stops its subscriber and forgets its blocks.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tandem_protocol::openai::{ApiError, ErrorKind};

use crate::api::{SharedState, check_bearer};
use crate::config::{Mode, normalize_url};
use crate::error::error_response;
use crate::kv_follow::{CacheState, KvStream};
use crate::membership;
use crate::registry::{Role, Worker};

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
            let mut fields = worker_state(w);
            fields["kv_cache"] = kv_cache_state(&state, &w.url).into();
            fields
        })
        .collect();
    Json(json!({ "workers": workers })).into_response()
}

/// A worker as `GET /workers` and the live view show it: URL, role, health, draining,
/// breaker, requests in flight.
pub fn worker_state(w: &Worker) -> serde_json::Value {
    json!({
        "url": w.url,
        "role": w.role,
        "healthy": w.is_healthy(),
        "draining": w.is_draining(),
        "circuit": w.circuit_state().as_str(),
        "in_flight": w.in_flight_requests(),
    })
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
    membership::kv_stream(url, new.endpoint, new.replay_endpoint).map(Some)
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
        let added = membership::add_worker(&state, url, role, stream).await?;
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
    let how = "give the worker as ?url=http://host:port";
    let given = query.get("url").map(String::as_str);
    match listed(&state, &headers, given, how) {
        Ok((url, workers)) => {
            membership::remove(&state, workers).await;
            draining(&url)
        }
        Err(error) => error_response(error),
    }
}

/// `POST /workers/{url}/drain`: no new requests to the worker (the URL percent-encoded,
/// as a path segment); those in flight finish. It stays listed as draining.
pub async fn drain(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let how = "give the worker's URL, percent-encoded: /workers/http%3A%2F%2Fhost%3Aport/drain";
    match listed(&state, &headers, Some(&id), how) {
        Ok((url, workers)) => {
            membership::drain(&workers);
            draining(&url)
        }
        Err(error) => error_response(error),
    }
}

/// The body of `POST /workers/{url}/move`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveTo {
    role: Role,
}

/// `POST /workers/{url}/move {"role": "prefill"|"decode"}`: the worker stops taking
/// requests in its pool, its requests finish (within the planner's drain limit, or
/// two minutes), and it joins the other pool. Answers when it has moved: 200 with its
/// new role, 409 when it cannot move.
pub async fn move_worker(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<MoveTo>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let how = "give the worker's URL, percent-encoded: /workers/http%3A%2F%2Fhost%3Aport/move";
    let result = async {
        let (url, workers) = listed(&state, &headers, Some(&id), how)?;
        let Json(to) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let from = match to.role {
            Role::Prefill => Role::Decode,
            Role::Decode => Role::Prefill,
            Role::Both => {
                return Err(ApiError::invalid_param(
                    "role",
                    "workers move between the P/D pools: give \"prefill\" or \"decode\"",
                ));
            }
        };
        let worker = workers
            .into_iter()
            .find(|w| w.role == from)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::Conflict,
                    format!("{url} is not a {} worker", from.as_str()),
                )
            })?;
        let limit = state
            .planner
            .as_ref()
            .map_or(membership::DEFAULT_MOVE_LIMIT, |p| p.config.drain_limit());
        membership::move_worker(&state, &worker, to.role, limit)
            .await
            .map_err(|e| ApiError::new(ErrorKind::Conflict, e.to_string()))?;
        Ok::<_, ApiError>(json!({"url": url, "role": to.role}))
    }
    .await;
    match result {
        Ok(body) => Json(body).into_response(),
        Err(error) => error_response(error),
    }
}

/// `GET /planner[?since=<unix seconds>]`: the planner's settings, the worker it
/// waits for (`wanted`: `{"role", "since"}` or null; what an actuator starts), and
/// its verdicts (all kept, or those after `since`); 404 when the planner is off.
pub async fn planner(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let result = (|| {
        authorize(&state, &headers)?;
        let journal = state.planner.as_ref().ok_or_else(|| {
            ApiError::not_found("the planner is off (start the router with [planner])")
        })?;
        let since = match query.get("since") {
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| ApiError::invalid_param("since", "give Unix seconds"))?,
            None => 0.0,
        };
        let config = &journal.config;
        Ok::<_, ApiError>(json!({
            "slo": {"ttft_secs": config.ttft_secs, "tpot_secs": config.tpot_secs, "percentile": config.percentile},
            "interval_ms": config.interval_ms,
            "window_secs": config.window_secs,
            "confirm": config.confirm,
            "cooldown_secs": config.cooldown_secs,
            "headroom": config.headroom,
            "kv_headroom": config.kv_headroom,
            "max_workers": config.max_workers,
            "stop_below": config.stop_below,
            "wanted": journal.wanted(),
            "decisions": journal.since(since),
        }))
    })();
    match result {
        Ok(body) => Json(body).into_response(),
        Err(error) => error_response(error),
    }
}

/// The workers an admin call names, after its token is checked: 400 (saying `how`) for
/// a missing or bad URL, 404 for one the router does not have.
fn listed(
    state: &SharedState,
    headers: &HeaderMap,
    given: Option<&str>,
    how: &str,
) -> Result<(String, Vec<Arc<Worker>>), ApiError> {
    authorize(state, headers)?;
    let url = given
        .and_then(|u| normalize_url(u).ok())
        .ok_or_else(|| ApiError::invalid_param("url", how))?;
    let workers = state.dispatcher.registry.find(&url);
    if workers.is_empty() {
        return Err(ApiError::not_found(format!("no worker {url}")));
    }
    Ok((url, workers))
}

fn draining(url: &str) -> Response {
    let body = json!({"url": url, "draining": true});
    (StatusCode::ACCEPTED, Json(body)).into_response()
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
