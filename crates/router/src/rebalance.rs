//! The online planner at run time: every interval it counts the P/D pools, takes the
//! window of recent latency samples from [`Signals`], asks
//! [`tandem_planner::online::Controller`] for a verdict, counts it in metrics, keeps
//! it in the [`Journal`] (`GET /planner`), logs it when the verdict changes, and
//! carries it out. Each interval it also reads the pools' KV cache usage from the
//! workers' own metrics, which holds back a move or stop that would fill the giving
//! pool's caches. It carries a verdict out: a move with [`membership::move_worker`] (drain, then the new role;
//! no restart), a stop with [`membership::retire`] (drain, then out of the router; the
//! journal names the worker so its process can go), a start by posting what is
//! wanted in the journal and waiting for an actuator (`tandem up`) to add a worker
//! through the admin API. The decision rule itself lives in the planner crate, with
//! no runtime types.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tandem_planner::online::{
    Controller, Decision, KvUsage, Observation, OnlineConfig, Pool, percentile,
};
use tandem_protocol::exposition;

use crate::api::SharedState;
use crate::config::PlannerConfig;
use crate::federation;
use crate::membership;
use crate::metrics as names;
use crate::registry::{Role, Worker};
use crate::signals::Signals;

/// Verdicts kept for `GET /planner`.
const JOURNAL_LENGTH: usize = 2048;

/// One judged window.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Seconds since the Unix epoch: when it was judged, or for a move, start or
    /// stop, when that was carried out (entries are in order of `at`).
    pub at: f64,
    pub action: &'static str,
    pub detail: String,
    pub prefill_workers: usize,
    pub decode_workers: usize,
    /// TTFT samples: answered requests, and those still waiting past the limit
    /// (`waiting_past_ttft` of them).
    pub ttft_samples: usize,
    pub tpot_samples: usize,
    pub waiting_past_ttft: usize,
    /// The window's percentile of TTFT and TPOT, seconds.
    pub ttft: Option<f64>,
    pub tpot: Option<f64>,
    /// Each pool's workers' mean KV cache usage (0 to 1), where any reported it.
    pub kv_usage_prefill: Option<f64>,
    pub kv_usage_decode: Option<f64>,
    /// For a move, start or stop: which worker (for a start, the one that joined),
    /// and whether it was carried out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moved: Option<bool>,
}

/// A worker the planner asked for and waits for.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Wanted {
    pub role: Role,
    /// Seconds since the Unix epoch.
    pub since: f64,
}

/// The planner's recent verdicts, shared by every router thread.
#[derive(Debug)]
pub struct Journal {
    pub config: PlannerConfig,
    entries: Mutex<VecDeque<Entry>>,
    wanted: Mutex<Option<Wanted>>,
}

impl Journal {
    pub fn new(config: PlannerConfig) -> Self {
        Self {
            config,
            entries: Mutex::new(VecDeque::new()),
            wanted: Mutex::new(None),
        }
    }

    /// The worker the planner waits for, if any.
    pub fn wanted(&self) -> Option<Wanted> {
        *self.wanted.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_wanted(&self, wanted: Option<Wanted>) {
        *self.wanted.lock().unwrap_or_else(|e| e.into_inner()) = wanted;
    }

    fn push(&self, entry: Entry) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() == JOURNAL_LENGTH {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    /// The latest `count` verdicts, newest first.
    pub fn latest(&self, count: usize) -> Vec<Entry> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.iter().rev().take(count).cloned().collect()
    }

    /// The verdicts since `after` (Unix seconds), oldest first.
    pub fn since(&self, after: f64) -> Vec<Entry> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.iter().filter(|e| e.at > after).cloned().collect()
    }
}

/// Runs the planner until the router stops (the task is aborted with its thread).
pub async fn run(state: SharedState, signals: Arc<Signals>, journal: Arc<Journal>) {
    let config = journal.config.clone();
    let mut controller = Controller::new(online_config(&config));
    let started = Instant::now();
    let mut last_move = started;
    let mut last_action = "";
    let mut ticks = tokio::time::interval(config.interval());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = Instant::now();
        let since = now
            .checked_sub(config.window())
            .map_or(last_move, |w| w.max(last_move));
        let window = signals.window(since);
        let (prefill, decode) = pool_sizes(&state);
        let (prefill_kv, decode_kv) = tokio::join!(
            mean_kv_usage(&state, &prefill),
            mean_kv_usage(&state, &decode)
        );
        let kv_usage = KvUsage {
            prefill: prefill_kv,
            decode: decode_kv,
        };
        let observation = Observation {
            now_secs: now.duration_since(started).as_secs_f64(),
            prefill_workers: prefill.len(),
            decode_workers: decode.len(),
            ttft: window.ttft,
            tpot: window.tpot,
            waiting: window.waiting,
            kv_usage,
        };
        let decision = controller.observe(&observation);
        let mut entry = record(&controller, &observation, &decision);
        if decision.action() != last_action {
            log(&decision);
            last_action = decision.action();
        }
        let (worker, done) = match decision {
            Decision::Move { from, to, .. } => {
                let candidates = if from == Pool::Prefill {
                    prefill
                } else {
                    decode
                };
                carry_out(&state, &config, candidates, to).await
            }
            Decision::Stop { pool, .. } => {
                let candidates = if pool == Pool::Prefill {
                    prefill
                } else {
                    decode
                };
                stop_one(&state, &config, candidates).await
            }
            Decision::Start { pool, .. } => {
                let members = if pool == Pool::Prefill {
                    prefill
                } else {
                    decode
                };
                await_start(&state, &journal, &config, role_of(pool), members).await
            }
            Decision::CannotMeet { .. } | Decision::Hold(_) => {
                journal.push(entry);
                continue;
            }
        };
        entry.worker = worker;
        entry.moved = Some(done);
        // Stamped when carried out, so `?since=` readers never miss it.
        entry.at = unix_now();
        last_move = Instant::now();
        controller.finished(last_move.duration_since(started).as_secs_f64());
        journal.push(entry);
    }
}

fn online_config(config: &PlannerConfig) -> OnlineConfig {
    OnlineConfig {
        ttft_secs: config.ttft_secs,
        tpot_secs: config.tpot_secs,
        percentile: config.percentile,
        min_samples: config.min_samples,
        confirm: config.confirm,
        cooldown_secs: config.cooldown_secs as f64,
        headroom: config.headroom,
        max_workers: config.max_workers,
        stop_below: config.stop_below,
        kv_headroom: config.kv_headroom,
    }
}

fn role_of(pool: Pool) -> Role {
    match pool {
        Pool::Prefill => Role::Prefill,
        Pool::Decode => Role::Decode,
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The workers that take requests in each pool: healthy and not draining.
fn pool_sizes(state: &SharedState) -> (Vec<Arc<Worker>>, Vec<Arc<Worker>>) {
    let serving: Vec<_> = state
        .dispatcher
        .registry
        .all()
        .into_iter()
        .filter(|w| w.is_healthy() && !w.is_draining())
        .collect();
    let (prefill, rest): (Vec<_>, Vec<_>) =
        serving.into_iter().partition(|w| w.role == Role::Prefill);
    let decode = rest
        .into_iter()
        .filter(|w| w.role == Role::Decode)
        .collect();
    (prefill, decode)
}

/// The mean of `workers`' KV cache usage, read from their `/metrics` at once (each
/// scrape bounded in time); `None` when none of them reported it.
async fn mean_kv_usage(state: &SharedState, workers: &[Arc<Worker>]) -> Option<f64> {
    let client = state.dispatcher.upstream.client();
    let texts =
        futures_util::future::join_all(workers.iter().map(|w| federation::scrape(client, &w.url)))
            .await;
    let usages: Vec<f64> = texts
        .iter()
        .flatten()
        .filter_map(|text| worker_kv_usage(text))
        .collect();
    (!usages.is_empty()).then(|| usages.iter().sum::<f64>() / usages.len() as f64)
}

/// One worker's KV cache usage: the mean over its series (a data-parallel vLLM has
/// one per engine), clamped to 0..=1.
fn worker_kv_usage(metrics_text: &str) -> Option<f64> {
    let series = exposition::series(metrics_text, names::WORKER_KV_CACHE_USAGE);
    let values: Vec<f64> = series
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| v.is_finite())
        .collect();
    (!values.is_empty()).then(|| (values.iter().sum::<f64>() / values.len() as f64).clamp(0.0, 1.0))
}

/// Counts the verdict and the window in metrics; the journal's entry for it.
fn record(controller: &Controller, observation: &Observation, decision: &Decision) -> Entry {
    metrics::counter!(names::PLANNER_DECISIONS_TOTAL, names::ACTION => decision.action())
        .increment(1);
    for (role, count) in [
        ("prefill", observation.prefill_workers),
        ("decode", observation.decode_workers),
    ] {
        metrics::gauge!(names::PLANNER_POOL_WORKERS, names::ROLE => role).set(count as f64);
    }
    let p = controller.config().percentile;
    let judged_ttft = controller.judged_ttft(observation);
    let (ttft, tpot) = (
        percentile(&judged_ttft, p),
        percentile(&observation.tpot, p),
    );
    for (figure, value) in [("ttft", ttft), ("tpot", tpot)] {
        if let Some(value) = value {
            metrics::gauge!(names::PLANNER_WINDOW_SECONDS, names::FIGURE => figure).set(value);
        }
    }
    let kv = observation.kv_usage;
    for (role, usage) in [("prefill", kv.prefill), ("decode", kv.decode)] {
        if let Some(usage) = usage {
            metrics::gauge!(names::PLANNER_POOL_KV_USAGE, names::ROLE => role).set(usage);
        }
    }
    Entry {
        at: unix_now(),
        action: decision.action(),
        detail: decision.to_string(),
        prefill_workers: observation.prefill_workers,
        decode_workers: observation.decode_workers,
        ttft_samples: judged_ttft.len(),
        tpot_samples: observation.tpot.len(),
        waiting_past_ttft: judged_ttft.len() - observation.ttft.len(),
        ttft,
        tpot,
        kv_usage_prefill: kv.prefill,
        kv_usage_decode: kv.decode,
        worker: None,
        moved: None,
    }
}

/// Logs a verdict that differs from the last one logged (so a steady state is one
/// line, not one per interval).
fn log(decision: &Decision) {
    match decision {
        Decision::CannotMeet { .. } => {
            tracing::warn!(action = decision.action(), "planner: {decision}");
        }
        Decision::Move { .. }
        | Decision::Start { .. }
        | Decision::Stop { .. }
        | Decision::Hold(_) => {
            tracing::info!(action = decision.action(), "planner: {decision}");
        }
    }
}

/// Moves the least busy of `candidates` to `to`; the worker tried and whether it moved.
async fn carry_out(
    state: &SharedState,
    config: &PlannerConfig,
    candidates: Vec<Arc<Worker>>,
    to: Pool,
) -> (Option<String>, bool) {
    let role = role_of(to);
    let Some(worker) = candidates
        .into_iter()
        .min_by_key(|w| w.in_flight_requests())
    else {
        return (None, false);
    };
    let outcome = membership::move_worker(state, &worker, role, config.drain_limit()).await;
    let ok = outcome.is_ok();
    match outcome {
        Ok(_) => tracing::info!(
            worker = worker.url,
            to = role.as_str(),
            "planner: worker moved"
        ),
        Err(err) => tracing::warn!(worker = worker.url, "planner: the move was given up: {err}"),
    }
    let label = if ok { "ok" } else { "failed" };
    metrics::counter!(names::PLANNER_MOVES_TOTAL, names::ROLE => role.as_str(), names::OUTCOME => label)
        .increment(1);
    (Some(worker.url.clone()), ok)
}

/// Retires the least busy of `candidates`; the worker tried and whether it left.
async fn stop_one(
    state: &SharedState,
    config: &PlannerConfig,
    candidates: Vec<Arc<Worker>>,
) -> (Option<String>, bool) {
    let Some(worker) = candidates
        .into_iter()
        .min_by_key(|w| w.in_flight_requests())
    else {
        return (None, false);
    };
    let outcome = membership::retire(state, &worker, config.drain_limit()).await;
    if let Err(err) = &outcome {
        tracing::warn!(worker = worker.url, "planner: the stop was given up: {err}");
    }
    count_change(worker.role, "stop", outcome.is_ok());
    (Some(worker.url.clone()), outcome.is_ok())
}

/// Posts that a worker is wanted for `role` and waits until one that is not among
/// `members` serves in that pool, or the start limit passes; the worker that joined.
async fn await_start(
    state: &SharedState,
    journal: &Journal,
    config: &PlannerConfig,
    role: Role,
    members: Vec<Arc<Worker>>,
) -> (Option<String>, bool) {
    journal.set_wanted(Some(Wanted {
        role,
        since: unix_now(),
    }));
    let started = Instant::now();
    let joined = loop {
        let (prefill, decode) = pool_sizes(state);
        let pool = if role == Role::Prefill {
            prefill
        } else {
            decode
        };
        if let Some(new) = pool
            .iter()
            .find(|w| !members.iter().any(|m| m.url == w.url))
        {
            break Some(new.url.clone());
        }
        if started.elapsed() >= config.start_limit() {
            tracing::warn!(
                role = role.as_str(),
                "planner: no worker joined within {:?}; the start was given up",
                config.start_limit()
            );
            break None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    journal.set_wanted(None);
    count_change(role, "start", joined.is_some());
    (joined.clone(), joined.is_some())
}

fn count_change(role: Role, change: &'static str, ok: bool) {
    let outcome = if ok { "ok" } else { "failed" };
    metrics::counter!(names::PLANNER_SCALE_TOTAL, names::ROLE => role.as_str(), names::ACTION => change, names::OUTCOME => outcome)
        .increment(1);
}
