//! Router overhead in P/D mode against static upstreams on loopback, tandem's router
//! and the baselines measured in the same run:
//!
//! - vllm-router (`pip install vllm-router`; found as `$VLLM_ROUTER` or `vllm-router` on
//!   `PATH`; `scripts/setup-router-baselines.sh` installs it in `.venv-bench`), run with
//!   `--vllm-pd-disaggregation --prefill URL --decode URL --policy round_robin`;
//! - vLLM's toy proxy, when `$TOY_PROXY` names a copy of
//!   `tests/v1/kv_connector/nixl_integration/toy_proxy_server.py` (run with that venv's
//!   python).
//!
//! Figures: p50 added latency at 1 connection (through the router minus the client
//! calling the prefill and decode upstreams itself), requests per second at 32
//! connections, and the router's RSS while 1,000 streams are open. For tandem also
//! what one `/dashboard` viewer costs: the router's CPU time over the same load with
//! and without a viewer's stream open, and the stream's CPU on an idle router.
//!
//! `cargo bench -p tandem-cli --bench router_overhead [-- quick] [-- dashboard]`
//! (`dashboard`: only tandem's router, and only what a viewer costs it)

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::{RouterProcess, free_port, spawn};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// Measurement rounds per figure (the best is kept).
const ROUNDS: usize = 3;

/// The static prefill/decode upstream: answers instantly, in vLLM's shapes.
async fn upstream(body: axum::Json<Value>) -> Response {
    let prefill = body["kv_transfer_params"]["do_remote_decode"] == json!(true);
    if prefill {
        return axum::Json(json!({
            "id": "cmpl-x", "object": "text_completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "text": " a", "logprobs": null,
                "finish_reason": "length", "stop_reason": null}],
            "usage": {"prompt_tokens": 8, "total_tokens": 9, "completion_tokens": 1},
            "kv_transfer_params": {"do_remote_prefill": true, "do_remote_decode": false,
                "remote_block_ids": [[1, 2, 3]], "remote_engine_id": "e",
                "remote_request_id": "cmpl-x-0-00000000", "remote_host": "127.0.0.1",
                "remote_port": 5600, "tp_size": 1, "remote_num_tokens": 8}
        }))
        .into_response();
    }
    if body["stream"] == json!(true) {
        return slow_stream(body["max_tokens"].as_u64().unwrap_or(4) as usize);
    }
    axum::Json(json!({
        "id": "cmpl-x", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "text": " a b c d", "logprobs": null,
            "finish_reason": "length", "stop_reason": null}],
        "usage": {"prompt_tokens": 8, "total_tokens": 12, "completion_tokens": 4},
        "kv_transfer_params": null
    }))
    .into_response()
}

/// `events` SSE chunks, one every 100 ms (for the open-streams measurement).
fn slow_stream(events: usize) -> Response {
    let chunks = futures_util::stream::unfold(0, move |i| async move {
        if i > events {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let data = if i == events {
            "data: [DONE]\n\n".to_owned()
        } else {
            format!("data: {{\"choices\":[{{\"index\":0,\"text\":\" t{i}\"}}]}}\n\n")
        };
        Some((Ok::<_, std::convert::Infallible>(data), i + 1))
    });
    let mut response = Response::new(Body::from_stream(chunks));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, "text/event-stream".parse().unwrap());
    response
}

fn upstream_app() -> Router {
    Router::new()
        .route("/v1/completions", post(upstream))
        .route("/v1/chat/completions", post(upstream))
        .route("/health", get(|| async { "" }))
        .route(
            "/v1/models",
            get(|| async { axum::Json(json!({"object": "list", "data": [{"id": "m", "object": "model", "root": "m"}]})) }),
        )
}

async fn start_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    // The fake worker is served like a real one (tandem's one HTTP server loop).
    let limits = tandem_httpd::HttpLimits::default();
    tokio::spawn(tandem_httpd::serve(
        listener,
        upstream_app(),
        limits,
        std::future::pending(),
    ));
    address
}

fn tandem_router(prefill: SocketAddr, decode: SocketAddr) -> RouterProcess {
    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tandem"));
    command.args(["route", "--port", &port.to_string()]);
    command.args(["--prefill", &format!("http://{prefill}")]);
    command.args(["--decode", &format!("http://{decode}")]);
    command.args(["--policy", "round_robin"]);
    spawn("tandem route", command, port)
}

fn vllm_router(prefill: SocketAddr, decode: SocketAddr) -> Option<RouterProcess> {
    let Some(binary) = find_program("VLLM_ROUTER", "vllm-router") else {
        eprintln!(
            "vllm-router not found ($VLLM_ROUTER or PATH): skipped (scripts/setup-router-baselines.sh)"
        );
        return None;
    };
    let port = free_port();
    let mut command = Command::new(binary);
    command.args(["--host", "127.0.0.1", "--port", &port.to_string()]);
    command.args(["--vllm-pd-disaggregation", "--policy", "round_robin"]);
    command.args(["--prefill", &format!("http://{prefill}")]);
    command.args(["--decode", &format!("http://{decode}")]);
    command.args(["--log-level", "error"]);
    Some(spawn("vllm-router", command, port))
}

/// `$variable`, else `name` found on `PATH`.
fn find_program(variable: &str, name: &str) -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os(variable) {
        return Some(path.into());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn toy_proxy(prefill: SocketAddr, decode: SocketAddr) -> Option<RouterProcess> {
    let script = std::env::var("TOY_PROXY").ok()?;
    let python = std::env::var("TOY_PROXY_PYTHON").unwrap_or_else(|_| "python3".into());
    let port = free_port();
    let mut command = Command::new(python);
    command.args([script.as_str(), "--port", &port.to_string()]);
    command.args([
        "--prefiller-host",
        "127.0.0.1",
        "--prefiller-port",
        &prefill.port().to_string(),
    ]);
    command.args([
        "--decoder-host",
        "127.0.0.1",
        "--decoder-port",
        &decode.port().to_string(),
    ]);
    Some(spawn("toy proxy", command, port))
}

/// Waits until a completion goes through `base`.
async fn wait_ready(client: &reqwest::Client, base: &str) -> bool {
    for _ in 0..300 {
        if let Ok(r) = client
            .post(format!("{base}/v1/completions"))
            .json(&body())
            .send()
            .await
            && r.status().is_success()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn body() -> Value {
    json!({"model": "m", "prompt": "Explain how HTTP load balancers work.", "max_tokens": 4})
}

/// Latencies of `total` requests over `connections` concurrent clients, and the
/// wall time they took.
async fn load(
    client: &reqwest::Client,
    base: &str,
    connections: usize,
    total: usize,
) -> (Vec<Duration>, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks = (0..connections).map(|_| {
        let (client, next, url) = (
            client.clone(),
            next.clone(),
            format!("{base}/v1/completions"),
        );
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let sent = Instant::now();
                let response = client.post(&url).json(&body()).send().await.unwrap();
                assert!(response.status().is_success(), "{}", response.status());
                response.bytes().await.unwrap();
                latencies.push(sent.elapsed());
            }
            latencies
        })
    });
    let mut latencies: Vec<Duration> = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .flat_map(Result::unwrap)
        .collect();
    latencies.sort();
    (latencies, started.elapsed())
}

/// The client doing both legs itself: the floor a router adds to.
async fn direct_two_legs(
    client: &reqwest::Client,
    prefill: SocketAddr,
    decode: SocketAddr,
    total: usize,
) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(total);
    for _ in 0..total {
        let sent = Instant::now();
        let mut leg = body();
        leg["kv_transfer_params"] = json!({"do_remote_decode": true});
        let answer: Value = client
            .post(format!("http://{prefill}/v1/completions"))
            .json(&leg)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut leg = body();
        leg["kv_transfer_params"] = answer["kv_transfer_params"].clone();
        client
            .post(format!("http://{decode}/v1/completions"))
            .json(&leg)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        latencies.push(sent.elapsed());
    }
    latencies.sort();
    latencies
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 12th, stime
    // the 13th; both in clock ticks (100 a second on Linux).
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// One dashboard viewer: reads `/dashboard/events` until dropped; counts snapshots.
struct Viewer {
    task: tokio::task::JoinHandle<()>,
    snapshots: Arc<AtomicUsize>,
}

impl Viewer {
    async fn open(base: &str) -> Viewer {
        let snapshots = Arc::new(AtomicUsize::new(0));
        let response = reqwest::get(format!("{base}/dashboard/events"))
            .await
            .unwrap();
        assert!(response.status().is_success());
        let counted = snapshots.clone();
        let task = tokio::spawn(async move {
            let mut stream = response.bytes_stream();
            while let Some(Ok(chunk)) = stream.next().await {
                let events = chunk
                    .windows(15)
                    .filter(|w| w == b"event: snapshot")
                    .count();
                counted.fetch_add(events, Ordering::Relaxed);
            }
        });
        Viewer { task, snapshots }
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The router's CPU seconds for `total` requests at 32 connections, and the wall time.
async fn cpu_for_load(
    client: &reqwest::Client,
    router: &RouterProcess,
    total: usize,
) -> (f64, f64) {
    let before = cpu_seconds(router.child.id());
    let (_, wall) = load(client, &router.base, 32, total).await;
    (cpu_seconds(router.child.id()) - before, wall.as_secs_f64())
}

/// The router's snapshot-building time so far (`_sum`, `_count` of its histogram).
async fn snapshot_seconds(client: &reqwest::Client, router: &RouterProcess) -> (f64, f64) {
    let text = common::metrics_text(client, &format!("{}/metrics", router.base)).await;
    let read = |suffix: &str| {
        let name = format!("tandem_router_dashboard_snapshot_seconds_{suffix}");
        common::metric_value(&text, &name, &[])
    };
    (read("sum"), read("count"))
}

/// What one dashboard viewer costs the router under load, two ways: directly (the
/// router's own timing of the snapshots it builds, per second of load), and as the
/// difference of its CPU time over the same load with and without a viewer's stream
/// open — rounds alternating which goes first, so that the machine's drift cancels,
/// with the spread of the per-round ratios as the noise it has to beat. Then idle.
async fn dashboard_cost(client: &reqwest::Client, router: &RouterProcess, total: usize) {
    // CPU time comes in 10 ms ticks and the machine drifts: long rounds, alternating.
    const DASHBOARD_ROUNDS: usize = 8;
    let total = total * 3;
    let (mut without, mut with, mut wall_with) = (0.0, 0.0, 0.0);
    let (mut snapshots, mut built, mut built_count) = (0, 0.0, 0.0);
    let mut ratios = Vec::with_capacity(DASHBOARD_ROUNDS);
    for round in 0..DASHBOARD_ROUNDS {
        let mut measured = [0.0; 2]; // [without, with]
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for viewing in order {
            // The same pause before both (the viewer's first snapshot comes in it): a
            // pause only before the viewer's rounds would be measured as the viewer.
            if viewing == 0 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                measured[0] = cpu_for_load(client, router, total).await.0;
                continue;
            }
            let viewer = Viewer::open(&router.base).await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let before = snapshot_seconds(client, router).await;
            let (cpu, seconds) = cpu_for_load(client, router, total).await;
            let after = snapshot_seconds(client, router).await;
            measured[1] = cpu;
            wall_with += seconds;
            built += after.0 - before.0;
            built_count += after.1 - before.1;
            snapshots += viewer.snapshots.load(Ordering::Relaxed);
        }
        without += measured[0];
        with += measured[1];
        ratios.push(measured[1] / measured[0].max(1e-9) - 1.0);
    }
    ratios.sort_by(f64::total_cmp);
    let requests = (DASHBOARD_ROUNDS * total) as f64;
    println!(
        "tandem route with a /dashboard viewer ({:.0} req/s, {snapshots} snapshots received):\n  \
         directly: {built_count:.0} snapshots built under load, {:.2} ms each, {:.3}% of a core, \
         {:.3}% of the router's CPU (target < 1%)\n  \
         by difference: {:.1} µs of router CPU per request with, {:.1} without: {:+.2}% \
         (rounds from {:+.2}% to {:+.2}%, median {:+.2}%)",
        requests / wall_with,
        built / built_count.max(1.0) * 1e3,
        built / wall_with * 100.0,
        built / with.max(1e-9) * 100.0,
        with / requests * 1e6,
        without / requests * 1e6,
        (with / without.max(1e-9) - 1.0) * 100.0,
        ratios[0] * 100.0,
        ratios[ratios.len() - 1] * 100.0,
        ratios[ratios.len() / 2] * 100.0,
    );
    let idle_before = cpu_seconds(router.child.id());
    let viewer = Viewer::open(&router.base).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle = cpu_seconds(router.child.id()) - idle_before;
    println!(
        "tandem route idle with a /dashboard viewer: {:.2}% of a core over 10 s ({} snapshots)",
        idle / 10.0 * 100.0,
        viewer.snapshots.load(Ordering::Relaxed)
    );
}

fn p50(latencies: &[Duration]) -> Duration {
    latencies[latencies.len() / 2]
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// RSS of the router (and its children, for launchers) while `streams` streams are open.
async fn rss_with_open_streams(router: &RouterProcess, streams: usize) -> Option<f64> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = format!("{}/v1/completions", router.base);
    let opened = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let (client, url, opened) = (client.clone(), url.clone(), opened.clone());
            tokio::spawn(async move {
                let mut body = body();
                body["stream"] = json!(true);
                body["max_tokens"] = json!(50);
                let response = client.post(&url).json(&body).send().await.ok()?;
                let mut stream = response.bytes_stream();
                stream.next().await?.ok()?;
                opened.fetch_add(1, Ordering::Relaxed);
                while stream.next().await.is_some() {}
                Some(())
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(4);
    while opened.load(Ordering::Relaxed) < streams && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open = opened.load(Ordering::Relaxed);
    let rss = process_tree_rss_kib(router.child.id());
    for task in tasks {
        task.abort();
    }
    if open < streams {
        eprintln!("{}: only {open} of {streams} streams opened", router.name);
    }
    rss.map(|kib| kib as f64 / 1024.0)
}

/// RSS of `pid` and its descendants (vllm-router is a Python launcher around Rust).
fn process_tree_rss_kib(pid: u32) -> Option<u64> {
    let mut total = rss_kib(pid)?;
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
        total += process_tree_rss_kib(child).unwrap_or(0);
    }
    Some(total)
}

struct Figures {
    name: &'static str,
    p50_added: Duration,
    rps: f64,
    rss_mib: Option<f64>,
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let dashboard_only = std::env::args().any(|a| a == "dashboard");
    let (serial, parallel) = if quick { (300, 3000) } else { (1000, 10_000) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let prefill = start_upstream().await;
        let decode = start_upstream().await;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .build()
            .unwrap();
        let mut routers = vec![tandem_router(prefill, decode)];
        if !dashboard_only {
            routers.extend(vllm_router(prefill, decode));
            routers.extend(toy_proxy(prefill, decode));
        }
        let ready: Vec<&RouterProcess> = {
            let mut ready = Vec::new();
            for router in &routers {
                if wait_ready(&client, &router.base).await {
                    load(&client, &router.base, 4, serial / 4).await; // warm-up
                    ready.push(router);
                } else {
                    eprintln!("{} never became ready: skipped", router.name);
                }
            }
            ready
        };
        if dashboard_only {
            dashboard_cost(&client, ready[0], parallel).await;
            return;
        }
        // Latency rounds alternate between routers (and the direct floor), best p50
        // of each kept: the machine is shared and drifts.
        let mut floor = Duration::MAX;
        let mut best_p50 = vec![Duration::MAX; ready.len()];
        for _ in 0..ROUNDS {
            floor = floor.min(p50(&direct_two_legs(&client, prefill, decode, serial).await));
            for (i, router) in ready.iter().enumerate() {
                let (one, _) = load(&client, &router.base, 1, serial).await;
                best_p50[i] = best_p50[i].min(p50(&one));
            }
        }
        println!("client doing both legs itself: p50 {:.3} ms", floor.as_secs_f64() * 1e3);
        let mut figures = Vec::new();
        for (i, router) in ready.iter().enumerate() {
            let mut rps: f64 = 0.0;
            for _ in 0..ROUNDS {
                let (_, wall) = load(&client, &router.base, 32, parallel).await;
                rps = rps.max(parallel as f64 / wall.as_secs_f64());
            }
            let rss = rss_with_open_streams(router, 1000).await;
            let figure = Figures {
                name: router.name,
                p50_added: best_p50[i].saturating_sub(floor),
                rps,
                rss_mib: rss,
            };
            println!(
                "{}: p50 added latency {:.3} ms | {:.0} req/s at 32 connections | RSS with 1000 open streams {}",
                figure.name,
                figure.p50_added.as_secs_f64() * 1e3,
                figure.rps,
                figure.rss_mib.map_or("n/a".into(), |m| format!("{m:.1} MiB"))
            );
            figures.push(figure);
        }
        dashboard_cost(&client, ready[0], parallel).await;
        let ours = &figures[0];
        for other in &figures[1..] {
            let targets = if other.name == "vllm-router" {
                [" (target <= 0.6x)", " (target >= 1.5x)"]
            } else {
                ["", ""]
            };
            println!(
                "tandem vs {}: added latency {:.2}x{} | req/s {:.2}x{}",
                other.name,
                ours.p50_added.as_secs_f64() / other.p50_added.as_secs_f64().max(1e-9),
                targets[0],
                ours.rps / other.rps,
                targets[1]
            );
        }
    });
}
