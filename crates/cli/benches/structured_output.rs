//! What structured output costs: decode throughput of 8 concurrent streams whose
//! output follows a JSON schema, against 8 free streams of the same prompt and length,
//! on one real `tandem serve`, in the same run (the issue-19 target: ≥ 0.8×). One
//! stream of each is measured too, where the grammar's mask is not hidden by batching.
//!
//! Throughput counts tokens after each stream's first (so prefill is left out): the
//! streams' tokens over the time from the first stream's first token to the last
//! stream's last token.
//!
//! `cargo bench -p tandem-cli --bench structured_output` (needs the default model;
//! `TANDEM_BENCH_THREADS`, default 2).

mod common;

use std::time::Instant;

use futures_util::StreamExt;
use serde_json::{Value, json};

use common::WorkerProcess;

const TRIALS: usize = 3;
const OUTPUT_TOKENS: u64 = 128;

/// A schema whose output is long: more records than 128 tokens hold.
fn records_schema() -> Value {
    json!({
        "type": "object",
        "properties": {"people": {"type": "array", "minItems": 40, "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 16},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "city": {"type": "string", "maxLength": 16}
            },
            "required": ["name", "age", "city"],
            "additionalProperties": false
        }}},
        "required": ["people"],
        "additionalProperties": false
    })
}

fn body(constrained: bool, seed: u64) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": "List forty people with their name, age and city as JSON."}],
        "max_tokens": OUTPUT_TOKENS,
        "ignore_eos": true,
        "temperature": 0.7,
        "seed": seed,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if constrained {
        body["response_format"] = json!({"type": "json_schema",
            "json_schema": {"name": "people", "schema": records_schema()}});
    }
    body
}

/// One stream: when its first and last tokens came, and how many tokens it had.
async fn stream(
    client: &reqwest::Client,
    worker: &WorkerProcess,
    body: Value,
) -> (Instant, Instant, u64) {
    let response = client
        .post(worker.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("the worker answers");
    assert_eq!(response.status(), 200);
    let mut events = response.bytes_stream();
    let (mut first, mut last, mut tokens) = (None, Instant::now(), 0);
    let mut buffered = String::new();
    while let Some(chunk) = events.next().await {
        buffered.push_str(&String::from_utf8_lossy(&chunk.expect("the stream reads")));
        while let Some(end) = buffered.find("\n\n") {
            let event: String = buffered.drain(..end + 2).collect();
            let Some(payload) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            let Ok(chunk) = serde_json::from_str::<Value>(payload) else {
                continue;
            };
            if chunk["choices"][0]["delta"]["content"].is_string() {
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
            }
            if let Some(count) = chunk["usage"]["completion_tokens"].as_u64() {
                tokens = count;
            }
        }
    }
    (first.expect("some output"), last, tokens)
}

/// Decode tokens per second of `streams` concurrent streams.
async fn decode_rate(
    client: &reqwest::Client,
    worker: &WorkerProcess,
    streams: usize,
    constrained: bool,
) -> f64 {
    let runs = (0..streams).map(|i| stream(client, worker, body(constrained, i as u64)));
    let results = futures_util::future::join_all(runs).await;
    let start = results.iter().map(|r| r.0).min().unwrap();
    let end = results.iter().map(|r| r.1).max().unwrap();
    let tokens: u64 = results.iter().map(|r| r.2.saturating_sub(1)).sum();
    for (_, _, count) in &results {
        assert_eq!(*count, OUTPUT_TOKENS, "every stream runs to max_tokens");
    }
    tokens as f64 / (end - start).as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let threads = std::env::var("TANDEM_BENCH_THREADS").unwrap_or_else(|_| "2".into());
    let worker = WorkerProcess::start(&["--threads", &threads, "--max-model-len", "2048"], &[]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::new();
    runtime.block_on(async {
        // Warm up, and build the vocabulary index the first constrained request pays for.
        decode_rate(&client, &worker, 1, true).await;
        println!("structured output cost, {threads} engine threads, {OUTPUT_TOKENS} tokens per stream, median of {TRIALS}");
        for streams in [1, 8] {
            let (mut free, mut constrained) = (Vec::new(), Vec::new());
            for _ in 0..TRIALS {
                free.push(decode_rate(&client, &worker, streams, false).await);
                constrained.push(decode_rate(&client, &worker, streams, true).await);
            }
            let (free, constrained) = (median(free), median(constrained));
            println!(
                "{streams} stream(s): free {free:.1} tok/s, JSON schema {constrained:.1} tok/s: {:.2}x",
                constrained / free
            );
        }
    });
}
