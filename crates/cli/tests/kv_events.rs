//! `tandem serve --kv-events-config`: real workers publish their prefix cache's block
//! events over ZMQ in vLLM 0.26's format, read here by a SUB socket and the replay
//! DEALER as vLLM's consumers read them, and decoded with `tandem_protocol`.
//!
//! A prompt's full blocks are announced with the prompt's tokens (llama.cpp's
//! tokenization, an independent reference) and chained by parent hashes; sequence
//! numbers run from 0 without gaps; replay answers from any start with the terminator
//! and survives hostile requests; a tiny KV cache announces evictions of blocks it
//! stored; a decode worker announces the blocks it pulled from a prefill worker.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use common::{Server, default_model_present, free_port, metric_value, metric_with};
use serde_json::{Value, json};
use tandem_protocol::kv_events::{
    BlockStored, KvEvent, KvEventBatch, decode_batch, decode_message,
};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

/// Longest wait for one socket message: a hang guard, never a measured limit.
const RECV_GUARD: Duration = Duration::from_secs(60);
const BLOCK: usize = 16;
const TOPIC: &str = "kv-events";

/// A worker publishing on `tcp://*:{pub_port}` with replay on loopback.
struct Publisher {
    server: Server,
    pub_port: u16,
    replay_port: u16,
}

impl Publisher {
    fn start(extra: &[&str]) -> Self {
        let (pub_port, replay_port) = (free_port(), free_port());
        let config = json!({"enable_kv_cache_events": true, "publisher": "zmq",
            "endpoint": format!("tcp://*:{pub_port}"),
            "replay_endpoint": format!("tcp://127.0.0.1:{replay_port}"),
            "topic": TOPIC})
        .to_string();
        let mut args = vec!["--threads", "1", "--kv-events-config", config.as_str()];
        args.extend_from_slice(extra);
        let server = Server::start(&args);
        let log = server.log().join("\n");
        assert!(
            log.contains(&format!("KV events published on tcp://0.0.0.0:{pub_port}")),
            "{log}"
        );
        assert!(
            log.contains(&format!("KV event replay on tcp://127.0.0.1:{replay_port}")),
            "{log}"
        );
        Self {
            server,
            pub_port,
            replay_port,
        }
    }

    fn replay_endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.replay_port)
    }
}

/// llama.cpp's ids for a 35-token text (the engine's tokenizer fixture).
fn reference_prompt() -> (String, Vec<u32>) {
    let fixture = common::llamacpp_fixture();
    let case = fixture["tokenizer"]
        .as_array()
        .unwrap()
        .iter()
        .find(|case| case["ids"].as_array().unwrap().len() >= 2 * BLOCK)
        .unwrap();
    let ids = serde_json::from_value(case["ids"].clone()).unwrap();
    (case["text"].as_str().unwrap().to_owned(), ids)
}

/// A greedy one-token completion of `prompt` (text or token ids); its prompt tokens.
async fn complete(server: &Server, prompt: Value) -> u64 {
    let body = json!({"prompt": prompt, "max_tokens": 1, "temperature": 0});
    let (status, answer) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    answer["usage"]["prompt_tokens"].as_u64().unwrap()
}

/// The DEALER side of vLLM's replay: `["", start]`, then `["", seq, payload]` until
/// `["", ff×8, ""]`.
async fn replay(endpoint: &str, start: u64) -> Vec<(u64, Vec<u8>)> {
    let mut dealer = DealerSocket::new();
    dealer
        .connect(endpoint)
        .await
        .expect("the replay socket accepts");
    dealer
        .send(request(&[b"", &start.to_be_bytes()]))
        .await
        .unwrap();
    let mut replies = Vec::new();
    loop {
        let reply = tokio::time::timeout(RECV_GUARD, dealer.recv())
            .await
            .expect("replay answers")
            .unwrap();
        let frames: Vec<Vec<u8>> = reply.into_vec().into_iter().map(|f| f.to_vec()).collect();
        assert_eq!(frames.len(), 3, "{frames:?}");
        assert!(frames[0].is_empty(), "the empty delimiter comes first");
        if frames[1] == [0xff; 8] {
            assert!(frames[2].is_empty(), "the terminator has an empty payload");
            return replies;
        }
        let seq = u64::from_be_bytes(frames[1].as_slice().try_into().unwrap());
        replies.push((seq, frames[2].clone()));
    }
}

fn request(frames: &[&[u8]]) -> ZmqMessage {
    let mut message = ZmqMessage::from(frames[0].to_vec());
    for frame in &frames[1..] {
        message.push_back(frame.to_vec().into());
    }
    message
}

/// Replays from 0 until `done` holds for the decoded batches (the last batch may
/// still be on its way to the publisher when an answer arrives); checks the numbering.
async fn replay_until(
    endpoint: &str,
    done: impl Fn(&[KvEventBatch]) -> bool,
) -> Vec<(u64, Vec<u8>, KvEventBatch)> {
    for _ in 0..300 {
        let replies = replay(endpoint, 0).await;
        let seqs: Vec<u64> = replies.iter().map(|r| r.0).collect();
        assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "no gaps");
        let decoded: Vec<_> = replies
            .into_iter()
            .map(|(seq, payload)| {
                let batch = decode_batch(&payload).expect("vLLM's format");
                (seq, payload, batch)
            })
            .collect();
        let batches: Vec<KvEventBatch> = decoded.iter().map(|d| d.2.clone()).collect();
        if done(&batches) {
            return decoded;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the replay never showed the expected events");
}

fn stores(batches: &[KvEventBatch]) -> Vec<&BlockStored> {
    batches
        .iter()
        .flat_map(|b| &b.events)
        .filter_map(|event| match event {
            KvEvent::BlockStored(stored) => Some(stored),
            _ => None,
        })
        .collect()
}

fn removed_hashes(batches: &[KvEventBatch]) -> Vec<u64> {
    batches
        .iter()
        .flat_map(|b| &b.events)
        .filter_map(|event| match event {
            KvEvent::BlockRemoved(removed) => Some(removed.block_hashes.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// A store of exactly `tokens` (whole blocks).
fn store_of<'a>(batches: &'a [KvEventBatch], tokens: &[u32]) -> Option<&'a BlockStored> {
    stores(batches).into_iter().find(|s| s.token_ids == tokens)
}

/// vLLM's fields for tandem's single full-attention group on the CPU.
fn assert_vllm_shape(stored: &BlockStored) {
    let blocks = stored.block_hashes.len();
    assert_eq!(stored.token_ids.len(), blocks * BLOCK, "{stored:?}");
    assert_eq!(stored.block_size, BLOCK as u32);
    assert_eq!(stored.lora_id, None);
    assert_eq!(stored.medium.as_deref(), Some("CPU"));
    assert_eq!(stored.lora_name, None);
    assert_eq!(stored.extra_keys, Some(vec![None; blocks]));
    assert_eq!(stored.group_idx, Some(0));
    assert_eq!(stored.kv_cache_spec_kind.as_deref(), Some("full_attention"));
    assert_eq!(stored.kv_cache_spec_sliding_window, None);
}

/// A SUB socket on the worker's PUB, past the slow-joiner window.
async fn subscribe(worker: &Publisher) -> SubSocket {
    let mut sub = SubSocket::new();
    sub.connect(&format!("tcp://127.0.0.1:{}", worker.pub_port))
        .await
        .expect("the PUB socket accepts");
    sub.subscribe(TOPIC).await.unwrap();
    await_first_message(&mut sub, &worker.server).await;
    sub
}

/// Requests fresh prompts (each announces a block) until `sub` receives a message:
/// the PUB socket drops messages until the subscription has reached it.
async fn await_first_message(sub: &mut SubSocket, server: &Server) {
    for round in 0..100 {
        let warm_up: Vec<u32> = (0..BLOCK as u32 + 1)
            .map(|t| 20_000 + round * 40 + t)
            .collect();
        complete(server, json!(warm_up)).await;
        if tokio::time::timeout(Duration::from_millis(500), sub.recv())
            .await
            .is_ok()
        {
            return;
        }
    }
    panic!("the SUB socket never received a message");
}

#[tokio::test]
async fn a_pub_socket_with_a_plain_address_connects_to_its_subscriber() {
    if !default_model_present() {
        return;
    }
    // vLLM's rule: no `*` or `::`, so the worker connects to a SUB socket that binds.
    let mut sub = SubSocket::new();
    let bound = sub.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
    sub.subscribe("").await.unwrap();
    let config = json!({"enable_kv_cache_events": true, "endpoint": bound}).to_string();
    let server = Server::start(&[
        "--threads",
        "1",
        "--kv-cache-memory",
        "128MiB",
        "--kv-events-config",
        &config,
    ]);
    assert!(
        server
            .log()
            .iter()
            .any(|l| l == &format!("KV events published to {bound}")),
        "{:?}",
        server.log()
    );
    await_first_message(&mut sub, &server).await;
    let prompt: Vec<u32> = (9000..9016).chain([1]).collect();
    complete(&server, json!(prompt)).await;
    receive_until_stored(&mut sub, "", &prompt[..BLOCK]).await;
}

/// Receives live messages until one holds a store of `tokens`; returns all decoded.
async fn receive_until_stored(
    sub: &mut SubSocket,
    topic: &str,
    tokens: &[u32],
) -> Vec<(u64, Vec<u8>)> {
    let mut received = Vec::new();
    let mut seen = Vec::new();
    loop {
        let Ok(message) = tokio::time::timeout(RECV_GUARD, sub.recv()).await else {
            panic!("no store of {tokens:?} among {seen:?}");
        };
        let message = message.unwrap();
        let frames: Vec<Vec<u8>> = message.into_vec().into_iter().map(|f| f.to_vec()).collect();
        let parts: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        let decoded = decode_message(&parts).expect("vLLM's three frames");
        assert_eq!(decoded.topic, topic);
        assert_eq!(decoded.batch.data_parallel_rank, Some(0));
        let found = store_of(std::slice::from_ref(&decoded.batch), tokens).is_some();
        seen.push(decoded.batch.clone());
        received.push((decoded.seq, frames[2].clone()));
        if found {
            return received;
        }
    }
}

#[tokio::test]
async fn a_prompt_is_announced_live_chained_and_replayed() {
    if !default_model_present() {
        return;
    }
    let worker = Publisher::start(&["--kv-cache-memory", "128MiB"]);
    let mut sub = subscribe(&worker).await;

    // The prompt's two full blocks, with llama.cpp's tokens.
    let (text, ids) = reference_prompt();
    let prompt_tokens = complete(&worker.server, json!(text)).await;
    assert_eq!(prompt_tokens as usize, ids.len());
    let full = &ids[..ids.len() / BLOCK * BLOCK];
    let live = receive_until_stored(&mut sub, TOPIC, full).await;

    // A longer prompt sharing those blocks announces only its new block, chained.
    let longer: Vec<u32> = ids.iter().copied().chain(5000..5013).collect();
    complete(&worker.server, json!(longer)).await;
    let third = &longer[full.len()..full.len() + BLOCK];
    let live_more = receive_until_stored(&mut sub, TOPIC, third).await;

    let replayed = replay_until(&worker.replay_endpoint(), |batches| {
        store_of(batches, third).is_some()
    })
    .await;
    let batches: Vec<KvEventBatch> = replayed.iter().map(|r| r.2.clone()).collect();
    let head = store_of(&batches, full).expect("the prompt's blocks are stored");
    assert_vllm_shape(head);
    assert_eq!(head.parent_block_hash, None, "the run starts at block 0");
    assert_eq!(head.block_hashes.len(), 2);
    let tail = store_of(&batches, third).expect("the new block is stored");
    assert_vllm_shape(tail);
    assert_eq!(tail.parent_block_hash, head.block_hashes.last().copied());
    assert_eq!(tail.block_hashes.len(), 1);
    for batch in &batches {
        assert_eq!(batch.data_parallel_rank, Some(0));
    }

    // What arrived live is what the replay holds, byte for byte.
    for (seq, payload) in live.iter().chain(&live_more) {
        assert_eq!(&replayed[*seq as usize].1, payload, "batch {seq}");
    }

    // From a later start, the suffix only.
    let from = replayed.len() as u64 - 2;
    let suffix = replay(&worker.replay_endpoint(), from).await;
    let seqs: Vec<u64> = suffix.iter().map(|r| r.0).collect();
    assert_eq!(seqs, [from, from + 1]);
    assert!(
        replay(&worker.replay_endpoint(), u64::MAX - 1)
            .await
            .is_empty()
    );

    let metrics = worker.server.metrics().await;
    let published = metric_value(&metrics, "tandem:kv_events_published_total").unwrap();
    assert!(published >= replayed.len() as f64, "{published}");
    assert_eq!(
        metric_value(&metrics, "tandem:kv_events_dropped_total"),
        None
    );
}

#[tokio::test]
async fn hostile_replay_requests_are_ignored() {
    if !default_model_present() {
        return;
    }
    let worker = Publisher::start(&["--kv-cache-memory", "128MiB"]);
    let prompt: Vec<u32> = (7000..7040).collect();
    complete(&worker.server, json!(prompt)).await;
    replay_until(&worker.replay_endpoint(), |batches| {
        store_of(batches, &prompt[..2 * BLOCK]).is_some()
    })
    .await;

    // Not ZMTP at all.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", worker.replay_port)).unwrap();
    let _ = raw.write_all(&[0xff; 4096]);
    drop(raw);
    // ZMTP, but not a replay request: each is ignored, counted, and not answered.
    let mut dealer = DealerSocket::new();
    dealer.connect(&worker.replay_endpoint()).await.unwrap();
    let start = 0u64.to_be_bytes();
    for frames in [
        &[b"x".as_slice()][..],
        &[b"", &start[..4]],
        &[b"", &start, b"extra"],
        &[b"not empty", &start],
    ] {
        dealer.send(request(frames)).await.unwrap();
    }
    // The same client's good request is answered after them, in order.
    dealer.send(request(&[b"", &start])).await.unwrap();
    let mut answer = Vec::new();
    loop {
        let reply = tokio::time::timeout(RECV_GUARD, dealer.recv())
            .await
            .expect("the good request is answered")
            .unwrap();
        let frames: Vec<Vec<u8>> = reply.into_vec().into_iter().map(|f| f.to_vec()).collect();
        if frames[1] == [0xff; 8] {
            break;
        }
        answer.push(u64::from_be_bytes(frames[1].as_slice().try_into().unwrap()));
    }
    assert_eq!(answer.first(), Some(&0), "{answer:?}");
    let metrics = worker.server.metrics().await;
    assert_eq!(
        metric_value(&metrics, "tandem:kv_events_replay_refused_total"),
        Some(4.0)
    );

    // The publisher carries on: a new prompt is stored and replayed.
    let next: Vec<u32> = (8000..8040).collect();
    complete(&worker.server, json!(next)).await;
    replay_until(&worker.replay_endpoint(), |batches| {
        store_of(batches, &next[..2 * BLOCK]).is_some()
    })
    .await;
}

#[tokio::test]
async fn a_tiny_cache_announces_the_evictions_of_stored_blocks() {
    if !default_model_present() {
        return;
    }
    // A few blocks of 16 tokens: each 48-token prompt takes 3, so fresh prompts soon
    // evict the earlier ones' cached blocks.
    let worker = Publisher::start(&["--kv-cache-memory", "3MiB", "--max-model-len", "64"]);
    let mut prompts = Vec::new();
    let mut replayed = Vec::new();
    for i in 0..40u32 {
        let prompt: Vec<u32> = (0..48).map(|t| 1000 + i * 100 + t).collect();
        complete(&worker.server, json!(prompt)).await;
        let full = prompt[..3 * BLOCK].to_vec();
        prompts.push(prompt);
        replayed = replay_until(&worker.replay_endpoint(), |b| store_of(b, &full).is_some()).await;
        let batches: Vec<KvEventBatch> = replayed.iter().map(|r| r.2.clone()).collect();
        if !removed_hashes(&batches).is_empty() {
            break;
        }
    }
    let batches: Vec<KvEventBatch> = replayed.into_iter().map(|r| r.2).collect();
    let removed = removed_hashes(&batches);
    assert!(
        !removed.is_empty(),
        "no eviction after {} prompts",
        prompts.len()
    );
    // Every removal names a block stored before it (in an earlier or the same batch).
    let mut stored = HashSet::new();
    for batch in &batches {
        for event in &batch.events {
            match event {
                KvEvent::BlockStored(s) => {
                    assert_vllm_shape(s);
                    stored.extend(s.block_hashes.iter().copied());
                }
                KvEvent::BlockRemoved(r) => {
                    assert_eq!(r.medium.as_deref(), Some("CPU"));
                    assert_eq!(r.group_idx, Some(0));
                    for hash in &r.block_hashes {
                        assert!(stored.contains(hash), "removed {hash:#x} never stored");
                    }
                }
                KvEvent::AllBlocksCleared => panic!("nothing resets the cache"),
            }
        }
    }
    // The first prompt's blocks went first (least recently released).
    let first = store_of(&batches, &prompts[0][..3 * BLOCK]).expect("stored");
    assert!(
        first.block_hashes.iter().any(|h| removed.contains(h)),
        "{removed:?}"
    );
}

#[test]
fn unknown_keys_and_wrong_types_are_refused_by_name() {
    for (config, named) in [
        (
            r#"{"enable_kv_cache_events": true, "buffer_step": 5}"#,
            "buffer_step",
        ),
        (r#"{"hwm": "many"}"#, "expected usize"),
        (r#"{"endpoint": "ipc:///tmp/kv"}"#, "only tcp://"),
    ] {
        let output = common::tandem()
            .args(["serve", "--kv-events-config", config])
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--kv-events-config"), "{stderr}");
        assert!(stderr.contains(named), "{stderr}");
    }
}

#[test]
fn startup_fails_when_the_endpoint_cannot_be_bound() {
    if !default_model_present() {
        return;
    }
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = json!({"enable_kv_cache_events": true, "endpoint": format!("tcp://*:{port}")});
    let output = common::tandem()
        .args([
            "serve",
            "--port",
            "0",
            "--threads",
            "1",
            "--kv-cache-memory",
            "64MiB",
        ])
        .args(["--kv-events-config", &config.to_string()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "could not bind the KV event PUB socket to tcp://0.0.0.0:{port}"
        )),
        "{stderr}"
    );
}

/// The prefill leg of a P/D hand-off, as the toy proxy sends it.
fn prefill_leg(body: &Value) -> Value {
    let mut leg = body.clone();
    leg["max_tokens"] = json!(1);
    leg["kv_transfer_params"] = json!({"do_remote_decode": true, "do_remote_prefill": false,
        "remote_engine_id": null, "remote_block_ids": null, "remote_host": null,
        "remote_port": null});
    leg
}

#[tokio::test]
async fn a_decode_worker_announces_the_blocks_it_pulled() {
    if !default_model_present() {
        return;
    }
    let p = Server::start(&[
        "--threads",
        "1",
        "--kv-cache-memory",
        "128MiB",
        "--kv-port",
        "0",
    ]);
    let d = Publisher::start(&["--kv-cache-memory", "128MiB"]);
    let prompt: Vec<u32> = (3000..3048).collect();
    let body = json!({"prompt": prompt, "max_tokens": 4, "temperature": 0});
    let (status, answer) = p.post("/v1/completions", &prefill_leg(&body)).await;
    assert_eq!(status, 200, "{answer}");
    let mut decode = body.clone();
    decode["kv_transfer_params"] = answer["kv_transfer_params"].clone();
    let (status, answer) = d.server.post("/v1/completions", &decode).await;
    assert_eq!(status, 200, "{answer}");

    // The first 47 tokens' blocks were pulled, not computed, on D …
    let metrics = d.server.metrics().await;
    let pulled = metric_with(
        &metrics,
        "tandem:kv_transfer_blocks_total",
        &[("direction", "received")],
    );
    assert_eq!(pulled, Some(3.0), "{metrics}");
    // … and D announces them with the prompt's tokens, from block 0.
    let replayed = replay_until(&d.replay_endpoint(), |batches| {
        store_of(batches, &prompt).is_some()
    })
    .await;
    let batches: Vec<KvEventBatch> = replayed.into_iter().map(|r| r.2).collect();
    let stored = store_of(&batches, &prompt).unwrap();
    assert_vllm_shape(stored);
    assert_eq!(stored.parent_block_hash, None);
    assert_eq!(stored.block_hashes.len(), 3);
}
