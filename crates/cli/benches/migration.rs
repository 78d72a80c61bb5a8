//! What request migration costs and what it buys, measured on `tandem route` against
//! fake workers on loopback that stream vLLM-shaped chat chunks as fast as they can
//! (with `token_ids` when asked, as vLLM does):
//!
//! - relay cost: streamed chunks per second through the router at 32 concurrent
//!   streams, and the router's CPU time per chunk, with `--migration-limit 0` (the
//!   plain relay, the baseline) and `--migration-limit 1` (every chunk parsed,
//!   recorded and re-serialized), in the same run; the ratio is printed;
//! - the seam: a worker that drops every stream after 16 chunks, a second worker that
//!   serves the continuations, both taking 2 ms per token; the gap the client sees
//!   between the last chunk before the failure and the first after it (p50, p99)
//!   against the other gaps, and that every answer arrives whole.
//!
//! `cargo bench -p tandem-cli --bench migration [-- quick]`

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use axum::routing::{get, post};
use common::{RouterProcess, free_port, spawn};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// Output tokens per answer.
const TOKENS: usize = 64;
/// Where the failing worker drops each stream.
const FAIL_AFTER: usize = 16;
/// A decode step of the failing workers.
const STEP: Duration = Duration::from_millis(2);

/// How a fake worker streams.
#[derive(Clone, Copy)]
struct Behaviour {
    /// Drop a chat stream's connection after this many chunks (a worker that dies);
    /// the router's continuations (completions) are served whole.
    fail_after: Option<usize>,
    /// A pause before each chunk (a decode step), or none (as fast as possible).
    step: Option<Duration>,
}

/// A vLLM-shaped streamed answer: chat chunks for chat requests, completions chunks
/// for the router's continuations (which carry token-id prompts).
async fn answer(State(behaviour): State<Behaviour>, body: axum::Json<Value>) -> Response {
    let ids = body["return_token_ids"] == json!(true);
    let chat = body.get("messages").is_some();
    let tokens = body["max_tokens"].as_u64().unwrap_or(TOKENS as u64) as usize;
    let prompt: Vec<u64> = body["prompt"]
        .as_array()
        .map(|ids| ids.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_else(|| (1..=8).collect());
    // Token i of the whole answer has id 1000 + i and text " t{i}": a continuation
    // goes on from where its prompt (8 prompt ids + those streamed) ends.
    let first = prompt.len() - 8;
    let fail_after = behaviour.fail_after.filter(|_| chat);
    let step = behaviour.step;
    let prompt = Arc::new(prompt);
    let events = futures_util::stream::iter(0..=tokens + 1).then(move |i| {
        let prompt = prompt.clone();
        async move {
            // A dying worker fails right after its last chunk.
            if fail_after == Some(i) {
                return Err(std::io::Error::other("the worker died"));
            }
            if let Some(step) = step {
                tokio::time::sleep(step).await;
            }
            let token = first + i;
            // Chunks 0..tokens carry a token each; then the finish chunk, then [DONE].
            let text = if i < tokens {
                format!(" t{token}")
            } else {
                String::new()
            };
            let chunk = if i == tokens + 1 {
                "[DONE]".to_owned()
            } else if chat {
                let mut chunk = json!({"id": "chatcmpl-x", "object": "chat.completion.chunk",
                "created": 1, "model": "m", "choices": [{"index": 0,
                "delta": {"content": text}, "logprobs": null,
                "finish_reason": if i == tokens { json!("length") } else { Value::Null }}]});
                if ids {
                    chunk["choices"][0]["token_ids"] = token_ids(i, tokens, token);
                    if i == 0 {
                        chunk["prompt_token_ids"] = json!(*prompt);
                    }
                }
                chunk.to_string()
            } else {
                let mut chunk = json!({"id": "cmpl-y", "object": "text_completion",
                "created": 2, "model": "m", "choices": [{"index": 0,
                "text": text, "logprobs": null,
                "finish_reason": if i == tokens { json!("length") } else { Value::Null }}]});
                if ids {
                    chunk["choices"][0]["token_ids"] = token_ids(i, tokens, token);
                }
                chunk.to_string()
            };
            Ok(format!("data: {chunk}\n\n"))
        }
    });
    let mut response = Response::new(Body::from_stream(events));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, "text/event-stream".parse().unwrap());
    response
}

fn token_ids(i: usize, tokens: usize, token: usize) -> Value {
    if i < tokens {
        json!([1000 + token])
    } else {
        json!([])
    }
}

async fn start_worker(behaviour: Behaviour) -> SocketAddr {
    let app = Router::new()
        .route("/v1/completions", post(answer))
        .route("/v1/chat/completions", post(answer))
        .route("/health", get(|| async { "" }))
        .with_state(behaviour);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let limits = tandem_httpd::HttpLimits::default();
    tokio::spawn(tandem_httpd::serve(
        listener,
        app,
        limits,
        std::future::pending(),
    ));
    address
}

fn start_router(workers: &[SocketAddr], migration_limit: u32) -> RouterProcess {
    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tandem"));
    command.args(["route", "--port", &port.to_string(), "--threads", "1"]);
    command.args(["--migration-limit", &migration_limit.to_string()]);
    for worker in workers {
        command.args(["--worker", &format!("http://{worker}")]);
    }
    spawn("route", command, port)
}

/// The router's CPU seconds so far (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn chat_body() -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}],
           "max_tokens": TOKENS, "stream": true})
}

/// One streamed answer: its text, and the arrival time of each chunk with text.
async fn stream_once(client: &reqwest::Client, base: &str) -> (String, Vec<Instant>) {
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let (mut text, mut arrivals, mut pending) = (String::new(), Vec::new(), String::new());
    let mut bytes = response.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        pending.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let data = event.trim().trim_start_matches("data: ");
            if data == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(data).unwrap();
            assert!(chunk.get("error").is_none(), "{chunk}");
            if let Some(piece) = chunk["choices"][0]["delta"]["content"]
                .as_str()
                .filter(|piece| !piece.is_empty())
            {
                text.push_str(piece);
                arrivals.push(Instant::now());
            }
        }
    }
    (text, arrivals)
}

/// `total` streams over `concurrency` clients: chunks per second, router CPU
/// microseconds per chunk.
async fn relay_rate(router: &RouterProcess, concurrency: usize, total: usize) -> (f64, f64) {
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = cpu_seconds(router.child.id());
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, next, base) = (client.clone(), next.clone(), router.base.clone());
            tokio::spawn(async move {
                let mut chunks = 0;
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    chunks += stream_once(&client, &base).await.1.len();
                }
                chunks
            })
        })
        .collect();
    let mut chunks = 0;
    for task in tasks {
        chunks += task.await.unwrap();
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(router.child.id()) - cpu_before;
    (chunks as f64 / wall, cpu / chunks as f64 * 1e6)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let (streams, rounds) = if quick { (400, 2) } else { (2000, 3) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let healthy = start_worker(Behaviour {
            fail_after: None,
            step: None,
        })
        .await;
        let plain = start_router(&[healthy], 0);
        let ledger = start_router(&[healthy], 1);
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Rounds alternate between the two routers; the best of each is kept.
        let (mut best_plain, mut best_ledger) = ((0.0f64, f64::MAX), (0.0f64, f64::MAX));
        for _ in 0..rounds {
            let (rate, cpu) = relay_rate(&plain, 32, streams).await;
            best_plain = (best_plain.0.max(rate), best_plain.1.min(cpu));
            let (rate, cpu) = relay_rate(&ledger, 32, streams).await;
            best_ledger = (best_ledger.0.max(rate), best_ledger.1.min(cpu));
        }
        println!(
            "plain relay (--migration-limit 0): {:.0} chunks/s, {:.2} us router CPU per chunk",
            best_plain.0, best_plain.1
        );
        println!(
            "migratable relay (--migration-limit 1): {:.0} chunks/s, {:.2} us router CPU per chunk",
            best_ledger.0, best_ledger.1
        );
        println!(
            "migratable vs plain: throughput {:.2}x, CPU per chunk {:.2}x",
            best_ledger.0 / best_plain.0,
            best_ledger.1 / best_plain.1
        );
        drop((plain, ledger));
        let _ = healthy;

        // The seam: both workers take 2 ms per token, drop every chat stream after
        // 16 chunks, and serve the other's continuations.
        let dying = Behaviour {
            fail_after: Some(FAIL_AFTER),
            step: Some(STEP),
        };
        let workers = [start_worker(dying).await, start_worker(dying).await];
        let router = start_router(&workers, 1);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let client = reqwest::Client::new();
        let expected: String = (0..TOKENS).map(|i| format!(" t{i}")).collect();
        let mut gaps = Vec::new();
        let mut steady = Vec::new();
        for _ in 0..if quick { 50 } else { 200 } {
            let (text, arrivals) = stream_once(&client, &router.base).await;
            assert_eq!(text, expected, "the answer arrives whole, in order, once");
            let between: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
            if arrivals.len() == TOKENS {
                gaps.push(between[FAIL_AFTER - 1]);
                steady.extend(
                    between
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i != FAIL_AFTER - 1)
                        .map(|(_, gap)| *gap),
                );
            }
        }
        gaps.sort();
        steady.sort();
        let metrics = reqwest::get(format!("{}/metrics", router.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let resumed = metrics
            .lines()
            .find(|l| l.starts_with("tandem_router_migrations_total{outcome=\"resumed\"}"))
            .unwrap_or("none");
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let (seam, step) = (percentile(&gaps, 0.5), percentile(&steady, 0.5));
        println!(
            "seam ({} migrated streams): gap p50 {:.3} ms, p99 {:.3} ms; other chunk gaps p50 {:.3} ms; migration adds {:.3} ms (p50); {resumed}",
            gaps.len(),
            ms(seam),
            ms(percentile(&gaps, 0.99)),
            ms(step),
            ms(seam.saturating_sub(step)),
        );
    });
}
