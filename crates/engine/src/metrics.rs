//! The engine's Prometheus metrics: every name in one place, with vLLM's names and
//! meanings (`vllm:*`, `vllm/v1/metrics/loggers.py`) so that dashboards and the
//! benchmark read tandem and vLLM workers alike. Counters carry the `_total` suffix
//! that vLLM's exposition adds.
//!
//! The HTTP layer records the latencies, prompt tokens and every request's end (with
//! the finish reason its client is told); the engine loop counts generated tokens and
//! sets the gauges and the cache, preemption and hand-off metrics.

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Histogram: seconds from a request's arrival to its first output token.
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "vllm:time_to_first_token_seconds";
/// Histogram: seconds between consecutive output tokens of a request.
pub const INTER_TOKEN_LATENCY_SECONDS: &str = "vllm:inter_token_latency_seconds";
/// Histogram: seconds from a request's arrival to its last output token.
pub const E2E_REQUEST_LATENCY_SECONDS: &str = "vllm:e2e_request_latency_seconds";
/// Counter, label [`FINISHED_REASON`]: requests that finished (`stop`, `length`, `abort`).
pub const REQUEST_SUCCESS_TOTAL: &str = "vllm:request_success_total";
/// Counter: prompt tokens of finished requests.
pub const PROMPT_TOKENS_TOTAL: &str = "vllm:prompt_tokens_total";
/// Counter: output tokens of finished requests.
pub const GENERATION_TOKENS_TOTAL: &str = "vllm:generation_tokens_total";
/// Histogram: tokens computed per engine step (prompt chunks and decodes together).
pub const ITERATION_TOKENS_TOTAL: &str = "vllm:iteration_tokens_total";
/// Histogram, labels [`KIND`] (`decode`, `prefill`, `mixed`) and [`PART`] (`forward`:
/// the forward pass with its logits or greedy tokens back on the host; `sample`:
/// sampling and sending the tokens on): seconds of each engine step, where a step's
/// time goes. Recorded before the step's finished requests are answered, so an answer
/// never arrives ahead of the step that produced it.
pub const ENGINE_STEP_SECONDS: &str = "tandem:engine_step_seconds";
/// Gauge: requests in the running batch.
pub const NUM_REQUESTS_RUNNING: &str = "vllm:num_requests_running";
/// Gauge: requests waiting to be scheduled.
pub const NUM_REQUESTS_WAITING: &str = "vllm:num_requests_waiting";
/// Gauge: fraction (0–1) of KV blocks in use.
pub const KV_CACHE_USAGE_PERC: &str = "vllm:kv_cache_usage_perc";
/// Counter: prompt tokens looked up in the prefix cache.
pub const PREFIX_CACHE_QUERIES_TOTAL: &str = "vllm:prefix_cache_queries_total";
/// Counter: prompt tokens found in the prefix cache.
pub const PREFIX_CACHE_HITS_TOTAL: &str = "vllm:prefix_cache_hits_total";
/// Counter: running requests preempted (their KV freed, to be recomputed).
pub const NUM_PREEMPTIONS_TOTAL: &str = "vllm:num_preemptions_total";

/// Counter, label [`DIRECTION`]: KV bytes moved by the hand-off (`sent` by P,
/// `received` by D).
pub const KV_TRANSFER_BYTES_TOTAL: &str = "tandem:kv_transfer_bytes_total";
/// Counter, label [`DIRECTION`]: KV blocks moved by the hand-off.
pub const KV_TRANSFER_BLOCKS_TOTAL: &str = "tandem:kv_transfer_blocks_total";
/// Histogram: seconds of one pull on D, connect to done.
pub const KV_TRANSFER_SECONDS: &str = "tandem:kv_transfer_seconds";
/// Counter: pulls on D that copied GPU memory to GPU memory (same host, CUDA IPC)
/// instead of reading bytes from the socket.
pub const KV_DEVICE_PULLS_TOTAL: &str = "tandem:kv_device_pulls_total";
/// Counter, label [`KIND`]: pulls that failed on D (`unauthenticated`, `unreachable`,
/// `handshake`, `refused`, `transfer`, `invalid_params`).
pub const KV_TRANSFER_FAILURES_TOTAL: &str = "tandem:kv_transfer_failures_total";
/// Counter: decode requests whose remote KV could not be pulled and whose prompt was
/// computed locally instead (`--kv-load-failure-policy recompute`).
pub const KV_LOAD_RECOMPUTES_TOTAL: &str = "tandem:kv_load_recomputes_total";
/// Gauge: blocks P holds under leases for remote readers.
pub const KV_BLOCKS_HELD_FOR_REMOTE: &str = "tandem:kv_blocks_held_for_remote";
/// Counter: leases that expired unread (vLLM's NIXL metric of the same meaning).
pub const KV_EXPIRED_LEASES_TOTAL: &str = "vllm:nixl_num_kv_expired_reqs_total";
/// Counter, label [`SIDE`]: hand-off handshakes that failed authentication (`server`:
/// P refused a peer without the cluster secret; `client`: D met a peer that did not
/// prove the secret, or that refused D's proof).
pub const KV_AUTH_FAILURES_TOTAL: &str = "tandem:kv_auth_failures_total";
/// Counter: KV event batches (`--kv-events-config`) handed to the PUB socket.
pub const KV_EVENTS_PUBLISHED_TOTAL: &str = "tandem:kv_events_published_total";
/// Counter: KV event batches dropped because the queue to the publisher was full
/// (subscribers see a gap in the sequence numbers).
pub const KV_EVENTS_DROPPED_TOTAL: &str = "tandem:kv_events_dropped_total";
/// Counter: malformed requests to the KV event replay socket, ignored.
pub const KV_EVENTS_REPLAY_REFUSED_TOTAL: &str = "tandem:kv_events_replay_refused_total";

/// Label of the KV transfer byte and block counters: `sent` or `received`.
pub const DIRECTION: &str = "direction";
/// Label of [`KV_TRANSFER_FAILURES_TOTAL`] (the failure kind) and of
/// [`ENGINE_STEP_SECONDS`] (the step kind).
pub const KIND: &str = "kind";
/// Label of [`ENGINE_STEP_SECONDS`]: `forward` or `sample`.
pub const PART: &str = "part";
/// Label of [`KV_AUTH_FAILURES_TOTAL`]: `server` or `client`.
pub const SIDE: &str = "side";

/// Label of [`REQUEST_SUCCESS_TOTAL`]: the OpenAI `finish_reason`.
pub const FINISHED_REASON: &str = "finished_reason";

/// vLLM's TTFT buckets, seconds.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's inter-token latency buckets, seconds.
const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request latency buckets, seconds.
const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// vLLM's tokens-per-step buckets.
const ITERATION_TOKEN_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

/// Engine step parts, seconds: from a small model's sampling (tens of microseconds) to
/// a large prefill on a CPU.
const ENGINE_STEP_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// KV pull durations, seconds (loopback pulls take about a millisecond).
const KV_TRANSFER_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Label on every metric, as vLLM's: the served model name.
pub const MODEL_NAME: &str = "model_name";

/// Installs the process-wide Prometheus recorder with vLLM's histogram buckets and
/// describes every metric; the handle renders the text exposition for `/metrics`.
/// Every series carries [`MODEL_NAME`]` = model_name`.
pub fn install_prometheus_recorder(model_name: &str) -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .add_global_label(MODEL_NAME, model_name)
        .set_buckets_for_metric(
            Matcher::Full(TIME_TO_FIRST_TOKEN_SECONDS.into()),
            TTFT_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(INTER_TOKEN_LATENCY_SECONDS.into()),
            INTER_TOKEN_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(E2E_REQUEST_LATENCY_SECONDS.into()),
            REQUEST_LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(KV_TRANSFER_SECONDS.into()),
            KV_TRANSFER_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(ITERATION_TOKENS_TOTAL.into()),
            ITERATION_TOKEN_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(ENGINE_STEP_SECONDS.into()),
            ENGINE_STEP_BUCKETS,
        )?
        .install_recorder()?;
    describe_all();
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

/// Registers help texts (and so the metrics themselves, at zero) with the recorder.
fn describe_all() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        TIME_TO_FIRST_TOKEN_SECONDS,
        Unit::Seconds,
        "Histogram of time to first token in seconds."
    );
    describe_histogram!(
        ITERATION_TOKENS_TOTAL,
        "Histogram of number of tokens per engine_step."
    );
    describe_histogram!(
        ENGINE_STEP_SECONDS,
        Unit::Seconds,
        "Seconds of each engine step, by step kind and part (forward pass, sampling)."
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY_SECONDS,
        Unit::Seconds,
        "Histogram of inter-token latency in seconds."
    );
    describe_histogram!(
        E2E_REQUEST_LATENCY_SECONDS,
        Unit::Seconds,
        "Histogram of end to end request latency in seconds."
    );
    describe_counter!(
        REQUEST_SUCCESS_TOTAL,
        "Count of successfully processed requests."
    );
    describe_counter!(PROMPT_TOKENS_TOTAL, "Number of prefill tokens processed.");
    describe_counter!(
        GENERATION_TOKENS_TOTAL,
        "Number of generation tokens processed."
    );
    describe_gauge!(
        NUM_REQUESTS_RUNNING,
        "Number of requests in model execution batches."
    );
    describe_gauge!(
        NUM_REQUESTS_WAITING,
        "Number of requests waiting to be processed."
    );
    describe_gauge!(
        KV_CACHE_USAGE_PERC,
        "KV-cache usage. 1 means 100 percent usage."
    );
    describe_counter!(
        PREFIX_CACHE_QUERIES_TOTAL,
        "Prefix cache queries, in terms of number of queried tokens."
    );
    describe_counter!(
        PREFIX_CACHE_HITS_TOTAL,
        "Prefix cache hits, in terms of number of cached tokens."
    );
    describe_counter!(
        NUM_PREEMPTIONS_TOTAL,
        "Cumulative number of preemption from the engine."
    );
    describe_counter!(
        KV_TRANSFER_BYTES_TOTAL,
        Unit::Bytes,
        "KV cache bytes moved by the prefill/decode hand-off."
    );
    describe_counter!(
        KV_TRANSFER_BLOCKS_TOTAL,
        "KV cache blocks moved by the prefill/decode hand-off."
    );
    describe_histogram!(
        KV_TRANSFER_SECONDS,
        Unit::Seconds,
        "Seconds of one KV pull on the decode side, connect to done."
    );
    describe_counter!(
        KV_DEVICE_PULLS_TOTAL,
        "KV pulls that copied GPU memory to GPU memory on one host (CUDA IPC)."
    );
    describe_counter!(
        KV_TRANSFER_FAILURES_TOTAL,
        "KV pulls that failed on the decode side, by kind."
    );
    describe_counter!(
        KV_LOAD_RECOMPUTES_TOTAL,
        "Decode requests that computed their prompt locally after a failed KV pull."
    );
    describe_gauge!(
        KV_BLOCKS_HELD_FOR_REMOTE,
        "KV cache blocks held under leases for remote decode workers."
    );
    describe_counter!(
        KV_EXPIRED_LEASES_TOTAL,
        "Requests whose KV blocks were released because their lease expired."
    );
    describe_counter!(
        KV_AUTH_FAILURES_TOTAL,
        "KV hand-off handshakes that failed authentication, by the side that saw it."
    );
    describe_counter!(
        KV_EVENTS_PUBLISHED_TOTAL,
        "KV event batches handed to the ZMQ PUB socket."
    );
    describe_counter!(
        KV_EVENTS_DROPPED_TOTAL,
        "KV event batches dropped because the queue to the publisher was full."
    );
    describe_counter!(
        KV_EVENTS_REPLAY_REFUSED_TOTAL,
        "Malformed KV event replay requests, ignored."
    );
}
