//! The prefill/decode hand-off between two real `tandem serve` processes, driven as a
//! proxy drives vLLM workers (reference §1.3): the prefill leg with
//! `kv_transfer_params.do_remote_decode`, `stream: false`, `max_tokens: 1`; the decode
//! leg with the original body plus the prefill answer's params verbatim.
//!
//! Greedy output through P→D equals a single worker's, whole and streamed; leases end
//! when D is done, or expire when it never comes; a prompt D already holds is not
//! pulled; and every failure (P gone, P dying mid-transfer, refused reads, mismatched
//! layouts, unusable params) is handled by the failure policy in bounded time.

mod common;

use std::time::Duration;

use common::{Server, default_model_present, metric_value, metric_with, streamed_text, text_of};
use serde_json::{Value, json};
use tandem_engine::transfer::wire::{self, Message};
use tokio::io::AsyncWriteExt;

const TOKENS: usize = 24;

fn worker(extra: &[&str]) -> Server {
    let mut args = vec!["--threads", "1", "--kv-cache-memory", "128MiB"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// A prefill-capable worker (hand-off listener on a free port).
fn prefill_worker(extra: &[&str]) -> Server {
    let mut args = vec!["--kv-port", "0"];
    args.extend_from_slice(extra);
    worker(&args)
}

/// The fixture's prompts (token ids, as llama.cpp saw them).
fn fixture_prompts() -> Vec<Vec<u64>> {
    let fixture = common::llamacpp_fixture();
    fixture["generation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| serde_json::from_value(case["prompt_ids"].clone()).unwrap())
        .collect()
}

fn greedy(prompt: Value) -> Value {
    json!({"prompt": prompt, "max_tokens": TOKENS, "temperature": 0})
}

/// The prefill leg of `body`, as the toy proxy builds it.
fn prefill_leg(body: &Value) -> Value {
    let mut leg = body.clone();
    leg["stream"] = json!(false);
    leg["max_tokens"] = json!(1);
    leg.as_object_mut().unwrap().remove("stream_options");
    leg["kv_transfer_params"] = json!({"do_remote_decode": true, "do_remote_prefill": false,
        "remote_engine_id": null, "remote_block_ids": null, "remote_host": null,
        "remote_port": null});
    leg
}

/// Runs the prefill leg on `p`; returns its `kv_transfer_params`.
async fn prefill(p: &Server, path: &str, body: &Value) -> Value {
    let (status, answer) = p.post(path, &prefill_leg(body)).await;
    assert_eq!(status, 200, "{answer}");
    let params = answer["kv_transfer_params"].clone();
    assert!(params.is_object(), "no kv_transfer_params: {answer}");
    params
}

fn decode_leg(body: &Value, params: &Value) -> Value {
    let mut leg = body.clone();
    leg["kv_transfer_params"] = params.clone();
    leg
}

/// A counter's value (0 before its first increment, when the exposition omits it).
fn counter(exposition: &str, name: &str) -> f64 {
    metric_value(exposition, name).unwrap_or(0.0)
}

/// A labelled counter's value (0 before its first increment).
fn labelled(exposition: &str, name: &str, label: (&str, &str)) -> f64 {
    metric_with(exposition, name, &[label]).unwrap_or(0.0)
}

async fn received_blocks(d: &Server) -> f64 {
    labelled(
        &d.metrics().await,
        "tandem:kv_transfer_blocks_total",
        ("direction", "received"),
    )
}

/// Waits (bounded) until P holds no blocks for remote readers.
async fn wait_until_released(p: &Server) {
    for _ in 0..100 {
        let metrics = p.metrics().await;
        if metric_value(&metrics, "tandem:kv_blocks_held_for_remote") == Some(0.0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("P still holds leased blocks:\n{}", p.metrics().await);
}

#[tokio::test]
async fn handoff_output_equals_single_worker_output() {
    if !default_model_present() {
        return;
    }
    let (p, d, single) = (prefill_worker(&[]), worker(&[]), worker(&[]));
    for prompt in fixture_prompts() {
        // Whole, on /v1/completions with the prompt as token ids.
        let body = greedy(json!(prompt));
        let (_, alone) = single.post("/v1/completions", &body).await;
        let params = prefill(&p, "/v1/completions", &body).await;
        assert_eq!(params["remote_num_tokens"], json!(prompt.len()), "{params}");
        let blocks = params["remote_block_ids"][0].as_array().unwrap().len();
        assert_eq!(blocks, prompt.len().div_ceil(16), "{params}");
        let before = received_blocks(&d).await;
        let hits = counter(&d.metrics().await, "vllm:prefix_cache_hits_total");
        let (status, answer) = d.post("/v1/completions", &decode_leg(&body, &params)).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(text_of(&answer), text_of(&alone), "prompt {prompt:?}");
        // Every block up to the last prompt token's came from P, but those D had
        // cached (the chat system prompt, from the streamed rounds).
        let pulled = received_blocks(&d).await - before;
        let cached = (counter(&d.metrics().await, "vllm:prefix_cache_hits_total") - hits) / 16.0;
        assert_eq!(
            (pulled + cached) as usize,
            (prompt.len() - 1).div_ceil(16),
            "pulled {pulled}, cached {cached}"
        );

        // Streamed, on /v1/chat/completions (another prompt, so another pull).
        let text =
            String::from_utf8(prompt.iter().map(|&t| b'a' + (t % 26) as u8).collect()).unwrap();
        let chat = json!({"messages": [{"role": "user", "content": text}],
            "max_tokens": TOKENS, "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true}});
        let alone = streamed_text(&single.post_stream("/v1/chat/completions", &chat).await);
        let params = prefill(&p, "/v1/chat/completions", &chat).await;
        let before = received_blocks(&d).await;
        let streamed = d
            .post_stream("/v1/chat/completions", &decode_leg(&chat, &params))
            .await;
        assert_eq!(streamed_text(&streamed), alone);
        assert!(
            received_blocks(&d).await > before,
            "the chat prompt was pulled"
        );
    }
    wait_until_released(&p).await;
    p.wait_until_idle(0.0).await;
    // D keeps what it pulled in its prefix cache (evictable), so its usage is 0 too.
    d.wait_until_idle(0.0).await;
}

#[tokio::test]
async fn a_prompt_d_already_holds_is_not_pulled_and_p_frees_at_once() {
    if !default_model_present() {
        return;
    }
    let (p, d) = (prefill_worker(&[]), worker(&[]));
    // 33 tokens: the prefix cache holds whole blocks, and the last token is always
    // recomputed, so with 2 × 16 cached tokens nothing is left to pull.
    let prompt: Vec<u64> = fixture_prompts()
        .concat()
        .into_iter()
        .cycle()
        .take(33)
        .collect();
    let body = greedy(json!(prompt));
    let (_, local) = d.post("/v1/completions", &body).await;
    let params = prefill(&p, "/v1/completions", &body).await;
    let before = received_blocks(&d).await;
    let (_, answer) = d.post("/v1/completions", &decode_leg(&body, &params)).await;
    assert_eq!(text_of(&answer), text_of(&local));
    assert_eq!(received_blocks(&d).await, before, "nothing pulled");
    // D told P it is done: P's lease ends long before its 30 s expiry.
    wait_until_released(&p).await;
    let expired = counter(&p.metrics().await, "vllm:nixl_num_kv_expired_reqs_total");
    assert_eq!(expired, 0.0);
}

#[tokio::test]
async fn many_concurrent_handoffs_leave_both_workers_idle() {
    if !default_model_present() {
        return;
    }
    let (p, d) = (prefill_worker(&[]), worker(&[]));
    let legs = (0..12).map(|i| {
        let (p, d) = (&p, &d);
        async move {
            let body = json!({"prompt": format!("Request {i}: describe a queue with {i} items."),
                "max_tokens": 8, "temperature": 0.8, "seed": i});
            let params = prefill(p, "/v1/completions", &body).await;
            let (status, answer) = d.post("/v1/completions", &decode_leg(&body, &params)).await;
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["usage"]["completion_tokens"], json!(8));
        }
    });
    futures_util::future::join_all(legs).await;
    wait_until_released(&p).await;
    p.wait_until_idle(0.0).await;
    d.wait_until_idle(0.0).await;
}

#[tokio::test]
async fn an_unread_lease_expires_and_a_late_read_is_refused() {
    if !default_model_present() {
        return;
    }
    let (p, d) = (prefill_worker(&["--kv-lease-secs", "1"]), worker(&[]));
    let body = greedy(json!("The history of the printing press begins in"));
    let params = prefill(&p, "/v1/completions", &body).await;
    let held = metric_value(&p.metrics().await, "tandem:kv_blocks_held_for_remote");
    assert!(held.unwrap() > 0.0);
    wait_until_released(&p).await;
    let metrics = p.metrics().await;
    assert_eq!(
        metric_value(&metrics, "vllm:nixl_num_kv_expired_reqs_total"),
        Some(1.0)
    );
    p.wait_until_idle(0.0).await;

    // D comes too late: P refuses, D computes the prompt itself.
    let (_, local) = worker(&[]).post("/v1/completions", &body).await;
    let (status, answer) = d.post("/v1/completions", &decode_leg(&body, &params)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(text_of(&answer), text_of(&local));
    let metrics = d.metrics().await;
    assert_eq!(
        labelled(
            &metrics,
            "tandem:kv_transfer_failures_total",
            ("kind", "refused")
        ),
        1.0
    );
    assert_eq!(
        metric_value(&metrics, "tandem:kv_load_recomputes_total"),
        Some(1.0)
    );
}

#[tokio::test]
async fn heartbeats_keep_a_waiting_decode_legs_lease_alive() {
    if !default_model_present() {
        return;
    }
    // D admits one request at a time; a long one occupies it while the decode leg
    // waits past P's 1 s lease, kept alive by heartbeats (every lease/6 on D).
    let p = prefill_worker(&["--kv-lease-secs", "1"]);
    let d = worker(&["--max-num-seqs", "1", "--kv-lease-secs", "1"]);
    let body = greedy(json!("Heartbeats keep leases alive while a request waits."));
    let params = prefill(&p, "/v1/completions", &body).await;
    let long = json!({"prompt": "Count slowly:", "max_tokens": 400, "ignore_eos": true});
    let (blocker, decoded) = tokio::join!(d.post("/v1/completions", &long), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        d.post("/v1/completions", &decode_leg(&body, &params)).await
    });
    assert_eq!(blocker.0, 200);
    assert_eq!(decoded.0, 200, "{}", decoded.1);
    let metrics = d.metrics().await;
    assert_eq!(
        counter(&metrics, "tandem:kv_load_recomputes_total"),
        0.0,
        "{metrics}"
    );
    assert!(received_blocks(&d).await > 0.0);
    let expired = counter(&p.metrics().await, "vllm:nixl_num_kv_expired_reqs_total");
    assert_eq!(expired, 0.0);
}

#[tokio::test]
async fn a_dead_prefill_worker_is_handled_by_the_policy() {
    if !default_model_present() {
        return;
    }
    let p = prefill_worker(&[]);
    let (recompute, fail) = (worker(&[]), worker(&["--kv-load-failure-policy", "fail"]));
    let body = greedy(json!("Once the prefill worker is gone, the decode worker"));
    let params = prefill(&p, "/v1/completions", &body).await;
    let chat = json!({"messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4, "stream": true});
    let chat_params = prefill(&p, "/v1/chat/completions", &chat).await;
    drop(p);

    let (_, local) = worker(&[]).post("/v1/completions", &body).await;
    let (status, answer) = recompute
        .post("/v1/completions", &decode_leg(&body, &params))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(text_of(&answer), text_of(&local));
    let metrics = recompute.metrics().await;
    assert_eq!(
        labelled(
            &metrics,
            "tandem:kv_transfer_failures_total",
            ("kind", "unreachable")
        ),
        1.0
    );

    let (status, answer) = fail
        .post("/v1/completions", &decode_leg(&body, &params))
        .await;
    common::assert_error(status, &answer, 500);
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("KV transfer"), "{answer}");
    // The client learns the kind of failure, not the address or the connection error.
    let port = params["remote_port"].to_string();
    for leak in ["127.0.0.1", port.as_str(), "onnect"] {
        assert!(!message.contains(leak), "{leak} in {answer}");
    }
    // Streamed: an error event, then [DONE].
    let events = fail
        .post_stream("/v1/chat/completions", &decode_leg(&chat, &chat_params))
        .await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], json!(500), "{events:?}");
    fail.wait_until_idle(0.0).await;
    recompute.wait_until_idle(0.0).await;
}

#[tokio::test]
async fn refused_reads_and_unusable_params_fall_back_to_local_prefill() {
    if !default_model_present() {
        return;
    }
    // Some spoiled reads never reach P's lease, which then expires.
    let p = prefill_worker(&["--kv-lease-secs", "3"]);
    let d = worker(&[]);
    let other_layout = worker(&["--block-size", "32"]);
    let strict = worker(&["--kv-load-failure-policy", "fail"]);
    let body = greedy(json!(
        "A decode worker checks everything it is given, such as"
    ));
    let (_, local) = d
        .post(
            "/v1/completions",
            &json!({"prompt": "warm up", "max_tokens": 1}),
        )
        .await;
    assert!(local.is_object());
    let (_, local) = worker(&[]).post("/v1/completions", &body).await;

    // (failure kind on D, field of P's answer, spoiled value): a spoiled signed
    // field voids the signature, and D never connects.
    let cases = [
        ("unauthenticated", "remote_block_ids", json!([[100_000]])),
        ("unauthenticated", "remote_engine_id", json!("someone-else")),
        (
            "unauthenticated",
            "remote_request_id",
            json!("no-such-request"),
        ),
        ("unauthenticated", "tandem_signature", json!("00")),
        ("invalid_params", "remote_block_ids", json!([[]])),
    ];
    for (kind, field, spoiled) in cases {
        let mut params = prefill(&p, "/v1/completions", &body).await;
        params[field] = spoiled;
        let failures = |m: &str| labelled(m, "tandem:kv_transfer_failures_total", ("kind", kind));
        let before = failures(&d.metrics().await);
        let (status, answer) = d.post("/v1/completions", &decode_leg(&body, &params)).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(text_of(&answer), text_of(&local), "{kind}");
        assert_eq!(failures(&d.metrics().await), before + 1.0, "{kind}");
    }

    // Signed params for another (as short) prompt: P refuses the read (the digest
    // differs).
    let other = greedy(json!("A different prompt entirely."));
    let (_, other_local) = worker(&[]).post("/v1/completions", &other).await;
    let params = prefill(&p, "/v1/completions", &body).await;
    let refused = |m: &str| labelled(m, "tandem:kv_transfer_failures_total", ("kind", "refused"));
    let before = refused(&d.metrics().await);
    let (status, answer) = d
        .post("/v1/completions", &decode_leg(&other, &params))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(text_of(&answer), text_of(&other_local));
    assert_eq!(refused(&d.metrics().await), before + 1.0);

    // A worker with another KV layout is refused at the handshake.
    let params = prefill(&p, "/v1/completions", &body).await;
    let (status, answer) = other_layout
        .post("/v1/completions", &decode_leg(&body, &params))
        .await;
    assert_eq!(status, 200, "{answer}");
    let metrics = other_layout.metrics().await;
    assert_eq!(
        labelled(
            &metrics,
            "tandem:kv_transfer_failures_total",
            ("kind", "handshake")
        ),
        1.0
    );

    // Under `fail`, params that cannot describe a read are the client's error.
    let mut params = prefill(&p, "/v1/completions", &body).await;
    params.as_object_mut().unwrap().remove("remote_host");
    let (status, answer) = strict
        .post("/v1/completions", &decode_leg(&body, &params))
        .await;
    common::assert_error(status, &answer, 400);
    assert_eq!(answer["error"]["param"], json!("kv_transfer_params"));

    // Every lease ended: by D's "done" after a refused read, or by expiry.
    wait_until_released(&p).await;
    p.wait_until_idle(0.0).await;
}

/// A "prefill worker" of the cluster (it holds the secret) that greets correctly,
/// starts sending the blocks, and dies.
async fn prefill_worker_that_dies_mid_transfer() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let Some((fingerprint, engine_id)) = common::kv::accept_reader(&mut stream).await
                else {
                    return;
                };
                let welcome = Message::Welcome {
                    fingerprint,
                    engine_id,
                    device: None,
                };
                wire::send(&mut stream, &welcome).await.unwrap();
                if let Ok(Message::Read { block_ids, .. }) = wire::receive(&mut stream).await {
                    let ok = Message::ReadOk {
                        blocks: block_ids.len(),
                        block_bytes: 368_640,
                    };
                    wire::send(&mut stream, &ok).await.unwrap();
                    stream.write_all(&[7u8; 100_000]).await.unwrap();
                }
                // Dropped: the connection closes mid-block.
            });
        }
    });
    port
}

#[tokio::test]
async fn a_prefill_worker_dying_mid_transfer_is_survived() {
    if !default_model_present() {
        return;
    }
    let port = prefill_worker_that_dies_mid_transfer().await;
    let d = worker(&[]);
    let body = greedy(json!(
        "When the connection drops in the middle of a block, the reader"
    ));
    let params = common::kv::signed_params(port, "fake", &[0, 1, 2, 3], 20);
    let (_, local) = worker(&[]).post("/v1/completions", &body).await;
    let (status, answer) = d.post("/v1/completions", &decode_leg(&body, &params)).await;
    assert_eq!(status, 200, "{answer}");
    // Whatever half-block arrived was overwritten by the local prefill.
    assert_eq!(text_of(&answer), text_of(&local));
    let metrics = d.metrics().await;
    assert_eq!(
        labelled(
            &metrics,
            "tandem:kv_transfer_failures_total",
            ("kind", "transfer")
        ),
        1.0
    );
    d.wait_until_idle(0.0).await;
}

#[tokio::test]
async fn a_prefill_leg_whose_token_stops_it_still_hands_off() {
    if !default_model_present() {
        return;
    }
    let (p, d, single) = (prefill_worker(&[]), worker(&[]), worker(&[]));
    // llama.cpp's greedy first token after this prompt is " Paris" (id 7042).
    let body = greedy(json!("The capital of France is"));
    let (_, alone) = single.post("/v1/completions", &body).await;
    let stopped_by = [
        ("stop token", json!({"stop_token_ids": [7042]})),
        ("stop string", json!({"stop": [" Par"]})),
    ];
    for (what, stop) in stopped_by {
        let mut leg = prefill_leg(&body);
        leg.as_object_mut()
            .unwrap()
            .extend(stop.as_object().unwrap().clone());
        let (status, answer) = p.post("/v1/completions", &leg).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            answer["choices"][0]["finish_reason"],
            json!("stop"),
            "{what}: {answer}"
        );
        let params = answer["kv_transfer_params"].clone();
        assert!(params.is_object(), "{what}: {answer}");
        let (status, decoded) = d.post("/v1/completions", &decode_leg(&body, &params)).await;
        assert_eq!(status, 200, "{decoded}");
        assert_eq!(text_of(&decoded), text_of(&alone), "{what}");
    }
    wait_until_released(&p).await;
}
