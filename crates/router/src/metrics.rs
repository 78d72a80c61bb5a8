//! The router's Prometheus metrics: every name and label in one place. The router
//! observes latencies from its side (arrival to first relayed byte, to the end), so
//! they include the prefill leg and the hand-off in P/D mode.

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Counter, labels [`MODE`], [`ENDPOINT`], [`OUTCOME`]: client requests by how they
/// ended (`2xx`, `4xx`, `5xx`, or `cancelled` when the client left first).
pub const REQUESTS_TOTAL: &str = "tandem_router_requests_total";
/// Counter, labels [`WORKER`], [`LEG`], [`OUTCOME`] (`ok`, `error`): upstream calls.
pub const WORKER_REQUESTS_TOTAL: &str = "tandem_router_worker_requests_total";
/// Histogram: seconds from a request's arrival to the first byte relayed to the client
/// (for a streamed answer, its first token).
pub const TIME_TO_FIRST_BYTE_SECONDS: &str = "tandem_router_time_to_first_byte_seconds";
/// Histogram: seconds from a request's arrival to the end of its relayed answer.
pub const E2E_SECONDS: &str = "tandem_router_e2e_request_latency_seconds";
/// Histogram: seconds of the prefill leg (P/D mode), sent to answered.
pub const PREFILL_LEG_SECONDS: &str = "tandem_router_prefill_leg_seconds";
/// Histogram: seconds from the prefill answer to the decode worker's response headers
/// (the KV pull and the first decode step).
pub const HANDOFF_SECONDS: &str = "tandem_router_handoff_seconds";
/// Gauge, label [`WORKER`]: requests routed to the worker and not finished.
pub const IN_FLIGHT: &str = "tandem_router_worker_in_flight";
/// Counter, label [`LEG`]: upstream calls retried on another worker.
pub const RETRIES_TOTAL: &str = "tandem_router_retries_total";
/// Gauge, label [`WORKER`]: 0 closed, 1 half-open, 2 open.
pub const CIRCUIT_STATE: &str = "tandem_router_worker_circuit_state";
/// Gauge, label [`WORKER`]: 1 while active health checks pass.
pub const WORKER_HEALTHY: &str = "tandem_router_worker_healthy";
/// Counter: prefill answers without `kv_transfer_params`, sent to D as plain requests.
pub const PD_FALLBACKS_TOTAL: &str = "tandem_router_pd_fallbacks_total";
/// Counter, labels [`DECISION`] (`remote`, `local`), [`REASON`]: P/D mode's choice per
/// request between a prefill leg and a decode worker alone.
pub const DISAGG_DECISIONS_TOTAL: &str = "tandem_router_disagg_decisions_total";
/// Counter, label [`ACTION`] (`stripped`, `rejected`): client requests that carried
/// their own `kv_transfer_params`, which only the router may set.
pub const CLIENT_KV_TRANSFER_PARAMS_TOTAL: &str = "tandem_router_client_kv_transfer_params_total";
/// Counter, label [`OUTCOME`] (`exact`, `over`, `under`): `kv_aware` predictions of a
/// worker's cached prompt tokens, against what its answer reported.
pub const KV_PREDICTIONS_TOTAL: &str = "tandem_router_kv_predictions_total";
/// Counter: cached prompt tokens predicted, over the requests counted above.
pub const KV_PREDICTED_CACHED_TOKENS_TOTAL: &str = "tandem_router_kv_predicted_cached_tokens_total";
/// Counter: cached prompt tokens the workers reported, over the same requests.
pub const KV_ACTUAL_CACHED_TOKENS_TOTAL: &str = "tandem_router_kv_actual_cached_tokens_total";
/// Counter, label [`OUTCOME`] (`ok`, `error`, `unsupported`): getting a request's token
/// ids for `kv_aware` (a worker's `/tokenize`, the local tokenizer or the prompt itself).
pub const KV_TOKENIZE_TOTAL: &str = "tandem_router_kv_tokenize_total";

/// Counter: KV event batches applied to the KV index (live and replayed).
pub const KV_EVENT_BATCHES_TOTAL: &str = "tandem_router_kv_event_batches_total";
/// Counter, label [`REASON`]: KV event messages, batches or blocks dropped:
/// `decode_error`, `bad_frames`, `too_large`, `topic`, `gap`, `restart`, `disconnect`,
/// `duplicate`, `unknown_parent`, `token_mismatch`, `zero_block_size`, `over_cap`
/// (blocks), `removed_unknown` (hashes).
pub const KV_EVENTS_DROPPED_TOTAL: &str = "tandem_router_kv_events_dropped_total";
/// Counter, label [`OUTCOME`] (`ok`, `failed`, `unavailable`): replays after a gap.
pub const KV_REPLAYS_TOTAL: &str = "tandem_router_kv_replays_total";
/// Gauge, label [`WORKER`]: engine blocks of the worker in the KV index.
pub const KV_INDEX_BLOCKS: &str = "tandem_router_kv_index_blocks";
/// Gauge: followed workers whose KV cache is unknown (disconnected, stale, silent).
pub const KV_UNKNOWN_WORKERS: &str = "tandem_router_kv_unknown_workers";

/// Counter by outcome: streamed answers whose worker failed mid-stream. `resumed`:
/// continued on another worker; `completed`: the answer was whole already, the
/// router ended it; `failed`: no worker took the continuation; `not_resumable`:
/// the limit was reached or the request cannot move (docs/router.md).
pub const MIGRATIONS_TOTAL: &str = "tandem_router_migrations_total";

/// Gauge: workers the router follows from etcd.
pub const DISCOVERED_WORKERS: &str = "tandem_router_discovered_workers";
/// Counter by action (`add`, `remove`): discovered workers joining and leaving.
pub const DISCOVERY_CHANGES_TOTAL: &str = "tandem_router_discovery_changes_total";

/// Counter, label [`ACTION`] (`move_to_prefill`, `move_to_decode`, `start_prefill`,
/// `start_decode`, `stop_prefill`, `stop_decode`, `cannot_meet`, `meets`,
/// `confirming`, `no_room`, `cooling`, `moving`, `few_samples`): the online planner's
/// verdict on each window.
pub const PLANNER_DECISIONS_TOTAL: &str = "tandem_router_planner_decisions_total";
/// Counter, labels [`ROLE`] (the pool moved to) and [`OUTCOME`] (`ok`, `failed`):
/// workers the planner moved between the P/D pools.
pub const PLANNER_MOVES_TOTAL: &str = "tandem_router_planner_moves_total";
/// Counter, labels [`ROLE`] (the pool), [`ACTION`] (`start`, `stop`) and [`OUTCOME`]
/// (`ok`, `failed`): workers the planner had started or stopped within its budget.
pub const PLANNER_SCALE_TOTAL: &str = "tandem_router_planner_scale_total";
/// Gauge, label [`ROLE`]: healthy, non-draining workers in each P/D pool, as the
/// planner last counted them.
pub const PLANNER_POOL_WORKERS: &str = "tandem_router_planner_pool_workers";
/// Gauge, label [`FIGURE`] (`ttft`, `tpot`): the planner's last window percentile,
/// seconds.
pub const PLANNER_WINDOW_SECONDS: &str = "tandem_router_planner_window_seconds";

/// Gauge, label [`ROLE`]: the mean KV cache usage (0 to 1) of each P/D pool's workers,
/// as the planner last read it from their metrics.
pub const PLANNER_POOL_KV_USAGE: &str = "tandem_router_planner_pool_kv_usage";

/// The workers' own gauge (vLLM's name, which tandem's workers share): the fraction
/// of their KV cache in use.
pub const WORKER_KV_CACHE_USAGE: &str = "vllm:kv_cache_usage_perc";

/// Histogram: seconds the router spent building one `/dashboard` snapshot (its own
/// metrics read, the workers' figures parsed, the JSON written); built once a second,
/// only while someone watches. What the live view costs the router, measured directly.
pub const DASHBOARD_SNAPSHOT_SECONDS: &str = "tandem_router_dashboard_snapshot_seconds";

pub const MODE: &str = "mode";
pub const ENDPOINT: &str = "endpoint";
pub const OUTCOME: &str = "outcome";
pub const WORKER: &str = "worker";
/// `prefill`, `decode`, or `whole` (replicated mode).
pub const LEG: &str = "leg";
pub const DECISION: &str = "decision";
pub const REASON: &str = "reason";
/// `stripped` or `rejected`; the planner's verdicts; discovery's `add` and `remove`.
pub const ACTION: &str = "action";
/// A P/D pool: `prefill` or `decode`.
pub const ROLE: &str = "role";
/// `ttft` or `tpot`.
pub const FIGURE: &str = "figure";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// Installs the process-wide recorder; its handle renders `/metrics`.
pub fn install_recorder() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Prefix("tandem_router_".into()), LATENCY_BUCKETS)?
        .install_recorder()?;
    describe();
    start_at_zero();
    keep_up(handle.clone());
    Ok(handle)
}

/// Drains the histograms' recorded samples every 5 s. Without it they pile up
/// between scrapes — without bound when nobody scrapes (`install_recorder` leaves
/// this to the caller).
fn keep_up(handle: PrometheusHandle) {
    let upkeep = move || {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(5));
            handle.run_upkeep();
        }
    };
    if let Err(err) = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(upkeep)
    {
        tracing::warn!("no metrics upkeep thread: {err}");
    }
}

/// The counters of rare events exist from the start, at 0, so that a dashboard's
/// `rate()` reads 0 instead of no data until the first one happens.
fn start_at_zero() {
    for leg in ["whole", "prefill", "decode"] {
        metrics::counter!(RETRIES_TOTAL, LEG => leg).absolute(0);
    }
    metrics::counter!(PD_FALLBACKS_TOTAL).absolute(0);
    for outcome in ["resumed", "completed", "failed", "not_resumable"] {
        metrics::counter!(MIGRATIONS_TOTAL, OUTCOME => outcome).absolute(0);
    }
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        REQUESTS_TOTAL,
        "Client requests by mode, endpoint and outcome."
    );
    describe_counter!(
        WORKER_REQUESTS_TOTAL,
        "Upstream calls by worker, leg and outcome."
    );
    describe_histogram!(
        TIME_TO_FIRST_BYTE_SECONDS,
        Unit::Seconds,
        "Arrival to the first byte relayed to the client."
    );
    describe_histogram!(
        E2E_SECONDS,
        Unit::Seconds,
        "Arrival to the end of the relayed answer."
    );
    describe_histogram!(
        PREFILL_LEG_SECONDS,
        Unit::Seconds,
        "Duration of prefill legs."
    );
    describe_histogram!(
        HANDOFF_SECONDS,
        Unit::Seconds,
        "Prefill answer to the decode worker's response headers."
    );
    describe_histogram!(
        DASHBOARD_SNAPSHOT_SECONDS,
        Unit::Seconds,
        "CPU-bound time to build one /dashboard snapshot (only while someone watches)."
    );
    describe_gauge!(IN_FLIGHT, "Requests routed to a worker and not finished.");
    describe_counter!(RETRIES_TOTAL, "Upstream calls retried on another worker.");
    describe_counter!(
        MIGRATIONS_TOTAL,
        "Streamed answers whose worker failed mid-stream, by what the router did."
    );
    describe_gauge!(
        CIRCUIT_STATE,
        "Circuit breaker: 0 closed, 1 half-open, 2 open."
    );
    describe_gauge!(WORKER_HEALTHY, "1 while a worker passes its health checks.");
    describe_counter!(
        PD_FALLBACKS_TOTAL,
        "Prefill answers without kv_transfer_params (decode computed the prompt)."
    );
    describe_counter!(
        DISAGG_DECISIONS_TOTAL,
        "P/D mode decisions: remote prefill, or the decode worker alone."
    );
    describe_counter!(
        KV_EVENT_BATCHES_TOTAL,
        "KV event batches applied to the KV index."
    );
    describe_counter!(
        KV_EVENTS_DROPPED_TOTAL,
        "KV event messages, batches or blocks dropped, by reason."
    );
    describe_counter!(
        KV_REPLAYS_TOTAL,
        "KV event replays after a gap, by outcome."
    );
    describe_gauge!(
        KV_INDEX_BLOCKS,
        "Engine blocks of a worker in the KV index."
    );
    describe_gauge!(
        KV_UNKNOWN_WORKERS,
        "Followed workers whose KV cache is unknown (disconnected, stale or silent)."
    );
    describe_counter!(
        CLIENT_KV_TRANSFER_PARAMS_TOTAL,
        "Client requests carrying their own kv_transfer_params, stripped or rejected."
    );
    describe_gauge!(DISCOVERED_WORKERS, "Workers the router follows from etcd.");
    describe_counter!(
        DISCOVERY_CHANGES_TOTAL,
        "Discovered workers added to or removed from the pool, by action."
    );
    describe_counter!(
        PLANNER_DECISIONS_TOTAL,
        "The online planner's verdicts on its windows, by action."
    );
    describe_counter!(
        PLANNER_MOVES_TOTAL,
        "Workers the planner moved between P/D pools, by pool moved to and outcome."
    );
    describe_counter!(
        PLANNER_SCALE_TOTAL,
        "Workers the planner had started or stopped, by pool, action and outcome."
    );
    describe_gauge!(
        PLANNER_POOL_WORKERS,
        "Healthy, non-draining workers per P/D pool, as the planner last counted."
    );
    describe_gauge!(
        PLANNER_WINDOW_SECONDS,
        Unit::Seconds,
        "The planner's last window percentile of TTFT and TPOT."
    );
    describe_gauge!(
        PLANNER_POOL_KV_USAGE,
        "Mean KV cache usage (0 to 1) of each P/D pool's workers, as the planner last read."
    );
}
