//! `tandem route --policy kv_aware` over real `tandem serve` workers that publish
//! their KV events: the router follows each worker's stream, and a prompt that extends
//! one already served goes to the worker holding its prefix, as the worker's own
//! answer shows (`usage.prompt_tokens_details.cached_tokens`, counted by the engine,
//! not by the router). With round robin the repeats would land on the other workers
//! and find nothing cached, so the checks below fail without the routing.

mod common;

use std::time::Duration;

use common::{Server, default_model_present, free_port, metric_value, metric_with};
use serde_json::{Value, json};

const TOPIC: &str = "kv";
const BLOCK: u64 = 16;

/// A worker publishing its KV events on loopback.
struct Worker {
    server: Server,
    events: String,
    replay: String,
}

impl Worker {
    fn start() -> Self {
        let (events_port, replay_port) = (free_port(), free_port());
        let events = format!("tcp://127.0.0.1:{events_port}");
        let replay = format!("tcp://127.0.0.1:{replay_port}");
        let config = json!({"enable_kv_cache_events": true, "publisher": "zmq",
            "endpoint": format!("tcp://*:{events_port}"), "replay_endpoint": replay,
            "topic": TOPIC})
        .to_string();
        let server = Server::start(&["--threads", "1", "--kv-events-config", &config]);
        Self {
            server,
            events,
            replay,
        }
    }

    fn url(&self) -> String {
        self.server.url("")
    }
}

/// A `kv_aware` router over `workers`, once it follows every worker's stream (before
/// that it routes without predictions, as with a worker whose cache is unknown).
async fn kv_aware_router(workers: &[Worker]) -> Server {
    let mut args: Vec<String> = ["--policy", "kv_aware", "--kv-events-topic", TOPIC]
        .map(String::from)
        .to_vec();
    for worker in workers {
        let url = worker.url();
        args.extend(["--worker".into(), url.clone()]);
        args.extend(["--kv-events".into(), format!("{url}={}", worker.events)]);
        args.extend(["--kv-replay".into(), format!("{url}={}", worker.replay)]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let router = Server::start_router(&args);
    for _ in 0..400 {
        let metrics = router.metrics().await;
        if metric_value(&metrics, "tandem_router_kv_unknown_workers") == Some(0.0) {
            return router;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the router never followed every worker's stream");
}

/// A prompt of some 200 tokens about `topic`, then `question`.
fn prompt(topic: &str, question: usize) -> String {
    let facts: String = (0..12)
        .map(|i| {
            format!(
                "The {topic} record number {i} holds the value {}. ",
                i * 7 + 3
            )
        })
        .collect();
    format!("{facts}Question {question}: what does record {question} hold?")
}

async fn complete(router: &Server, prompt: &str) -> Value {
    let body = json!({"prompt": prompt, "max_tokens": 2, "temperature": 0});
    let (status, answer) = router.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

fn cached_tokens(answer: &Value) -> u64 {
    answer["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("the worker reports cached tokens")
}

fn prompt_tokens(answer: &Value) -> u64 {
    answer["usage"]["prompt_tokens"].as_u64().unwrap()
}

/// Waits until the router has indexed at least `blocks` blocks over all workers.
async fn wait_for_index(router: &Server, workers: &[Worker], blocks: f64) {
    for _ in 0..200 {
        let metrics = router.metrics().await;
        let indexed: f64 = workers
            .iter()
            .filter_map(|w| {
                let url = w.url();
                metric_with(
                    &metrics,
                    "tandem_router_kv_index_blocks",
                    &[("worker", &url)],
                )
            })
            .sum();
        if indexed >= blocks {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the router never indexed {blocks} blocks:\n{}",
        router.metrics().await
    );
}

fn worker_requests(metrics: &str, worker: &Worker) -> f64 {
    let url = worker.url();
    let labels = [
        ("worker", url.as_str()),
        ("leg", "whole"),
        ("outcome", "ok"),
    ];
    metric_with(metrics, "tandem_router_worker_requests_total", &labels).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_that_extend_a_served_prefix_go_to_the_worker_holding_it() {
    if !default_model_present() {
        return;
    }
    let workers = [Worker::start(), Worker::start(), Worker::start()];
    let router = kv_aware_router(&workers).await;
    let topics = ["harbour", "orchard", "glacier"];

    // Three unrelated prompts: nothing is cached anywhere, so they spread.
    let mut first_blocks = 0;
    for topic in topics {
        let answer = complete(&router, &prompt(topic, 0)).await;
        assert_eq!(cached_tokens(&answer), 0, "{answer}");
        first_blocks += prompt_tokens(&answer) / BLOCK;
    }
    let metrics = router.metrics().await;
    for worker in &workers {
        assert_eq!(worker_requests(&metrics, worker), 1.0, "{metrics}");
    }
    wait_for_index(&router, &workers, first_blocks as f64).await;

    // Each follow-up shares all but its question with one earlier prompt: it finds
    // that prompt's full blocks cached, so it went to that prompt's worker.
    for round in 1..=2 {
        for topic in topics {
            let answer = complete(&router, &prompt(topic, round)).await;
            let (cached, total) = (cached_tokens(&answer), prompt_tokens(&answer));
            assert!(
                cached >= total - 2 * BLOCK && cached > 0,
                "{topic} round {round}: {cached} of {total} cached: {answer}"
            );
        }
    }

    // The router predicted what the workers found, request by request.
    let metrics = router.metrics().await;
    let predicted = metric_value(&metrics, "tandem_router_kv_predicted_cached_tokens_total");
    let actual = metric_value(&metrics, "tandem_router_kv_actual_cached_tokens_total");
    assert!(actual.unwrap_or(0.0) > 0.0, "{metrics}");
    assert_eq!(predicted, actual, "{metrics}");
    let exact = metric_with(
        &metrics,
        "tandem_router_kv_predictions_total",
        &[("outcome", "exact")],
    );
    assert_eq!(exact, Some(9.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_follow_up_is_routed_and_checked_like_a_whole_answer() {
    if !default_model_present() {
        return;
    }
    let workers = [Worker::start(), Worker::start()];
    let router = kv_aware_router(&workers).await;
    let first = complete(&router, &prompt("lighthouse", 0)).await;
    wait_for_index(&router, &workers, (prompt_tokens(&first) / BLOCK) as f64).await;

    let body = json!({"prompt": prompt("lighthouse", 1), "max_tokens": 2, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true}});
    let payloads = router.post_stream("/v1/completions", &body).await;
    let usage = payloads
        .iter()
        .filter_map(|p| serde_json::from_str::<Value>(p).ok())
        .find(|chunk| chunk["usage"].is_object())
        .expect("a usage chunk");
    let (cached, total) = (cached_tokens(&usage), prompt_tokens(&usage));
    assert!(cached >= total - 2 * BLOCK && cached > 0, "{usage}");

    let metrics = router.metrics().await;
    let (a, b) = (
        worker_requests(&metrics, &workers[0]),
        worker_requests(&metrics, &workers[1]),
    );
    assert_eq!((a + b, a.max(b)), (2.0, 2.0), "{metrics}");
    let exact = metric_with(
        &metrics,
        "tandem_router_kv_predictions_total",
        &[("outcome", "exact")],
    );
    assert_eq!(exact, Some(2.0), "{metrics}");
}
