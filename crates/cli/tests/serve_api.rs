//! `tandem serve` as clients meet it: the real binary on the default model, on a free
//! loopback port, spoken to over HTTP. Completions and chat, whole and streamed;
//! concurrent requests giving each one's lone result; prefix-cache reuse; metrics and
//! request ids; client disconnects freeing the engine; every kind of bad input
//! answered with its status and an OpenAI error body; a fuzz run of random and mutated
//! bodies; a clean exit on SIGTERM; and the official `openai` Python client (when
//! installed).

mod common;

use common::{
    Server, assert_error, default_model_present, metric_value, metric_with, sse_payloads,
};

use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

/// Context length the test servers run with: short, so that a fuzzed body that loses
/// its `max_tokens` still finishes quickly.
const MAX_MODEL_LEN: usize = 128;

/// The server most tests talk to.
fn start_server() -> Server {
    Server::start(&[
        "--threads",
        "2",
        "--served-model-name",
        "smol",
        "--max-model-len",
        &MAX_MODEL_LEN.to_string(),
        "--kv-cache-memory",
        "64MiB",
        "--shutdown-timeout",
        "20",
    ])
}

const PROMPT: &str = "The capital of France is";

#[tokio::test]
async fn completions_and_chat_whole_and_streamed() {
    if !default_model_present() {
        return;
    }
    let server = start_server();

    // Greedy completion: llama.cpp's continuation, usage counted.
    let body = json!({"model": "smol", "prompt": PROMPT, "max_tokens": 3, "temperature": 0});
    let (status, whole) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    assert!(whole["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(whole["model"], "smol");
    assert_eq!(whole["choices"][0]["text"], " Paris.\n");
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["usage"]["prompt_tokens"], 5);
    assert_eq!(whole["usage"]["completion_tokens"], 3);
    assert_eq!(whole["usage"]["total_tokens"], 8);

    // The same streamed: chunks concatenate to the same text, then the finish chunk,
    // the usage chunk and [DONE].
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = server.post_stream("/v1/completions", &streamed).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let (usage_chunk, text_chunks) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], whole["usage"]);
    let text: String = text_chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, " Paris.\n");
    assert_eq!(
        text_chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert!(
        text_chunks
            .iter()
            .all(|c| c["object"] == "text_completion" && c.get("usage").is_none())
    );

    // A stop string ends the text before it, with finish_reason "stop".
    let stop = json!({"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stop": ["."]});
    let (status, stopped) = server.post("/v1/completions", &stop).await;
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(stopped["choices"][0]["text"], " Paris");
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    assert_eq!(stopped["choices"][0]["stop_reason"], ".");

    // A list of prompts gets one choice each, in order; token-id prompts work.
    let (status, batch) = server
        .post(
            "/v1/completions",
            &json!({"prompt": [PROMPT, "Once upon a time"], "max_tokens": 2, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{batch}");
    assert_eq!(batch["choices"][0]["index"], 0);
    assert_eq!(batch["choices"][0]["text"], " Paris.");
    assert_eq!(batch["choices"][1]["index"], 1);
    assert_eq!(batch["usage"]["completion_tokens"], 4);

    // Chat, whole and streamed, through the model's template.
    let chat = json!({"messages": [{"role": "user", "content": "What is a REST API?"}],
                      "max_completion_tokens": 6, "temperature": 0});
    let (status, reply) = server.post("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "chat.completion");
    assert!(reply["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(reply["choices"][0]["message"]["role"], "assistant");
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.starts_with("A REST API (Simple"), "{content}");
    assert_eq!(reply["usage"]["completion_tokens"], 6);

    let mut chat_streamed = chat.clone();
    chat_streamed["stream"] = json!(true);
    let events = server
        .post_stream("/v1/chat/completions", &chat_streamed)
        .await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, content);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "no usage chunk unless asked"
    );
}

#[tokio::test]
async fn concurrent_requests_match_each_alone_and_share_prefixes() {
    if !default_model_present() {
        return;
    }
    let server = start_server();
    let prompts = [
        "What is a REST API?",
        "Explain database indexing.",
        "How does DNS work?",
        "What are microservices?",
        "Describe container orchestration.",
        "What is continuous integration?",
        "Explain message queues.",
        "How does caching improve performance?",
    ];
    let body = |prompt: &str| json!({"prompt": prompt, "max_tokens": 6, "temperature": 0});
    let mut alone = Vec::new();
    for prompt in prompts {
        let (status, answer) = server.post("/v1/completions", &body(prompt)).await;
        assert_eq!(status, 200, "{answer}");
        alone.push(answer["choices"][0]["text"].clone());
    }
    let together =
        futures_util::future::join_all(prompts.iter().chain(prompts.iter()).map(|prompt| {
            let request = body(prompt);
            let server = &server;
            async move { server.post("/v1/completions", &request).await }
        }))
        .await;
    for (i, (status, answer)) in together.iter().enumerate() {
        assert_eq!(*status, 200, "{answer}");
        assert_eq!(
            answer["choices"][0]["text"],
            alone[i % prompts.len()],
            "{}",
            prompts[i % prompts.len()]
        );
    }

    // A long prompt sent twice: the second finds its full blocks in the prefix cache.
    let shared = json!({"prompt": "The quick brown fox jumps over the lazy dog. ".repeat(6),
                        "max_tokens": 1});
    server.post("/v1/completions", &shared).await;
    let (status, again) = server.post("/v1/completions", &shared).await;
    assert_eq!(status, 200, "{again}");
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 32, "{again}");
    let hits = metric_value(&server.metrics().await, "vllm:prefix_cache_hits_total").unwrap();
    assert!(hits >= 32.0, "{hits}");
}

#[tokio::test]
async fn info_endpoints_and_request_ids() {
    if !default_model_present() {
        return;
    }
    let server = start_server();
    let client = &server.client;
    let health = client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    let models: Value = client
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "smol");
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["max_model_len"], MAX_MODEL_LEN);
    assert!(
        models["data"][0]["root"]
            .as_str()
            .unwrap()
            .ends_with(".gguf")
    );

    let response = client
        .post(server.url("/v1/completions"))
        .header("x-request-id", "abc-123")
        .json(&json!({"prompt": PROMPT, "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "abc-123");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["id"], "cmpl-abc-123");
    // Ended by a stop string, which only the HTTP layer sees.
    let (status, _) = server
        .post(
            "/v1/completions",
            &json!({"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stop": "."}),
        )
        .await;
    assert_eq!(status, 200);

    let metrics = client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let smol = ("model_name", "smol");
    let expected = [
        (
            "vllm:request_success_total",
            vec![smol, ("finished_reason", "length")],
            1.0,
        ),
        (
            "vllm:request_success_total",
            vec![smol, ("finished_reason", "stop")],
            1.0,
        ),
        ("vllm:prompt_tokens_total", vec![smol], 10.0),
        ("vllm:e2e_request_latency_seconds_count", vec![smol], 2.0),
    ];
    for (name, labels, value) in expected {
        let found = metric_with(&metrics, name, &labels);
        assert_eq!(found, Some(value), "{name} {labels:?} in\n{metrics}");
    }
    for name in [
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:generation_tokens_total",
    ] {
        assert!(
            metric_value(&metrics, name).is_some(),
            "missing {name} in\n{metrics}"
        );
    }
    // Tokens per engine step, vLLM's buckets: every step of both requests, never more
    // tokens than their prompts and outputs (a cached prefix computes fewer).
    let steps = metric_value(&metrics, "vllm:iteration_tokens_total_count").unwrap();
    let computed = metric_value(&metrics, "vllm:iteration_tokens_total_sum").unwrap();
    let generated = metric_value(&metrics, "vllm:generation_tokens_total").unwrap();
    assert!(steps >= 2.0, "{metrics}");
    assert!(
        computed >= steps && computed <= 10.0 + generated,
        "{metrics}"
    );
    let bucket = [smol, ("le", "2048")];
    assert_eq!(
        metric_with(&metrics, "vllm:iteration_tokens_total_bucket", &bucket),
        Some(steps)
    );
    // Where the steps' time went: each step once per part, under its kind; the two
    // requests came one after the other, so each prompt had a step of its own.
    let count = |kind: &str, part: &str| {
        let labels = [smol, ("kind", kind), ("part", part)];
        metric_with(&metrics, "tandem:engine_step_seconds_count", &labels).unwrap_or(0.0)
    };
    for part in ["forward", "sample"] {
        assert_eq!(count("prefill", part), 2.0, "{part} in\n{metrics}");
        assert_eq!(count("mixed", part), 0.0, "{part} in\n{metrics}");
        assert_eq!(
            count("prefill", part) + count("decode", part),
            steps,
            "{part} in\n{metrics}"
        );
    }
}

#[tokio::test]
async fn bad_input_gets_openai_errors_with_the_right_status() {
    if !default_model_present() {
        return;
    }
    let server = start_server();
    let long_prompt = "hello ".repeat(MAX_MODEL_LEN + 10);
    let completions: Vec<(&str, String, u16)> = vec![
        ("malformed JSON", r#"{"prompt": "x""#.into(), 400),
        ("not an object", "[1, 2]".into(), 400),
        ("empty body", String::new(), 400),
        (
            "wrong type",
            r#"{"prompt": "x", "max_tokens": "5"}"#.into(),
            400,
        ),
        (
            "prompt of wrong type",
            r#"{"prompt": {"a": 1}}"#.into(),
            400,
        ),
        ("no prompt", r#"{"max_tokens": 5}"#.into(), 400),
        ("empty prompt", r#"{"prompt": ""}"#.into(), 400),
        ("empty prompt list", r#"{"prompt": []}"#.into(), 400),
        (
            "max_tokens 0",
            r#"{"prompt": "x", "max_tokens": 0}"#.into(),
            400,
        ),
        (
            "max_tokens negative",
            r#"{"prompt": "x", "max_tokens": -3}"#.into(),
            400,
        ),
        (
            "max_tokens past the context",
            r#"{"prompt": "x", "max_tokens": 100000}"#.into(),
            400,
        ),
        (
            "huge max_tokens",
            r#"{"prompt": "x", "max_tokens": 1e300}"#.into(),
            400,
        ),
        (
            "negative temperature",
            r#"{"prompt": "x", "temperature": -1}"#.into(),
            400,
        ),
        ("top_p 0", r#"{"prompt": "x", "top_p": 0}"#.into(), 400),
        (
            "top_p above 1",
            r#"{"prompt": "x", "top_p": 1.01}"#.into(),
            400,
        ),
        (
            "top_k below -1",
            r#"{"prompt": "x", "top_k": -2}"#.into(),
            400,
        ),
        ("n 65", r#"{"prompt": "x", "n": 65}"#.into(), 400),
        ("n 0", r#"{"prompt": "x", "n": 0}"#.into(), 400),
        (
            "stream_options without stream",
            r#"{"prompt": "x", "stream_options": {"include_usage": true}}"#.into(),
            400,
        ),
        (
            "kv_transfer_params of the wrong type",
            r#"{"prompt": "x", "kv_transfer_params": {"remote_port": "5600"}}"#.into(),
            400,
        ),
        (
            "both hand-off roles",
            r#"{"prompt": "x", "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": true}}"#.into(),
            400,
        ),
        (
            "too many stop strings",
            json!({"prompt": "x", "stop": vec!["s"; 1000]}).to_string(),
            400,
        ),
        (
            "penalty out of range",
            r#"{"prompt": "x", "presence_penalty": 3}"#.into(),
            400,
        ),
        ("logprobs 21", r#"{"prompt": "x", "logprobs": 21}"#.into(), 400),
        (
            "token id out of vocabulary",
            r#"{"prompt": [1, 4000000]}"#.into(),
            400,
        ),
        ("negative token id", r#"{"prompt": [1, -1]}"#.into(), 400),
        (
            "stop token out of vocabulary",
            r#"{"prompt": "x", "stop_token_ids": [4000000]}"#.into(),
            400,
        ),
        (
            "deep nesting",
            format!(r#"{{"prompt": {}1{}}}"#, "[".repeat(5000), "]".repeat(5000)),
            400,
        ),
        (
            "prompt longer than the context",
            json!({"prompt": long_prompt}).to_string(),
            400,
        ),
        (
            "unknown model",
            r#"{"prompt": "x", "model": "gpt-4"}"#.into(),
            404,
        ),
    ];
    for (case, body, expected) in completions {
        let (status, answer) = server.post_raw("/v1/completions", body).await;
        assert_error(status, &answer, expected);
        eprintln!("{case}: {}", answer["error"]["message"]);
    }
    let (status, answer) = server
        .post(
            "/v1/completions",
            &json!({"prompt": long_prompt, "max_tokens": 1}),
        )
        .await;
    assert_error(status, &answer, 400);
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("maximum context length is {MAX_MODEL_LEN} tokens")),
        "{message}"
    );

    let user = |content: &str| json!([{"role": "user", "content": content}]);
    let chats: Vec<(&str, Value, u16)> = vec![
        ("empty messages", json!({"messages": []}), 400),
        ("no messages", json!({"prompt": "x"}), 400),
        (
            "unknown role",
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            400,
        ),
        (
            "content of wrong type",
            json!({"messages": [{"role": "user", "content": 5}]}),
            400,
        ),
        (
            "image part",
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            400,
        ),
        (
            "max_completion_tokens 0",
            json!({"messages": user("x"), "max_completion_tokens": 0}),
            400,
        ),
        (
            "messages past the context",
            json!({"messages": user(&long_prompt)}),
            400,
        ),
        (
            "unknown model",
            json!({"messages": user("x"), "model": "nope"}),
            404,
        ),
    ];
    for (case, body, expected) in chats {
        let (status, answer) = server.post("/v1/chat/completions", &body).await;
        assert_error(status, &answer, expected);
        eprintln!("{case}: {}", answer["error"]["message"]);
    }

    let (status, answer) = server.post_raw("/v1/nothing", "{}".into()).await;
    assert_error(status, &answer, 404);
    let response = server
        .client
        .get(server.url("/v1/completions"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    assert_error(status, &response.json().await.unwrap(), 405);

    assert_oversized_body_is_413(&server).await;

    // Still serving after all of that.
    let (status, _) = server
        .post(
            "/v1/completions",
            &json!({"prompt": PROMPT, "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn client_disconnects_abort_requests_and_free_their_blocks() {
    if !default_model_present() {
        return;
    }
    // Room for an answer long enough that no CPU finishes it within the whole request's
    // 300 ms below (the default model decodes ~450 tokens a second on 2 cores of a Zen 5).
    let server = Server::start(&["--threads", "1", "--max-model-len", "2048"]);
    let idle = metric_value(&server.metrics().await, "vllm:kv_cache_usage_perc").unwrap_or(0.0);
    let long = json!({"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": true,
                      "temperature": 0, "stream": true});

    // Streaming: read the first event, then hang up.
    let response = server
        .client
        .post(server.url("/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut events = response.bytes_stream();
    events.next().await.unwrap().unwrap();
    drop(events);
    server.wait_until_idle(idle).await;

    // Whole: give up before the answer.
    let mut whole = long.clone();
    whole["stream"] = json!(false);
    let gave_up = server
        .client
        .post(server.url("/v1/completions"))
        .json(&whole)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gave_up.is_err(), "1,000 tokens take longer than 300 ms");
    server.wait_until_idle(idle).await;

    let metrics = server.metrics().await;
    let aborted = metric_with(
        &metrics,
        "vllm:request_success_total",
        &[("finished_reason", "abort")],
    );
    assert_eq!(aborted, Some(2.0), "{metrics}");
    let generated = metric_value(&metrics, "vllm:generation_tokens_total").unwrap();
    assert!(
        generated < 1000.0,
        "both requests stopped early: {generated} tokens"
    );
}

/// vLLM sends a chat stream's role chunk with the first output, after the prefill, so
/// that a client timing the first chunk (as `vllm bench serve` does) times the first
/// token. The server's own TTFT (arrival to first token) cannot exceed the client's
/// time to the first chunk unless that chunk went out before the first token.
#[tokio::test]
async fn a_chat_stream_starts_when_the_first_token_is_ready() {
    if !default_model_present() {
        return;
    }
    let server = Server::start(&["--threads", "1", "--max-model-len", "2048"]);
    let body = json!({"messages": [{"role": "user", "content": "word ".repeat(1000)}],
                      "max_completion_tokens": 2, "stream": true});
    let sent = std::time::Instant::now();
    let response = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut events = response.bytes_stream();
    let first = events.next().await.unwrap().unwrap();
    let first_chunk_after = sent.elapsed().as_secs_f64();
    assert!(
        String::from_utf8_lossy(&first).contains(r#""role":"assistant""#),
        "{first:?}"
    );
    while events.next().await.is_some() {}
    let metrics = server.metrics().await;
    let ttft = metric_value(&metrics, "vllm:time_to_first_token_seconds_sum").unwrap();
    assert!(
        first_chunk_after >= ttft,
        "the role chunk came {first_chunk_after:.3} s after sending, the first token \
         {ttft:.3} s after arrival"
    );
}

/// A body over the limit gets 413, answered from `Content-Length` before the body is
/// read; the server then reads and drops the rest before closing, so the answer
/// reaches a client that is still uploading instead of a connection reset.
async fn assert_oversized_body_is_413(server: &Server) {
    let oversized = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(9 << 20));
    for _ in 0..5 {
        let (status, answer) = server.post_raw("/v1/completions", oversized.clone()).await;
        assert_error(status, &answer, 413);
    }
}

/// A small deterministic generator (Knuth's MMIX LCG), so failures reproduce.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const VALID_BODIES: &[(&str, &str)] = &[
    (
        "/v1/completions",
        r#"{"model": "smol", "prompt": "Hi there", "max_tokens": 2, "temperature": 0}"#,
    ),
    (
        "/v1/completions",
        r#"{"prompt": [1, 2, 3], "max_tokens": 1, "stop": ["a", "b"], "top_p": 0.5, "top_k": 3, "seed": 9}"#,
    ),
    (
        "/v1/completions",
        r#"{"prompt": ["a", "b"], "max_tokens": 1, "stream": true, "stream_options": {"include_usage": true}}"#,
    ),
    (
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0.5}"#,
    ),
    (
        "/v1/chat/completions",
        r#"{"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_completion_tokens": 1, "stream": true}"#,
    ),
];

/// Replacement values of the wrong type or out of range.
const ODD_VALUES: &[&str] = &[
    "null",
    "true",
    "-1",
    "0",
    "1e309",
    "99999999999999999999999",
    "-99999999999999999999",
    "\"\"",
    "\"x\"",
    "[]",
    "{}",
    "[[[[[[]]]]]]",
    "1.5",
    "\"\\ud800\"",
    "NaN",
];

fn mutate(rng: &mut Lcg, body: &str) -> String {
    let mut bytes = body.as_bytes().to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(bytes.len());
        match rng.below(8) {
            0 => {
                bytes.remove(at.min(bytes.len().saturating_sub(1)));
            }
            1 => {
                let byte = bytes[at.min(bytes.len() - 1)];
                bytes.insert(at, byte);
            }
            2 => {
                let last = bytes.len() - 1;
                bytes[at.min(last)] = *rng.pick(b"{}[]\":,0-9ae \\\x00\xff");
            }
            3 => bytes.truncate(at),
            4 => {
                // Replace the value after some ':' with an odd one.
                if let Some(colon) = bytes[at..].iter().position(|&b| b == b':') {
                    let start = at + colon + 1;
                    let end = bytes[start..]
                        .iter()
                        .position(|&b| b == b',' || b == b'}')
                        .map_or(bytes.len(), |p| start + p);
                    bytes.splice(start..end, rng.pick(ODD_VALUES).bytes());
                }
            }
            5 => {
                let depth = 1 + rng.below(3000);
                let nested = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
                bytes.splice(at..at, nested.bytes());
            }
            6 => bytes.insert(at, rng.next() as u8),
            _ => {
                let key = rng.pick(&[
                    "\"max_tokens\"",
                    "\"n\"",
                    "\"temperature\"",
                    "\"top_p\"",
                    "\"messages\"",
                    "\"prompt\"",
                ]);
                bytes.splice(at..at, format!("{key}: {},", rng.pick(ODD_VALUES)).bytes());
            }
        }
        if bytes.is_empty() {
            break;
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn random_body(rng: &mut Lcg) -> String {
    let len = rng.below(200);
    (0..len)
        .map(|_| *rng.pick(b"{}[]\":,0123456789abcdeflnrstu .-\\"))
        .map(char::from)
        .collect()
}

#[tokio::test]
async fn fuzzed_bodies_get_well_formed_answers_and_the_server_stays_up() {
    if !default_model_present() {
        return;
    }
    let server = start_server();
    let mut rng = Lcg(0x07a4_de11);
    let cases: Vec<(&str, String)> = (0..1200)
        .map(|i| {
            let (path, valid) = *rng.pick(VALID_BODIES);
            let body = match i % 10 {
                0 => random_body(&mut rng),
                1 => valid.to_owned(),
                _ => mutate(&mut rng, valid),
            };
            (path, body)
        })
        .collect();
    let answers = futures_util::stream::iter(cases.into_iter().map(|(path, body)| {
        let server = &server;
        async move {
            let response = server
                .client
                .post(server.url(path))
                .header("content-type", "application/json")
                .body(body.clone())
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .unwrap_or_else(|e| panic!("no answer to {body:?}: {e}"));
            let status = response.status().as_u16();
            let streamed = response
                .headers()
                .get("content-type")
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            let text = response.text().await.expect("a whole body");
            (body, status, streamed, text)
        }
    }))
    .buffer_unordered(8)
    .collect::<Vec<_>>()
    .await;
    let mut ok = 0;
    for (body, status, streamed, text) in answers {
        match status {
            200 if streamed => {
                assert!(text.ends_with("data: [DONE]\n\n"), "{body:?} -> {text}");
                ok += 1;
            }
            200 => {
                let json: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{body:?} -> {text}: {e}"));
                assert!(json["choices"].is_array(), "{body:?} -> {text}");
                ok += 1;
            }
            400..=499 => {
                let json: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{body:?} -> {text}: {e}"));
                assert_error(status, &json, status);
            }
            _ => panic!("{body:?} -> {status} {text}"),
        }
    }
    eprintln!("{ok} of 1200 fuzzed bodies were served");
    assert!(ok >= 120, "the valid bodies at least are served");
    let health = server
        .client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn sigterm_lets_requests_in_flight_finish_and_exits_zero() {
    if !default_model_present() {
        return;
    }
    let mut server = start_server();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0,
                      "ignore_eos": true, "stream": true});
    let response = server
        .client
        .post(server.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let status = Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let text = response.text().await.expect("the stream finishes");
    let events = sse_payloads(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(
        events.len(),
        24 + 2,
        "every token, the finish chunk and [DONE]"
    );
    let exit = server.child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// The official `openai` Python client against the server: completions and chat,
/// whole and streamed, and the errors it raises; its argument is the API's base URL.
const OPENAI_CLIENT_SCRIPT: &str = r#"
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key="unused")
assert [m.id for m in c.models.list().data] == ["smol"]
prompt = "The capital of France is"
r = c.completions.create(model="smol", prompt=prompt, max_tokens=3, temperature=0)
assert r.choices[0].text == " Paris.\n" and r.usage.total_tokens == 8, r
s = c.completions.create(model="smol", prompt=prompt, max_tokens=3, temperature=0,
                         stream=True, stream_options={"include_usage": True})
chunks = list(s)
assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == " Paris.\n", chunks
assert chunks[-1].usage.completion_tokens == 3, chunks[-1]
messages = [{"role": "user", "content": "What is a REST API?"}]
r = c.chat.completions.create(model="smol", messages=messages, max_completion_tokens=6, temperature=0)
text = r.choices[0].message.content
assert text.startswith("A REST API (Simple"), text
s = c.chat.completions.create(model="smol", messages=messages, max_tokens=6, temperature=0, stream=True)
assert "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices) == text
try:
    c.completions.create(model="nope", prompt="x")
    raise AssertionError("unknown model accepted")
except openai.NotFoundError:
    pass
try:
    c.completions.create(model="smol", prompt="x", temperature=-1)
    raise AssertionError("negative temperature accepted")
except openai.BadRequestError:
    pass
print("ok")
"#;

#[tokio::test]
async fn the_official_openai_python_client_works() {
    if !default_model_present() {
        return;
    }
    let has_client = Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !has_client {
        // CI installs it (.ci/run) and sets this, so there a missing client fails.
        assert!(
            std::env::var("TANDEM_REQUIRE_OPENAI_CLIENT").as_deref() != Ok("1"),
            "the `openai` Python package is required but not installed"
        );
        eprintln!("skipping: the `openai` Python package is not installed");
        return;
    }
    let server = start_server();
    let base = server.url("/v1");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-c", OPENAI_CLIENT_SCRIPT, &base])
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn a_client_stop_token_is_reported_as_the_stop_reason() {
    if !default_model_present() {
        return;
    }
    let server = start_server();
    // llama.cpp's greedy continuation of this prompt starts with " Paris" (id 7042).
    let body = json!({"prompt": PROMPT, "max_tokens": 5, "temperature": 0,
        "stop_token_ids": [7042]});
    let (status, answer) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "stop", "{answer}");
    assert_eq!(choice["stop_reason"], 7042, "{answer}");
    assert_eq!(choice["text"], "", "the stop token is not output");
    // A stop string is reported as the string.
    let body = json!({"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stop": ["Par"]});
    let (_, answer) = server.post("/v1/completions", &body).await;
    assert_eq!(answer["choices"][0]["stop_reason"], "Par", "{answer}");
}
