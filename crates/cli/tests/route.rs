//! `tandem route` in front of real `tandem serve` workers on loopback: replicated and
//! 2P2D disaggregated serving give a single worker's greedy output, whole and streamed,
//! on both endpoints; a killed worker is taken out while requests keep succeeding;
//! `/health` follows the P/D readiness rule; a prefill worker's error reaches the
//! client as the worker said it; a client that leaves cancels the upstream request; the
//! admin API and client API keys guard what they should; `--federate-worker-metrics`
//! puts each worker's own series on the router's `/metrics`, labelled, and says
//! whose did not come back.

mod common;

use std::time::Duration;

use common::{Server, default_model_present, metric_value, metric_with, streamed_text, text_of};
use futures_util::StreamExt;
use serde_json::{Value, json};

fn worker(extra: &[&str]) -> Server {
    let mut args = vec!["--threads", "1", "--kv-cache-memory", "128MiB"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// A worker that can also be a prefill leg.
fn pd_worker() -> Server {
    worker(&["--kv-port", "0"])
}

/// A router over `workers` (`--worker`, `--prefill`, `--decode` pairs), ready to serve,
/// checking health every 200 ms.
async fn router(workers: &[(&str, &Server)], extra: &[&str]) -> Server {
    router_checking_every(200, workers, extra).await
}

async fn router_checking_every(
    interval_ms: u64,
    workers: &[(&str, &Server)],
    extra: &[&str],
) -> Server {
    let mut args: Vec<String> = vec!["--health-interval-ms".into(), interval_ms.to_string()];
    for (flag, server) in workers {
        args.push(format!("--{flag}"));
        args.push(server.url(""));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let router = Server::start_router(&args);
    router.wait_for_health(200).await;
    router
}

/// Greedy requests on both endpoints, whole and streamed.
fn greedy_requests() -> Vec<(&'static str, Value)> {
    let mut requests = Vec::new();
    for prompt in [
        "Explain how HTTP load balancers work in 3 sentences.",
        "The capital of France is",
        "A long prompt shares nothing with the others, which makes its KV travel in full, \
         block after block, from the prefill worker to the decode worker.",
    ] {
        requests.push((
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 16, "temperature": 0}),
        ));
        requests.push((
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
                "temperature": 0}),
        ));
    }
    requests
}

async fn answer_text(server: &Server, path: &str, body: &Value, stream: bool) -> String {
    if stream {
        let mut body = body.clone();
        body["stream"] = json!(true);
        return streamed_text(&server.post_stream(path, &body).await);
    }
    let (status, answer) = server.post(path, body).await;
    assert_eq!(status, 200, "{answer}");
    text_of(&answer)
}

#[tokio::test]
async fn replicated_and_disaggregated_serving_give_a_single_workers_output() {
    if !default_model_present() {
        return;
    }
    let (a, b, c, d) = (pd_worker(), pd_worker(), worker(&[]), worker(&[]));
    let pd = router(
        &[
            ("prefill", &a),
            ("prefill", &b),
            ("decode", &c),
            ("decode", &d),
        ],
        &[],
    )
    .await;
    let replicated = router(&[("worker", &c), ("worker", &d)], &[]).await;
    for (path, body) in greedy_requests() {
        let alone = answer_text(&a, path, &body, false).await;
        for stream in [false, true] {
            let through_pd = answer_text(&pd, path, &body, stream).await;
            assert_eq!(through_pd, alone, "P/D, {path}, stream {stream}");
            let through_replicas = answer_text(&replicated, path, &body, stream).await;
            assert_eq!(
                through_replicas, alone,
                "replicated, {path}, stream {stream}"
            );
        }
    }
    // The P/D router really handed off (both decode workers pulled KV) and never
    // fell back to a plain decode.
    for decode in [&c, &d] {
        let metrics = decode.metrics().await;
        let pulled = metric_with(
            &metrics,
            "tandem:kv_transfer_blocks_total",
            &[("direction", "received")],
        );
        assert!(pulled.unwrap_or(0.0) > 0.0, "{metrics}");
    }
    let metrics = pd.metrics().await;
    // Counted from the start, at 0 (so dashboards read 0, not "no data").
    assert_eq!(
        metric_value(&metrics, "tandem_router_pd_fallbacks_total"),
        Some(0.0)
    );
    let ok = metric_with(
        &metrics,
        "tandem_router_requests_total",
        &[("mode", "disaggregated"), ("outcome", "2xx")],
    );
    assert!(ok.unwrap_or(0.0) >= 6.0, "{metrics}");
}

#[tokio::test]
async fn a_killed_worker_is_taken_out_and_requests_keep_succeeding() {
    if !default_model_present() {
        return;
    }
    let (a, b) = (worker(&[]), worker(&[]));
    let replicated = router(&[("worker", &a), ("worker", &b)], &[]).await;
    // Checks health once at start only: the dead worker stays in selection, and its
    // share of the requests must be retried on the other.
    let unchecked = router_checking_every(3_600_000, &[("worker", &a), ("worker", &b)], &[]).await;
    let body = json!({"prompt": "Hello", "max_tokens": 4});
    drop(b);
    for _ in 0..6 {
        let (status, answer) = unchecked.post("/v1/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
    }
    let metrics = unchecked.metrics().await;
    let retries = metric_with(&metrics, "tandem_router_retries_total", &[("leg", "whole")]);
    assert!(retries.unwrap_or(0.0) >= 3.0, "{metrics}");
    // Health checks take the dead worker out; the router stays ready with one.
    let mut out = false;
    for _ in 0..50 {
        let metrics = replicated.metrics().await;
        let healthy = metric_with(&metrics, "tandem_router_worker_healthy", &[]);
        let dead_down = metrics
            .lines()
            .any(|l| l.starts_with("tandem_router_worker_healthy") && l.ends_with(" 0"));
        if healthy.is_some() && dead_down {
            out = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(out, "the dead worker was never marked unhealthy");
    assert_eq!(replicated.health_status().await, 200);
}

#[tokio::test]
async fn federated_metrics_carry_each_workers_series_labelled_by_worker() {
    if !default_model_present() {
        return;
    }
    let (prefill, decode) = (pd_worker(), worker(&[]));
    let pd = router(
        &[("prefill", &prefill), ("decode", &decode)],
        &["--federate-worker-metrics"],
    )
    .await;
    let (status, answer) = pd
        .post(
            "/v1/completions",
            &json!({"prompt": "Hello", "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let metrics = pd.metrics().await;
    for server in [&prefill, &decode] {
        let url = server.url("");
        let url = url.trim_end_matches('/');
        let labelled = |name: &str| metric_with(&metrics, name, &[("worker", url)]);
        assert_eq!(
            labelled("tandem_router_federated_up"),
            Some(1.0),
            "{metrics}"
        );
        assert!(labelled("vllm:num_requests_running").is_some(), "{metrics}");
        // Each worker's own count: its leg of the one request.
        assert!(
            labelled("vllm:request_success_total").is_some_and(|n| n >= 1.0),
            "{metrics}"
        );
    }
    // The router's own series are there once; each family is declared once.
    assert!(metric_value(&metrics, "tandem_router_requests_total").is_some());
    let mut declared = std::collections::HashSet::new();
    for line in metrics.lines().filter(|l| l.starts_with("# TYPE ")) {
        assert!(declared.insert(line.to_owned()), "declared twice: {line}");
    }
    // A worker that is gone is said to be so; the rest still come back.
    let gone = decode.url("");
    let gone = gone.trim_end_matches('/').to_owned();
    drop(decode);
    let metrics = pd.metrics().await;
    assert_eq!(
        metric_with(&metrics, "tandem_router_federated_up", &[("worker", &gone)]),
        Some(0.0),
        "{metrics}"
    );
    let kept = prefill.url("");
    assert!(
        metric_with(
            &metrics,
            "vllm:num_requests_running",
            &[("worker", kept.trim_end_matches('/'))]
        )
        .is_some(),
        "{metrics}"
    );
}

#[tokio::test]
async fn health_follows_the_pd_readiness_rule() {
    if !default_model_present() {
        return;
    }
    let (p, d) = (pd_worker(), worker(&[]));
    let pd = router(&[("prefill", &p), ("decode", &d)], &[]).await;
    let (status, _) = pd
        .post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}))
        .await;
    assert_eq!(status, 200);
    drop(d);
    pd.wait_for_health(503).await;
    let (status, answer) = pd
        .post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}))
        .await;
    common::assert_error(status, &answer, 503);
    let healthcheck: Value = pd
        .client
        .get(pd.url("/healthcheck"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(healthcheck["prefill_instances"], json!(1));
    assert_eq!(healthcheck["decode_instances"], json!(1));
}

#[tokio::test]
async fn prefill_errors_reach_the_client_as_the_worker_said_them() {
    if !default_model_present() {
        return;
    }
    let (p, d) = (
        worker(&["--kv-port", "0", "--max-model-len", "64"]),
        worker(&[]),
    );
    let pd = router(&[("prefill", &p), ("decode", &d)], &[]).await;
    let long = "word ".repeat(200);
    let (status, answer) = pd
        .post("/v1/completions", &json!({"prompt": long, "max_tokens": 4}))
        .await;
    common::assert_error(status, &answer, 400);
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("maximum context length"), "{message}");
    // The router's own refusals have the same shape.
    let (status, answer) = pd.post_raw("/v1/completions", "{not json".into()).await;
    common::assert_error(status, &answer, 400);
    // A prompt list skips the prefill leg (P would hand off one prompt's KV only).
    let (status, answer) = pd
        .post(
            "/v1/completions",
            &json!({"prompt": ["One", "Two"], "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"].as_array().unwrap().len(), 2);
    let metrics = pd.metrics().await;
    let local = metric_with(
        &metrics,
        "tandem_router_disagg_decisions_total",
        &[("decision", "local"), ("reason", "prompt_list")],
    );
    assert_eq!(local, Some(1.0), "{metrics}");
}

#[tokio::test]
async fn a_client_that_leaves_cancels_the_upstream_request() {
    if !default_model_present() {
        return;
    }
    let (p, d) = (pd_worker(), worker(&[]));
    let pd = router(&[("prefill", &p), ("decode", &d)], &[]).await;
    let body = json!({"prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": true,
        "stream": true});
    let response = pd
        .client
        .post(pd.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut events = response.bytes_stream();
    events.next().await.unwrap().unwrap();
    drop(events);
    d.wait_until_idle(0.0).await;
    let metrics = d.metrics().await;
    let aborted = metric_with(
        &metrics,
        "vllm:request_success_total",
        &[("finished_reason", "abort")],
    );
    assert_eq!(aborted, Some(1.0), "{metrics}");
    let generated = metric_value(&metrics, "vllm:generation_tokens_total").unwrap();
    assert!(generated < 500.0, "stopped early: {generated}");
    let router_metrics = pd.metrics().await;
    let in_flight = metric_with(
        &router_metrics,
        "tandem_router_worker_in_flight",
        &[("worker", &d.url(""))],
    );
    assert_eq!(in_flight, Some(0.0), "{router_metrics}");
}

#[tokio::test]
async fn the_admin_api_and_api_keys_guard_what_they_should() {
    if !default_model_present() {
        return;
    }
    let (a, b) = (worker(&[]), worker(&[]));
    let r = router(
        &[("worker", &a)],
        &["--admin-token", "admin-secret", "--api-key", "client-key"],
    )
    .await;
    let body = json!({"prompt": "Hi", "max_tokens": 2});
    let (status, answer) = r.post("/v1/completions", &body).await;
    common::assert_error(status, &answer, 401);
    let call = |method: reqwest::Method, path: &str, token: &str| {
        r.client.request(method, r.url(path)).bearer_auth(token)
    };
    let answer = call(reqwest::Method::POST, "/v1/completions", "client-key")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    // Admin: the client key is not enough; the admin token adds, lists, drains.
    let denied = call(reqwest::Method::GET, "/workers", "client-key")
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);
    let added = call(reqwest::Method::POST, "/workers", "admin-secret")
        .json(&json!({"url": b.url("")}))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 201);
    let duplicate = call(reqwest::Method::POST, "/workers", "admin-secret")
        .json(&json!({"url": b.url("")}))
        .send()
        .await
        .unwrap();
    assert_eq!(duplicate.status(), 400);
    let listed: Value = call(reqwest::Method::GET, "/workers", "admin-secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["workers"].as_array().unwrap().len(), 2, "{listed}");
    let removed = call(
        reqwest::Method::DELETE,
        &format!("/workers?url={}", a.url("")),
        "admin-secret",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(removed.status(), 202);
    // Once drained, a is gone and every request lands on b.
    let mut gone = false;
    for _ in 0..50 {
        let listed: Value = call(reqwest::Method::GET, "/workers", "admin-secret")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if listed["workers"].as_array().unwrap().len() == 1 {
            assert_eq!(listed["workers"][0]["url"], json!(b.url("")));
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the drained worker was never removed");
    let before = metric_value(&b.metrics().await, "vllm:generation_tokens_total").unwrap_or(0.0);
    for _ in 0..3 {
        let answer = call(reqwest::Method::POST, "/v1/completions", "client-key")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    let after = metric_value(&b.metrics().await, "vllm:generation_tokens_total").unwrap();
    assert_eq!(after - before, 6.0);
}

#[tokio::test]
async fn conditional_disaggregation_keeps_short_and_cached_prompts_on_the_decode_worker() {
    if !default_model_present() {
        return;
    }
    let (p, d) = (pd_worker(), worker(&[]));
    let pd = router(
        &[("prefill", &p), ("decode", &d)],
        &["--local-prefill-threshold", "64"],
    )
    .await;
    let decisions = |metrics: &str, decision: &str| {
        metric_with(
            metrics,
            "tandem_router_disagg_decisions_total",
            &[("decision", decision)],
        )
        .unwrap_or(0.0)
    };
    let short = json!({"prompt": "Hi there", "max_tokens": 2});
    let (status, _) = pd.post("/v1/completions", &short).await;
    assert_eq!(status, 200);
    let long_prompt = "Disaggregation pays off for long prompts. ".repeat(12);
    let long = json!({"prompt": long_prompt, "max_tokens": 2});
    let (status, _) = pd.post("/v1/completions", &long).await;
    assert_eq!(status, 200);
    let metrics = pd.metrics().await;
    assert_eq!(decisions(&metrics, "local"), 1.0, "{metrics}");
    assert_eq!(decisions(&metrics, "remote"), 1.0, "{metrics}");
    // The decode worker now holds the long prompt: the same prompt stays local.
    let (status, _) = pd.post("/v1/completions", &long).await;
    assert_eq!(status, 200);
    assert_eq!(decisions(&pd.metrics().await, "local"), 2.0);
    // Only the one remote request reached the prefill worker.
    let prefilled = metric_value(&p.metrics().await, "vllm:request_success_total");
    assert_eq!(prefilled, Some(1.0));
}

#[tokio::test]
async fn sigterm_lets_a_streamed_answer_finish_and_exits_zero() {
    if !default_model_present() {
        return;
    }
    let a = worker(&[]);
    let mut r = router(&[("worker", &a)], &[]).await;
    let response = r
        .client
        .post(r.url("/v1/completions"))
        .json(
            &json!({"prompt": "Count:", "max_tokens": 40, "ignore_eos": true,
            "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &r.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let text = response.text().await.expect("the stream finishes");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let exit = r.child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
}
