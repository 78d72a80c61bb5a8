//! The worker registry: every worker the router knows, its role, its load (in-flight
//! requests and tokens, counted by RAII guards that live as long as the response body
//! they belong to), its health and circuit state, and whether it is draining.
//! Selection reads candidates from here; the admin API adds and removes workers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::config::CircuitConfig;
use crate::health::{CircuitBreaker, CircuitState};
use crate::metrics as names;
use crate::policy::Candidate;

/// What a worker does in the router's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Replicated mode: the whole request.
    Both,
    Prefill,
    Decode,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Both => "both",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

/// One upstream worker.
#[derive(Debug)]
pub struct Worker {
    pub url: String,
    pub role: Role,
    in_flight_requests: AtomicUsize,
    in_flight_tokens: AtomicUsize,
    /// Set by active health checks; workers start healthy until a check says otherwise.
    healthy: AtomicBool,
    draining: AtomicBool,
    circuit: Mutex<CircuitBreaker>,
    metrics: WorkerMetrics,
}

/// This worker's metric series, registered once (not looked up per request).
#[derive(Debug)]
struct WorkerMetrics {
    in_flight: metrics::Gauge,
    healthy: metrics::Gauge,
    circuit: metrics::Gauge,
    /// By leg (`whole`, `prefill`, `decode`) and outcome.
    calls: HashMap<(&'static str, bool), metrics::Counter>,
}

impl WorkerMetrics {
    fn new(url: &str) -> Self {
        let worker = || (names::WORKER, url.to_owned());
        let mut calls = HashMap::new();
        for leg in ["whole", "prefill", "decode"] {
            for ok in [true, false] {
                let outcome = if ok { "ok" } else { "error" };
                let labels = [
                    (names::WORKER, url.to_owned()),
                    (names::LEG, leg.to_owned()),
                    (names::OUTCOME, outcome.to_owned()),
                ];
                calls.insert(
                    (leg, ok),
                    metrics::counter!(names::WORKER_REQUESTS_TOTAL, &labels),
                );
            }
        }
        Self {
            in_flight: metrics::gauge!(names::IN_FLIGHT, &[worker()]),
            healthy: metrics::gauge!(names::WORKER_HEALTHY, &[worker()]),
            circuit: metrics::gauge!(names::CIRCUIT_STATE, &[worker()]),
            calls,
        }
    }
}

impl Worker {
    pub fn new(url: String, role: Role, circuit: &CircuitConfig) -> Self {
        let worker = Self {
            metrics: WorkerMetrics::new(&url),
            url,
            role,
            in_flight_requests: AtomicUsize::new(0),
            in_flight_tokens: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            circuit: Mutex::new(CircuitBreaker::new(circuit.clone())),
        };
        worker.publish_health();
        worker
    }

    pub fn in_flight_requests(&self) -> usize {
        self.in_flight_requests.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        if self.healthy.swap(healthy, Ordering::Relaxed) != healthy {
            if healthy {
                tracing::info!(worker = self.url, "worker is healthy again");
            } else {
                tracing::warn!(worker = self.url, "worker is unhealthy: out of selection");
            }
            self.publish_health();
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Takes requests again (a drained worker registered anew).
    pub fn stop_draining(&self) {
        if self.draining.swap(false, Ordering::Relaxed) {
            tracing::info!(worker = self.url, "worker no longer draining");
        }
    }

    fn lock_circuit(&self) -> std::sync::MutexGuard<'_, CircuitBreaker> {
        self.circuit.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn circuit_state(&self) -> CircuitState {
        self.lock_circuit().state(Instant::now())
    }

    /// Whether a request may be sent now (healthy, not draining, circuit not open).
    pub fn is_available(&self) -> bool {
        self.is_healthy() && !self.is_draining() && self.lock_circuit().allows(Instant::now())
    }

    /// Whether it can take a request of `role` now, not being in `excluded`.
    fn takes(&self, role: Role, excluded: &[String]) -> bool {
        self.role == role && self.is_available() && !excluded.contains(&self.url)
    }

    /// Records a request's outcome in the circuit breaker.
    pub fn record_outcome(&self, success: bool) {
        let now = Instant::now();
        let state = {
            let mut circuit = self.lock_circuit();
            circuit.record(success, now);
            circuit.state(now)
        };
        self.metrics.circuit.set(state.as_gauge());
    }

    /// Records an upstream call of `leg` (its outcome also feeds the circuit breaker).
    pub fn record_call(&self, leg: &'static str, ok: bool) {
        self.record_outcome(ok);
        if let Some(counter) = self.metrics.calls.get(&(leg, ok)) {
            counter.increment(1);
        }
    }

    fn publish_health(&self) {
        let value = if self.is_healthy() { 1.0 } else { 0.0 };
        self.metrics.healthy.set(value);
    }

    /// Counts a request against this worker until the guard drops: the prompt tokens
    /// it must compute (released early, by [`LoadGuard::prompt_computed`], once the
    /// answer starts) and the output tokens it may generate.
    pub fn load_guard(self: &Arc<Self>, prompt_tokens: usize, output_tokens: usize) -> LoadGuard {
        self.in_flight_requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight_tokens
            .fetch_add(prompt_tokens + output_tokens, Ordering::Relaxed);
        self.publish_in_flight();
        LoadGuard {
            worker: self.clone(),
            prompt_tokens,
            output_tokens,
        }
    }

    fn publish_in_flight(&self) {
        self.metrics.in_flight.set(self.in_flight_requests() as f64);
    }

    pub fn candidate(&self) -> Candidate<'_> {
        Candidate {
            url: &self.url,
            in_flight_requests: self.in_flight_requests(),
            in_flight_tokens: self.in_flight_tokens.load(Ordering::Relaxed),
        }
    }
}

/// A request's claim on a worker's load; released on drop (with the response body).
#[derive(Debug)]
pub struct LoadGuard {
    worker: Arc<Worker>,
    prompt_tokens: usize,
    output_tokens: usize,
}

impl LoadGuard {
    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    /// The worker has computed the prompt (its answer started): only the output is
    /// still work. Without this a long prompt would weigh on the worker's load for as
    /// long as its answer streams.
    pub fn prompt_computed(&mut self) {
        let prompt = std::mem::take(&mut self.prompt_tokens);
        self.worker
            .in_flight_tokens
            .fetch_sub(prompt, Ordering::Relaxed);
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.worker
            .in_flight_requests
            .fetch_sub(1, Ordering::Relaxed);
        self.worker
            .in_flight_tokens
            .fetch_sub(self.prompt_tokens + self.output_tokens, Ordering::Relaxed);
        self.worker.publish_in_flight();
    }
}

/// Every worker, by role.
#[derive(Debug, Default)]
pub struct Registry {
    workers: RwLock<Vec<Arc<Worker>>>,
}

/// Adding a worker that is already registered.
#[derive(Debug, thiserror::Error)]
#[error("worker {0} is already registered")]
pub struct AlreadyRegistered(pub String);

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Worker>>> {
        self.workers.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<Worker>>> {
        self.workers.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add(&self, worker: Worker) -> Result<Arc<Worker>, AlreadyRegistered> {
        let mut workers = self.write();
        if workers
            .iter()
            .any(|w| w.url == worker.url && w.role == worker.role)
        {
            return Err(AlreadyRegistered(worker.url));
        }
        let worker = Arc::new(worker);
        workers.push(worker.clone());
        Ok(worker)
    }

    /// Puts `new` in `old`'s place (the same worker in another role); `None` when
    /// `old` is no longer registered, or `new`'s URL already has `new`'s role.
    pub fn replace(&self, old: &Arc<Worker>, new: Worker) -> Option<Arc<Worker>> {
        let mut workers = self.write();
        if workers
            .iter()
            .any(|w| w.url == new.url && w.role == new.role)
        {
            return None;
        }
        let slot = workers.iter_mut().find(|w| Arc::ptr_eq(w, old))?;
        let new = Arc::new(new);
        *slot = new.clone();
        Some(new)
    }

    /// Drops a worker from the registry (requests in flight keep their `Arc`).
    pub fn remove(&self, worker: &Arc<Worker>) {
        self.write().retain(|w| !Arc::ptr_eq(w, worker));
    }

    pub fn all(&self) -> Vec<Arc<Worker>> {
        self.read().clone()
    }

    /// Each listed worker's URL once (a worker may be listed in both P/D pools).
    pub fn urls(&self) -> Vec<String> {
        let mut urls: Vec<String> = self.read().iter().map(|w| w.url.clone()).collect();
        urls.sort();
        urls.dedup();
        urls
    }

    pub fn find(&self, url: &str) -> Vec<Arc<Worker>> {
        self.read()
            .iter()
            .filter(|w| w.url == url)
            .cloned()
            .collect()
    }

    /// Workers of `role` that can take a request now, minus `excluded` (by URL).
    pub fn available(&self, role: Role, excluded: &[String]) -> Vec<Arc<Worker>> {
        self.read()
            .iter()
            .filter(|w| w.takes(role, excluded))
            .cloned()
            .collect()
    }

    /// Whether any worker of `role` outside `excluded` can take a request now.
    pub fn has_available(&self, role: Role, excluded: &[String]) -> bool {
        self.read().iter().any(|w| w.takes(role, excluded))
    }

    /// Whether any healthy, non-draining worker of `role` exists.
    pub fn has_healthy(&self, role: Role) -> bool {
        self.read()
            .iter()
            .any(|w| w.role == role && w.is_healthy() && !w.is_draining())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(url: &str, role: Role) -> Worker {
        Worker::new(url.into(), role, &CircuitConfig::default())
    }

    #[test]
    fn load_guards_count_until_dropped() {
        let registry = Registry::new();
        let w = registry.add(worker("http://a:1", Role::Both)).unwrap();
        let mut g1 = w.load_guard(80, 20);
        let g2 = w.load_guard(40, 10);
        assert_eq!(w.candidate().in_flight_requests, 2);
        assert_eq!(w.candidate().in_flight_tokens, 150);
        g1.prompt_computed();
        g1.prompt_computed();
        assert_eq!(w.candidate().in_flight_tokens, 70);
        assert_eq!(w.candidate().in_flight_requests, 2);
        drop(g1);
        assert_eq!(w.candidate().in_flight_tokens, 50);
        drop(g2);
        assert_eq!(w.candidate().in_flight_requests, 0);
    }

    #[test]
    fn availability_excludes_unhealthy_draining_and_excluded_workers() {
        let registry = Registry::new();
        let a = registry.add(worker("http://a:1", Role::Decode)).unwrap();
        let b = registry.add(worker("http://b:1", Role::Decode)).unwrap();
        registry.add(worker("http://p:1", Role::Prefill)).unwrap();
        assert_eq!(registry.available(Role::Decode, &[]).len(), 2);
        a.set_healthy(false);
        assert_eq!(registry.available(Role::Decode, &[]).len(), 1);
        assert!(
            registry
                .available(Role::Decode, std::slice::from_ref(&b.url))
                .is_empty()
        );
        b.start_draining();
        assert!(registry.available(Role::Decode, &[]).is_empty());
        assert!(!registry.has_healthy(Role::Decode));
        assert!(registry.has_healthy(Role::Prefill));
        assert!(registry.add(worker("http://p:1", Role::Prefill)).is_err());
        registry.remove(&a);
        assert_eq!(registry.all().len(), 2);
    }
}
