//! `tandem route` following KV events end to end, without a model: a test ZMQ PUB
//! socket publishes the vLLM 0.26 recording for a configured worker, and the admin
//! API adds and removes followed workers. (The engine's own publisher is tested where
//! it lands.)

mod common;

use std::time::Duration;

use common::{Server, metric_value, metric_with, tandem};
use serde_json::{Value, json};
use zeromq::{PubSocket, Socket, SocketSend, ZmqMessage};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../protocol/tests/fixtures/vllm-0.26/kv_events.jsonl"
);
const TOKEN: &str = "admin-secret";

/// The recording's first message: (topic, seq, payload).
fn first_record() -> (String, u64, Vec<u8>) {
    let text = std::fs::read_to_string(FIXTURE).expect("fixture");
    let record: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let hex = record["payload_hex"].as_str().unwrap();
    let payload = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let topic = record["topic"].as_str().unwrap().to_owned();
    (topic, record["seq"].as_u64().unwrap(), payload)
}

async fn bind_pub() -> (PubSocket, String) {
    let mut socket = PubSocket::new();
    let endpoint = socket.bind("tcp://127.0.0.1:0").await.unwrap();
    (socket, endpoint.to_string())
}

async fn workers(router: &Server) -> Value {
    router
        .client
        .get(router.url("/workers"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn kv_cache_of(listed: &Value, url: &str) -> Option<String> {
    listed["workers"]
        .as_array()?
        .iter()
        .find(|w| w["url"] == url)
        .map(|w| w["kv_cache"].as_str().unwrap_or_default().to_owned())
}

async fn add(router: &Server, body: Value) -> u16 {
    router
        .client
        .post(router.url("/workers"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Publishes the first recorded message until the router has indexed `blocks` blocks
/// of `worker` (a SUB misses what is published before its subscription lands; the
/// same seq 0 again is a restart that rebuilds the same state).
async fn publish_until_indexed(socket: &mut PubSocket, router: &Server, worker: &str, blocks: f64) {
    let (topic, seq, payload) = first_record();
    for _ in 0..100 {
        let mut message = ZmqMessage::from(topic.clone().into_bytes());
        message.push_back(seq.to_be_bytes().to_vec().into());
        message.push_back(payload.clone().into());
        socket.send(message).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let metrics = router.metrics().await;
        let labels = [("worker", worker)];
        if metric_with(&metrics, "tandem_router_kv_index_blocks", &labels) == Some(blocks) {
            return;
        }
    }
    panic!("the router never indexed {worker}'s blocks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_follows_configured_and_admin_added_workers() {
    let (mut first_pub, first_endpoint) = bind_pub().await;
    let (mut second_pub, second_endpoint) = bind_pub().await;
    let (a, b) = ("http://127.0.0.1:9", "http://127.0.0.1:11");
    let router = Server::start_router(&[
        "--worker",
        a,
        "--kv-events",
        &format!("{a}={first_endpoint}"),
        "--kv-events-topic",
        "kv-events",
        "--admin-token",
        TOKEN,
    ]);
    publish_until_indexed(&mut first_pub, &router, a, 2.0).await;
    let metrics = router.metrics().await;
    assert!(metric_value(&metrics, "tandem_router_kv_event_batches_total") >= Some(1.0));
    assert_eq!(
        kv_cache_of(&workers(&router).await, a).as_deref(),
        Some("known")
    );

    // Endpoints the router would not connect to are refused before anything is added.
    for endpoint in ["tcp://*:5557", "ipc:///tmp/kv", "tcp://host"] {
        let body = json!({"url": b, "kv_events": {"endpoint": endpoint}});
        assert_eq!(add(&router, body).await, 400, "{endpoint}");
    }
    let body = json!({"url": b, "kv_events": {"endpoint": second_endpoint}});
    assert_eq!(add(&router, body).await, 201);
    publish_until_indexed(&mut second_pub, &router, b, 2.0).await;

    let removed = router
        .client
        .delete(router.url(&format!("/workers?url={a}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 202);
    let labels = [("worker", a)];
    for _ in 0..50 {
        let metrics = router.metrics().await;
        if metric_with(&metrics, "tandem_router_kv_index_blocks", &labels) == Some(0.0) {
            let listed = workers(&router).await;
            assert_eq!(
                kv_cache_of(&listed, b).as_deref(),
                Some("known"),
                "{listed}"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the removed worker's blocks were never forgotten");
}

#[test]
fn kv_events_for_an_unknown_worker_or_a_bad_endpoint_are_refused_at_start() {
    for (kv_events, expected) in [
        (
            "http://127.0.0.1:12=tcp://127.0.0.1:5557",
            "not a configured worker",
        ),
        (
            "http://127.0.0.1:9=tcp://*:5557",
            "not a KV events endpoint",
        ),
        ("http://127.0.0.1:9", "WORKER_URL=tcp://host:port"),
    ] {
        let output = tandem()
            .args(["route", "--port", "0", "--worker", "http://127.0.0.1:9"])
            .args(["--kv-events", kv_events])
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{kv_events}: {stderr}");
    }
}
