//! The live view: `GET /dashboard` (one self-contained page, embedded in the binary)
//! and `GET /dashboard/events` (server-sent events: one JSON snapshot a second,
//! behind the admin token when one is set). One task on the router's first thread
//! builds each snapshot, and only while someone watches: the workers (role, health,
//! breaker, load; and from their own `/metrics`, KV cache usage,
//! running and waiting requests, prefix cache hits), the router's counters (read
//! from its own metrics), the last seconds' TTFT and TPOT percentiles (from
//! [`Signals`]), the planner's pools and latest verdicts. Every viewer gets the same
//! snapshot; a slow viewer skips snapshots rather than buffering them.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures_util::Stream;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::api::{SharedState, check_bearer};
use crate::error::error_response;
use crate::federation;
use crate::metrics as names;
use crate::signals::Signals;
use tandem_protocol::exposition;

/// The page, with its script and styles inline (no CDN, nothing else to fetch).
const PAGE: &str = include_str!("live/dashboard.html");
/// How often a snapshot is built.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
/// The latency percentiles cover this much of the recent past.
const LATENCY_WINDOW: Duration = Duration::from_secs(10);

/// The latest snapshot, and how many watch it.
#[derive(Debug)]
pub struct Live {
    /// The latest snapshot; none while nobody watches (an old one would mislead).
    snapshot: watch::Sender<Option<Arc<str>>>,
    viewers: AtomicUsize,
    closed: AtomicBool,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            snapshot: watch::Sender::new(None),
            viewers: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
    }
}

impl Live {
    /// Ends every viewer's stream (the router is stopping).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.snapshot.send_modify(|_| {});
    }
}

/// One viewer's stream, counted while it lasts (RAII).
struct Viewer {
    live: Arc<Live>,
}

impl Viewer {
    fn new(live: Arc<Live>) -> Self {
        live.viewers.fetch_add(1, Ordering::Relaxed);
        Self { live }
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.live.viewers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `GET /dashboard`: the page (it holds no data; its stream is what the token guards).
pub async fn page() -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Html(PAGE)).into_response()
}

/// `GET /dashboard/events`: the snapshots as server-sent events, the latest first.
pub async fn events(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    if let Err(error) = check_bearer(&headers, state.admin_token.as_ref()) {
        return error_response(error);
    }
    let Some(live) = state.live.clone() else {
        return error_response(tandem_protocol::openai::ApiError::not_found("Not Found"));
    };
    Sse::new(snapshots(live))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn snapshots(live: Arc<Live>) -> impl Stream<Item = Result<Event, Infallible>> {
    let viewer = Viewer::new(live.clone());
    let mut changes = live.snapshot.subscribe();
    changes.mark_changed();
    futures_util::stream::unfold((changes, viewer), |(mut changes, viewer)| async move {
        let snapshot = loop {
            changes.changed().await.ok()?;
            if viewer.live.closed.load(Ordering::Relaxed) {
                return None;
            }
            if let Some(snapshot) = changes.borrow_and_update().clone() {
                break snapshot;
            }
        };
        let event = Event::default().event("snapshot").data(&*snapshot);
        Some((Ok(event), (changes, viewer)))
    })
}

/// Builds a snapshot every second while anyone watches; runs until the router stops.
pub async fn run(state: SharedState, live: Arc<Live>, signals: Arc<Signals>) {
    let mut ticks = tokio::time::interval(SNAPSHOT_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watched = false;
    loop {
        ticks.tick().await;
        if live.viewers.load(Ordering::Relaxed) == 0 {
            if watched {
                live.snapshot.send_replace(None);
            }
            watched = false;
            continue;
        }
        watched = true;
        let scraped = scrape_engines(&state).await;
        // Timed without the scrapes' waiting: the CPU the snapshot costs the router.
        let started = Instant::now();
        let engines = engine_figures(scraped);
        let snapshot: Arc<str> = Arc::from(snapshot(&state, &signals, &engines).to_string());
        metrics::histogram!(names::DASHBOARD_SNAPSHOT_SECONDS)
            .record(started.elapsed().as_secs_f64());
        live.snapshot.send_replace(Some(snapshot));
    }
}

/// Each worker's `/metrics` text (`None` where it did not answer).
async fn scrape_engines(state: &SharedState) -> Vec<(String, Option<String>)> {
    let urls = state.dispatcher.registry.urls();
    let client = state.dispatcher.upstream.client();
    let texts =
        futures_util::future::join_all(urls.iter().map(|url| federation::scrape(client, url)))
            .await;
    urls.into_iter().zip(texts).collect()
}

/// Each worker's engine figures from its own `/metrics` (vLLM's names).
fn engine_figures(scraped: Vec<(String, Option<String>)>) -> BTreeMap<String, Value> {
    scraped
        .into_iter()
        .map(|(url, text)| {
            let figures = text.map_or(Value::Null, |text| {
                let read = |name: &str| exposition::sum(&text, name, &[]);
                json!({
                    "kv_usage": read(names::WORKER_KV_CACHE_USAGE),
                    "running": read("vllm:num_requests_running"),
                    "waiting": read("vllm:num_requests_waiting"),
                    "prefix_hits": read("vllm:prefix_cache_hits_total"),
                    "prefix_queries": read("vllm:prefix_cache_queries_total"),
                    "kv_bytes": exposition::sum(&text, "tandem:kv_transfer_bytes_total", &[("direction", "sent")])
                        .or_else(|| read("vllm:nixl_bytes_transferred_sum")),
                })
            });
            (url, figures)
        })
        .collect()
}

fn snapshot(state: &SharedState, signals: &Signals, engines: &BTreeMap<String, Value>) -> Value {
    let own = state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    let workers: Vec<Value> = state
        .dispatcher
        .registry
        .all()
        .iter()
        .map(|w| {
            let mut fields = crate::admin::worker_state(w);
            fields["engine"] = engines.get(&w.url).cloned().unwrap_or(Value::Null);
            fields
        })
        .collect();
    let count =
        |name: &str, with: &[(&str, &str)]| exposition::sum(&own, name, with).unwrap_or(0.0);
    let outcomes: BTreeMap<String, f64> = exposition::series(&own, names::REQUESTS_TOTAL)
        .into_iter()
        .fold(BTreeMap::new(), |mut by, (labels, value)| {
            if let Some((_, outcome)) = labels.iter().find(|(k, _)| k == names::OUTCOME) {
                *by.entry(outcome.clone()).or_default() += value;
            }
            by
        });
    let window = signals.window(Instant::now() - LATENCY_WINDOW);
    json!({
        "at": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
        "mode": state.dispatcher.mode.as_str(),
        "workers": workers,
        "requests": outcomes,
        "pd": {
            "remote": count(names::DISAGG_DECISIONS_TOTAL, &[(names::DECISION, "remote")]),
            "local": count(names::DISAGG_DECISIONS_TOTAL, &[(names::DECISION, "local")]),
            "fallbacks": count(names::PD_FALLBACKS_TOTAL, &[]),
        },
        "retries": count(names::RETRIES_TOTAL, &[]),
        "migrations": count(names::MIGRATIONS_TOTAL, &[]),
        "handoff": {
            "count": count(&format!("{}_count", names::HANDOFF_SECONDS), &[]),
            "seconds": count(&format!("{}_sum", names::HANDOFF_SECONDS), &[]),
        },
        "latency": {
            "window_secs": LATENCY_WINDOW.as_secs(),
            "ttft": percentiles(&window.ttft),
            "tpot": percentiles(&window.tpot),
        },
        "planner": planner(state),
    })
}

fn percentiles(samples: &[f64]) -> Value {
    use tandem_planner::online::percentile;
    json!({
        "count": samples.len(),
        "p50": percentile(samples, 0.5),
        "p90": percentile(samples, 0.9),
        "p99": percentile(samples, 0.99),
    })
}

fn planner(state: &SharedState) -> Value {
    let Some(journal) = state.planner.as_ref() else {
        return Value::Null;
    };
    json!({
        "verdicts": journal.latest(8),
        "wanted": journal.wanted(),
    })
}
