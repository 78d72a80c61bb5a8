//! Worker health: a circuit breaker per worker on request outcomes (pure, clock
//! passed in), and the active checker that polls every worker's `GET /health` and
//! takes workers out of selection after consecutive failures, back after successes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{CircuitConfig, HealthConfig};
use crate::registry::{Registry, Worker};

/// Where a circuit breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Requests flow.
    Closed,
    /// Too many failures: requests are refused until `open_ms` has passed.
    Open,
    /// Trial period after being open: requests flow; a failure reopens it.
    HalfOpen,
}

impl CircuitState {
    /// The value of the circuit-state gauge.
    pub fn as_gauge(self) -> f64 {
        match self {
            CircuitState::Closed => 0.0,
            CircuitState::HalfOpen => 1.0,
            CircuitState::Open => 2.0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

/// Consecutive-failure circuit breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: CircuitConfig,
    consecutive_failures: u32,
    consecutive_successes: u32,
    /// When it last opened; it stays half-open after `open_ms` until enough successes.
    opened_at: Option<Instant>,
}

impl CircuitBreaker {
    pub fn new(config: CircuitConfig) -> Self {
        Self {
            config,
            consecutive_failures: 0,
            consecutive_successes: 0,
            opened_at: None,
        }
    }

    fn open_for(&self) -> Duration {
        Duration::from_millis(self.config.open_ms)
    }

    pub fn state(&self, now: Instant) -> CircuitState {
        match self.opened_at {
            Some(at) if now.duration_since(at) < self.open_for() => CircuitState::Open,
            Some(_) => CircuitState::HalfOpen,
            None => CircuitState::Closed,
        }
    }

    /// Whether a request may go through now.
    pub fn allows(&self, now: Instant) -> bool {
        self.state(now) != CircuitState::Open
    }

    pub fn record(&mut self, success: bool, now: Instant) {
        let state = self.state(now);
        if success {
            self.consecutive_failures = 0;
            self.consecutive_successes += 1;
            if state == CircuitState::HalfOpen
                && self.consecutive_successes >= self.config.success_threshold
            {
                self.opened_at = None;
            }
            return;
        }
        self.consecutive_successes = 0;
        self.consecutive_failures += 1;
        if state == CircuitState::HalfOpen
            || self.consecutive_failures >= self.config.failure_threshold
        {
            self.opened_at = Some(now);
            self.consecutive_failures = 0;
        }
    }
}

/// Polls every registered worker's `/health` until the task is dropped.
pub async fn run_checks(registry: Arc<Registry>, client: reqwest::Client, config: HealthConfig) {
    let mut tick = tokio::time::interval(Duration::from_millis(config.interval_ms.max(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut streaks: std::collections::HashMap<String, Streak> = Default::default();
    loop {
        tick.tick().await;
        let workers = registry.all();
        let checks = workers.iter().map(|w| check(&client, w, &config));
        let results = futures_util::future::join_all(checks).await;
        for (worker, ok) in workers.iter().zip(results) {
            let streak = streaks.entry(worker.url.clone()).or_default();
            streak.record(ok);
            if !ok && streak.failures >= config.failure_threshold {
                worker.set_healthy(false);
            } else if ok && streak.successes >= config.success_threshold {
                worker.set_healthy(true);
            }
        }
        streaks.retain(|url, _| workers.iter().any(|w| &w.url == url));
    }
}

/// Consecutive check results of one worker.
#[derive(Debug, Default)]
struct Streak {
    failures: u32,
    successes: u32,
}

impl Streak {
    fn record(&mut self, ok: bool) {
        if ok {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
    }
}

async fn check(client: &reqwest::Client, worker: &Worker, config: &HealthConfig) -> bool {
    let request = client
        .get(format!("{}/health", worker.url))
        .timeout(Duration::from_millis(config.timeout_ms))
        .send();
    matches!(request.await, Ok(response) if response.status().is_success())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(CircuitConfig {
            failure_threshold: 3,
            success_threshold: 2,
            open_ms: 1000,
        })
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = breaker();
        b.record(false, t0);
        b.record(false, t0);
        b.record(true, t0);
        b.record(false, t0);
        b.record(false, t0);
        assert_eq!(b.state(t0), CircuitState::Closed);
        b.record(false, t0);
        assert_eq!(b.state(t0), CircuitState::Open);
        assert!(!b.allows(t0 + Duration::from_millis(999)));
    }

    #[test]
    fn half_open_closes_after_successes_and_reopens_on_a_failure() {
        let t0 = Instant::now();
        let mut b = breaker();
        for _ in 0..3 {
            b.record(false, t0);
        }
        let later = t0 + Duration::from_millis(1000);
        assert_eq!(b.state(later), CircuitState::HalfOpen);
        assert!(b.allows(later));
        b.record(false, later);
        assert_eq!(
            b.state(later),
            CircuitState::Open,
            "a trial failure reopens"
        );
        let later = later + Duration::from_millis(1000);
        b.record(true, later);
        assert_eq!(b.state(later), CircuitState::HalfOpen);
        b.record(true, later);
        assert_eq!(b.state(later), CircuitState::Closed);
    }

    #[test]
    fn streaks_reset_on_the_other_outcome() {
        let mut s = Streak::default();
        s.record(false);
        s.record(false);
        s.record(true);
        assert_eq!((s.failures, s.successes), (0, 1));
    }
}
