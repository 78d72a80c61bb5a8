//! The KV hand-off between two real `tandem serve` processes on loopback, each figure
//! against its ceiling or baseline in the same run:
//!
//! 1. hand-off throughput of a 2,048-token prompt's KV (P → D, as the decode worker's
//!    `tandem:kv_transfer_seconds` measures it: connect, handshake, read, done) vs a
//!    `memcpy` of the same bytes;
//! 2. time to first token of a 512-token prompt through P → D (prefill leg, then the
//!    streamed decode leg, as a proxy runs them) vs a single worker;
//! 3. the CPU time the hand-off's authentication adds to one hand-off (P signs the
//!    params, D checks them; the handshake's two nonces, two proofs and two checks),
//!    in this process, against the hand-off's own time from 1.
//!
//! `cargo bench -p tandem-cli --bench handoff` (needs the default model;
//! `TANDEM_BENCH_THREADS`, default 2, per worker; `TANDEM_BENCH_BIN`, default the
//! `tandem` built with the bench: another build's binary, for an A/B comparison).

mod common;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use common::WorkerProcess;

const TRIALS: usize = 3;

/// The cluster KV secret the bench's workers share (builds before protocol v2 ignore it).
const KV_SECRET: &str = "tandem-handoff-bench-secret-0123456789";

/// A `tandem serve` of the bench, with the shared KV secret.
struct Worker;

impl Worker {
    fn start(threads: &str, extra: &[&str]) -> WorkerProcess {
        let mut args = vec!["--threads", threads, "--kv-cache-memory", "512MiB"];
        args.extend_from_slice(&["--max-model-len", "4096"]);
        args.extend_from_slice(extra);
        WorkerProcess::start(&args, &[("TANDEM_KV_SECRET", KV_SECRET)])
    }
}

/// `len` token ids, different for every `seed` from the first token on (so no worker
/// finds any of it in its prefix cache).
fn prompt(len: usize, seed: u32) -> Vec<u32> {
    let mut state = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            1000 + state % 20_000
        })
        .collect()
}

async fn post(client: &reqwest::Client, worker: &WorkerProcess, body: &Value) -> Value {
    let response = client
        .post(worker.url("/v1/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The prefill leg; returns its `kv_transfer_params`.
async fn prefill(client: &reqwest::Client, p: &WorkerProcess, ids: &[u32]) -> Value {
    let leg = json!({"prompt": ids, "max_tokens": 1, "stream": false,
        "kv_transfer_params": {"do_remote_decode": true}});
    let answer = post(client, p, &leg).await;
    answer["kv_transfer_params"].clone()
}

/// Sends a streamed request; returns when its first chunk arrives (then drains it).
async fn first_chunk(client: &reqwest::Client, worker: &WorkerProcess, body: &Value) -> Instant {
    let response = client
        .post(worker.url("/v1/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let at = Instant::now();
    while stream.next().await.is_some() {}
    at
}

/// The value of series `name` carrying all of `labels` on the worker's
/// `/metrics` (0 before its first increment).
async fn metric(
    client: &reqwest::Client,
    worker: &WorkerProcess,
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    common::metric_value(
        &common::metrics_text(client, &worker.url("/metrics")).await,
        name,
        labels,
    )
}

/// D's pull totals: (seconds, bytes received).
async fn pull_totals(client: &reqwest::Client, d: &WorkerProcess) -> (f64, f64) {
    let seconds = metric(client, d, "tandem:kv_transfer_seconds_sum", &[]).await;
    let received = [("direction", "received")];
    let bytes = metric(client, d, "tandem:kv_transfer_bytes_total", &received).await;
    (seconds, bytes)
}

/// Microseconds of CPU the authentication of one hand-off costs, best of several
/// batches: everything both sides compute that protocol v1 did not.
fn auth_micros() -> f64 {
    use tandem_engine::transfer::auth::{self, ClusterSecret, Nonce, SignedParams};
    let secret = ClusterSecret::new(KV_SECRET.as_bytes(), "bench").unwrap();
    let blocks: Vec<u32> = (0..128).collect();
    const BATCH: u32 = 1000;
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        for _ in 0..BATCH {
            let lease_secret = auth::new_lease_secret();
            let params = SignedParams {
                engine_id: "3c1e4f2a-0000-4000-8000-000000000000",
                request_id: "cmpl-0123456789abcdef0123456789abcdef-0-1a2b3c4d",
                block_ids: &blocks,
                host: "10.0.0.5",
                port: 5600,
                num_tokens: 2048,
                expires_at: auth::now_unix() + 30,
                lease_secret: &lease_secret,
            };
            let signature = params.sign(&secret);
            params
                .verify(&secret, &signature, auth::now_unix())
                .unwrap();
            let (client, server) = (Nonce::random(), Nonce::random());
            let server_proof = auth::server_proof(&secret, &client, &server);
            assert!(auth::verify_server_proof(
                &secret,
                &client,
                &server,
                &server_proof
            ));
            let client_proof = auth::client_proof(&secret, &client, &server);
            assert!(auth::verify_client_proof(
                &secret,
                &client,
                &server,
                &client_proof
            ));
            assert!(auth::secrets_equal(
                &lease_secret,
                std::hint::black_box(&lease_secret)
            ));
        }
        best = best.min(started.elapsed());
    }
    best.as_secs_f64() * 1e6 / f64::from(BATCH)
}

/// GB/s of copying `bytes` bytes between two warm buffers, best of several.
fn memcpy_gbps(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut best = Duration::MAX;
    for _ in 0..10 {
        let started = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        best = best.min(started.elapsed());
        std::hint::black_box(&mut dst);
    }
    bytes as f64 / best.as_secs_f64() / 1e9
}

fn main() {
    let threads = std::env::var("TANDEM_BENCH_THREADS").unwrap_or_else(|_| "2".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let p = Worker::start(&threads, &["--kv-port", "0"]);
    let d = Worker::start(&threads, &[]);
    let single = Worker::start(&threads, &[]);
    let client = reqwest::Client::new();
    runtime.block_on(async {
        // 1. Hand-off throughput.
        let mut best_gbps: f64 = 0.0;
        let mut bytes_per_pull = 0.0;
        for trial in 0..TRIALS {
            let ids = prompt(2048, trial as u32);
            let params = prefill(&client, &p, &ids).await;
            let (s0, b0) = pull_totals(&client, &d).await;
            let leg = json!({"prompt": ids, "max_tokens": 1, "kv_transfer_params": params});
            post(&client, &d, &leg).await;
            let (s1, b1) = pull_totals(&client, &d).await;
            bytes_per_pull = b1 - b0;
            best_gbps = best_gbps.max(bytes_per_pull / (s1 - s0) / 1e9);
        }
        let ceiling = memcpy_gbps(bytes_per_pull as usize);
        let pull_seconds = bytes_per_pull / (best_gbps * 1e9);
        println!(
            "hand-off of a 2048-token prompt ({:.1} MB): {best_gbps:.2} GB/s | memcpy {ceiling:.2} GB/s | ratio {:.0}% (target >= 30%)",
            bytes_per_pull / 1e6,
            100.0 * best_gbps / ceiling
        );

        // 2. TTFT of a 512-token prompt.
        let mut alone = Duration::MAX;
        let mut through = Duration::MAX;
        for trial in 0..TRIALS {
            let body = |ids: &[u32]| json!({"prompt": ids, "max_tokens": 4, "stream": true});
            let ids = prompt(512, 100 + trial as u32);
            let started = Instant::now();
            alone = alone.min(first_chunk(&client, &single, &body(&ids)).await - started);

            let ids = prompt(512, 200 + trial as u32);
            let started = Instant::now();
            let params = prefill(&client, &p, &ids).await;
            let mut leg = body(&ids);
            leg["kv_transfer_params"] = params;
            through = through.min(first_chunk(&client, &d, &leg).await - started);
        }
        println!(
            "TTFT of a 512-token prompt: single worker {:.1} ms | P->D {:.1} ms | overhead {:+.1}% (target <= 15%)",
            alone.as_secs_f64() * 1e3,
            through.as_secs_f64() * 1e3,
            100.0 * (through.as_secs_f64() / alone.as_secs_f64() - 1.0)
        );

        // 3. What authentication adds, in CPU time.
        let micros = auth_micros();
        println!(
            "authentication of one hand-off: {micros:.1} us of CPU | {:.3}% of the 2048-token pull (target <= 5%) | {:.3} ms of TTFT (target <= 1 ms)",
            100.0 * micros / 1e6 / pull_seconds,
            micros / 1e3
        );
    });
}
