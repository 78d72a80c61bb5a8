//! Workers joining and leaving while the router runs. The admin API's adds, drains and
//! removals and etcd discovery's changes all go through here, so that a worker is
//! registered, followed (KV events), drained and dropped the same way whoever asked.
//!
//! Draining stops new requests to a worker at once; its requests in flight finish.
//! A removed worker is drained, then dropped once idle (or after [`DRAIN_LIMIT`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tandem_discovery::{Change, EtcdAddress, WorkerRecord, WorkerRole, watch_workers};
use tandem_protocol::openai::{ApiError, ErrorKind};
use tokio::sync::mpsc;

use crate::api::SharedState;
use crate::config::{DiscoveryConfig, KvEventsSource, Mode, normalize_url};
use crate::kv_follow::{self, KvStream};
use crate::metrics as names;
use crate::registry::{Role, Worker};

/// Longest a drained worker's requests may run before it is dropped anyway.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(600);

/// Longest an admin move waits for the worker's requests when no planner sets it.
pub const DEFAULT_MOVE_LIMIT: Duration = Duration::from_secs(120);

/// Registers a worker (it takes requests at once and is health-checked from then
/// on) and follows its KV events, if it has a stream.
pub async fn add_worker(
    state: &SharedState,
    url: String,
    role: Role,
    stream: Option<KvStream>,
) -> Result<Arc<Worker>, ApiError> {
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
    Ok(added)
}

/// Stops new requests to `workers` now; they stay listed until removed.
pub fn drain(workers: &[Arc<Worker>]) {
    for worker in workers {
        if !worker.is_draining() {
            worker.start_draining();
            tracing::info!(
                worker = worker.url,
                role = worker.role.as_str(),
                "draining worker"
            );
        }
    }
}

/// Drains `workers`, stops following their KV events, and drops each once its
/// requests have finished.
pub async fn remove(state: &SharedState, workers: Vec<Arc<Worker>>) {
    drain(&workers);
    for worker in workers {
        let still_listed = state
            .dispatcher
            .registry
            .find(&worker.url)
            .iter()
            .any(|other| !Arc::ptr_eq(other, &worker));
        if !still_listed
            && let Some(kv) = state.kv.as_ref()
            && kv.unfollow(&worker.url).await.is_err()
        {
            tracing::warn!(worker = worker.url, "the KV events thread has stopped");
        }
        tokio::spawn(drop_when_idle(state.clone(), worker));
    }
}

/// Why a worker did not move to another role or leave for good.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("{0} is already registered as {1}")]
    AlreadyInRole(String, &'static str),
    #[error("{0} is draining (being removed)")]
    Draining(String),
    #[error("{0}'s requests did not finish within {1:?}")]
    StillBusy(String, Duration),
    #[error("{0} was removed while it drained")]
    Removed(String),
}

/// Stops new requests to `worker` and waits until its requests have finished; past
/// `limit` it takes requests again and this fails.
async fn drain_and_wait(worker: &Arc<Worker>, limit: Duration) -> Result<(), MoveError> {
    if worker.is_draining() {
        return Err(MoveError::Draining(worker.url.clone()));
    }
    worker.start_draining();
    let started = tokio::time::Instant::now();
    while worker.in_flight_requests() > 0 {
        if started.elapsed() >= limit {
            worker.stop_draining();
            return Err(MoveError::StillBusy(worker.url.clone(), limit));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Moves `worker` to `role` without a restart: it takes no new requests, its
/// requests in flight finish (within `limit`, or the move is given up and it serves
/// its old role again), then it is registered in its new role and takes requests at
/// once. Its worker keeps serving KV pulls throughout, so prompts it prefilled still
/// reach their decode workers.
pub async fn move_worker(
    state: &SharedState,
    worker: &Arc<Worker>,
    role: Role,
    limit: Duration,
) -> Result<Arc<Worker>, MoveError> {
    let url = worker.url.clone();
    let registry = &state.dispatcher.registry;
    if registry.find(&url).iter().any(|w| w.role == role) {
        return Err(MoveError::AlreadyInRole(url, role.as_str()));
    }
    drain_and_wait(worker, limit).await?;
    let moved = registry
        .replace(worker, Worker::new(url.clone(), role, &state.circuit))
        .ok_or_else(|| MoveError::Removed(url.clone()))?;
    moved.set_healthy(worker.is_healthy());
    state.dispatcher.forget(&url);
    tracing::info!(
        worker = url,
        from = worker.role.as_str(),
        to = role.as_str(),
        "worker moved"
    );
    Ok(moved)
}

/// Takes `worker` out of the router once its requests have finished (within
/// `limit`, or it serves again and this fails): the planner's stop, after which its
/// process may go.
pub async fn retire(
    state: &SharedState,
    worker: &Arc<Worker>,
    limit: Duration,
) -> Result<(), MoveError> {
    drain_and_wait(worker, limit).await?;
    let registry = &state.dispatcher.registry;
    let listed_otherwise = registry
        .find(&worker.url)
        .iter()
        .any(|other| !Arc::ptr_eq(other, worker));
    if !listed_otherwise
        && let Some(kv) = state.kv.as_ref()
        && kv.unfollow(&worker.url).await.is_err()
    {
        tracing::warn!(worker = worker.url, "the KV events thread has stopped");
    }
    registry.remove(worker);
    state.dispatcher.forget(&worker.url);
    tracing::info!(
        worker = worker.url,
        role = worker.role.as_str(),
        "worker retired"
    );
    Ok(())
}

/// Drops a draining worker once its requests have finished (or after a bound), unless
/// it stopped draining meanwhile (it registered again).
async fn drop_when_idle(state: SharedState, worker: Arc<Worker>) {
    let started = tokio::time::Instant::now();
    while worker.in_flight_requests() > 0 && started.elapsed() < DRAIN_LIMIT {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !worker.is_draining() {
        return;
    }
    state.dispatcher.registry.remove(&worker);
    state.dispatcher.forget(&worker.url);
    tracing::info!(worker = worker.url, "worker removed");
}

/// A worker's KV event stream, validated (the endpoints are the router's to connect
/// to, so only plain `tcp://host:port`).
pub fn kv_stream(
    url: &str,
    endpoint: String,
    replay_endpoint: Option<String>,
) -> Result<KvStream, ApiError> {
    let source = KvEventsSource {
        worker: url.to_owned(),
        endpoint,
        replay_endpoint,
    };
    kv_follow::stream_of(&source).map_err(|e| ApiError::invalid_param("kv_events", e.to_string()))
}

/// The KV event stream a discovered worker announces.
fn announced_stream(url: &str, record: &WorkerRecord) -> Result<Option<KvStream>, ApiError> {
    record
        .kv_events
        .as_ref()
        .map(|e| kv_stream(url, e.endpoint.clone(), e.replay_endpoint.clone()))
        .transpose()
}

/// The role a discovered worker takes in the router's mode, if it fits it.
fn discovered_role(mode: Mode, role: WorkerRole) -> Option<Role> {
    match (mode, role) {
        (Mode::Replicated, WorkerRole::Both) => Some(Role::Both),
        (Mode::Disaggregated, WorkerRole::Prefill) => Some(Role::Prefill),
        (Mode::Disaggregated, WorkerRole::Decode) => Some(Role::Decode),
        _ => None,
    }
}

/// Starts following etcd: workers registered in `config.namespace` join the pool,
/// and leave it (drained) when their keys go.
pub fn spawn_discovery(
    state: SharedState,
    config: &DiscoveryConfig,
) -> Result<(), crate::RouterError> {
    let address = EtcdAddress::parse(&config.etcd)?;
    let (changes, mut received) = mpsc::channel(256);
    watch_workers(address, &config.namespace, changes)?;
    let mut pool = DiscoveredPool {
        state,
        model: config.model.clone(),
        instances: HashMap::new(),
    };
    tokio::spawn(async move {
        while let Some(change) = received.recv().await {
            pool.apply(change).await;
        }
    });
    Ok(())
}

/// The workers discovery added, by etcd instance.
struct DiscoveredPool {
    state: SharedState,
    model: Option<String>,
    instances: HashMap<String, (String, Role)>,
}

impl DiscoveredPool {
    async fn apply(&mut self, change: Change) {
        match change {
            Change::Upsert { instance, record } => self.upsert(instance, record).await,
            Change::Remove { instance } => self.forget_instance(&instance).await,
        }
        let count = self.instances.len() as f64;
        metrics::gauge!(names::DISCOVERED_WORKERS).set(count);
    }

    async fn upsert(&mut self, instance: String, record: WorkerRecord) {
        let Some((url, role)) = self.admissible(&instance, &record) else {
            self.forget_instance(&instance).await;
            return;
        };
        if self.instances.get(&instance) == Some(&(url.clone(), role)) {
            return;
        }
        self.forget_instance(&instance).await;
        let listed = self.state.dispatcher.registry.find(&url);
        let moved = listed
            .iter()
            .find(|w| self.state.planner.is_some() && w.role != role && !w.is_draining());
        if let Some(same) = listed.iter().find(|w| w.role == role) {
            // Registered again (a restart, or static and announced): serve it.
            same.stop_draining();
        } else if let Some(moved) = moved {
            // The planner moved this worker to the other pool: it stays there (its
            // announced role is where it started), and is removed from there when
            // its key goes.
            let current = (url.clone(), moved.role);
            metrics::counter!(names::DISCOVERY_CHANGES_TOTAL, names::ACTION => "add").increment(1);
            self.instances.insert(instance, current);
            return;
        } else {
            let stream = match announced_stream(&url, &record) {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::warn!(instance, worker = url, error = %err.message, "ignoring its KV events");
                    None
                }
            };
            if let Err(err) = add_worker(&self.state, url.clone(), role, stream).await {
                tracing::warn!(instance, worker = url, error = %err.message, "could not add a discovered worker");
                return;
            }
        }
        metrics::counter!(names::DISCOVERY_CHANGES_TOTAL, names::ACTION => "add").increment(1);
        self.instances.insert(instance, (url, role));
    }

    /// `record`'s URL and role here, if the router takes it.
    fn admissible(&self, instance: &str, record: &WorkerRecord) -> Option<(String, Role)> {
        if self
            .model
            .as_ref()
            .is_some_and(|model| *model != record.model)
        {
            return None;
        }
        let Some(role) = discovered_role(self.state.dispatcher.mode, record.role) else {
            tracing::warn!(
                instance,
                role = record.role.as_str(),
                mode = self.state.dispatcher.mode.as_str(),
                "ignoring a discovered worker whose role does not fit the router's mode"
            );
            return None;
        };
        match normalize_url(&record.url) {
            Ok(url) => Some((url, role)),
            Err(err) => {
                tracing::warn!(instance, %err, "ignoring a discovered worker with a bad URL");
                None
            }
        }
    }

    /// The instance's key went: drain and drop its worker, unless another instance
    /// still announces the same worker.
    async fn forget_instance(&mut self, instance: &str) {
        let Some((url, role)) = self.instances.remove(instance) else {
            return;
        };
        let still_announced: Vec<Role> = self
            .instances
            .values()
            .filter(|(other, _)| *other == url)
            .map(|(_, role)| *role)
            .collect();
        if still_announced.contains(&role) {
            return;
        }
        // The planner may have moved the worker to another role since it joined.
        let workers: Vec<_> = self
            .state
            .dispatcher
            .registry
            .find(&url)
            .into_iter()
            .filter(|w| !still_announced.contains(&w.role))
            .collect();
        metrics::counter!(names::DISCOVERY_CHANGES_TOTAL, names::ACTION => "remove").increment(1);
        remove(&self.state, workers).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovered_roles_must_fit_the_mode() {
        assert_eq!(
            discovered_role(Mode::Replicated, WorkerRole::Both),
            Some(Role::Both)
        );
        assert_eq!(discovered_role(Mode::Replicated, WorkerRole::Decode), None);
        assert_eq!(discovered_role(Mode::Disaggregated, WorkerRole::Both), None);
        assert_eq!(
            discovered_role(Mode::Disaggregated, WorkerRole::Prefill),
            Some(Role::Prefill)
        );
    }
}
