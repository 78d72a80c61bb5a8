//! The KV event follower on real ZMQ sockets over loopback: a test PUB socket plays a
//! vLLM 0.26 worker (the recorded messages, same topic and sequence numbers) and a
//! test ROUTER socket plays its replay server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tandem_protocol::kv_events::{KvEvent, decode_batch};
use tandem_router::kv_follow::{
    CacheState, FollowSettings, KvCacheView, KvFollower, KvStream, ReplayError, ReplayLimits,
    fetch_replay,
};
use tandem_router::policy::PrefixLookup;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../protocol/tests/fixtures/vllm-0.26/kv_events.jsonl"
);
const TOPIC: &str = "kv-events";
const W1: &str = "http://w1:8000";
const W2: &str = "http://w2:8000";
const BLOCK: usize = 16;

/// One recorded message: its sequence number, raw payload and recorded token runs.
struct Record {
    seq: u64,
    payload: Vec<u8>,
    /// `(has_parent, token_ids)` of each `BlockStored`.
    stored: Vec<(bool, Vec<u32>)>,
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

fn records() -> Vec<Record> {
    let text = std::fs::read_to_string(FIXTURE).expect("fixture");
    text.lines()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).expect("json");
            assert_eq!(record["topic"], TOPIC);
            let payload = hex(record["payload_hex"].as_str().expect("payload_hex"));
            let stored = decode_batch(&payload)
                .expect("decodes")
                .events
                .into_iter()
                .filter_map(|event| match event {
                    KvEvent::BlockStored(s) => Some((s.parent_block_hash.is_some(), s.token_ids)),
                    _ => None,
                })
                .collect();
            Record {
                seq: record["seq"].as_u64().expect("seq"),
                payload,
                stored,
            }
        })
        .collect()
}

/// The recorded prompts: a run without a parent starts one, a run with one extends it.
fn prompts(records: &[Record]) -> Vec<Vec<u32>> {
    let mut prompts: Vec<Vec<u32>> = Vec::new();
    for (has_parent, tokens) in records.iter().flat_map(|r| &r.stored) {
        match (has_parent, prompts.last_mut()) {
            (true, Some(prompt)) => prompt.extend(tokens),
            _ => prompts.push(tokens.clone()),
        }
    }
    prompts
}

fn settings(stale_after: Duration) -> FollowSettings {
    FollowSettings {
        topic: TOPIC.into(),
        max_blocks: 1 << 16,
        replay_timeout: Duration::from_millis(500),
        stale_after,
        max_replay_bytes: 1 << 20,
    }
}

async fn bind_pub() -> (PubSocket, String) {
    let mut socket = PubSocket::new();
    let endpoint = socket.bind("tcp://127.0.0.1:0").await.expect("bind PUB");
    (socket, endpoint.to_string())
}

fn message(frames: &[&[u8]]) -> ZmqMessage {
    let mut message = ZmqMessage::from(frames[0].to_vec());
    for frame in &frames[1..] {
        message.push_back(frame.to_vec().into());
    }
    message
}

async fn publish(socket: &mut PubSocket, seq: u64, payload: &[u8]) {
    let seq = seq.to_be_bytes();
    socket
        .send(message(&[TOPIC.as_bytes(), &seq, payload]))
        .await
        .expect("publish");
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Publishes `record` until the view holds `blocks` blocks of `url` (a SUB socket
/// misses what is published before its subscription reaches the PUB socket; sending
/// the first message again is a restart that rebuilds the same state).
async fn publish_until_seen(
    socket: &mut PubSocket,
    view: &KvCacheView,
    url: &str,
    record: &Record,
    blocks: usize,
) {
    for _ in 0..100 {
        publish(socket, record.seq, &record.payload).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if view.worker_blocks(url) == blocks {
            return;
        }
    }
    panic!("{url} never saw seq {}", record.seq);
}

fn stream(worker: &str, endpoint: &str, replay: Option<&str>) -> KvStream {
    KvStream {
        worker: worker.into(),
        endpoint: endpoint.into(),
        replay_endpoint: replay.map(str::to_owned),
    }
}

/// Whole blocks of `prompt`, in tokens.
fn whole(prompt: &[u32]) -> usize {
    prompt.len() / BLOCK * BLOCK
}

fn cached(view: &KvCacheView, urls: &[&str], prompt: &[u32]) -> Vec<Option<usize>> {
    view.cached_prefix_tokens(urls, prompt)
}

/// A replay server holding `records[from..]`; counts the requests it answers.
async fn replay_server(
    records: &[Record],
    from: usize,
    answer: bool,
) -> (String, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let mut socket = RouterSocket::new();
    let endpoint = socket
        .bind("tcp://127.0.0.1:0")
        .await
        .expect("bind ROUTER")
        .to_string();
    let buffer: Vec<(u64, Vec<u8>)> = records[from..]
        .iter()
        .map(|r| (r.seq, r.payload.clone()))
        .collect();
    let requests = Arc::new(AtomicU64::new(0));
    let counted = requests.clone();
    let task = tokio::spawn(async move {
        while let Ok(request) = socket.recv().await {
            counted.fetch_add(1, Ordering::Relaxed);
            if !answer {
                continue;
            }
            let frames: Vec<Vec<u8>> = request.iter().map(|f| f.to_vec()).collect();
            let (identity, start) = (&frames[0], &frames[frames.len() - 1]);
            let start = u64::from_be_bytes(start.as_slice().try_into().expect("8 bytes"));
            for (seq, payload) in buffer.iter().filter(|(seq, _)| *seq >= start) {
                let reply = message(&[identity, b"", &seq.to_be_bytes(), payload]);
                socket.send(reply).await.expect("reply");
            }
            let end = message(&[identity, b"", &[0xff; 8], b""]);
            socket.send(end).await.expect("terminator");
        }
    });
    (endpoint, requests, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_prompts_are_cached_on_the_publishing_worker_only() {
    let records = records();
    let prompts = prompts(&records);
    assert_eq!(prompts.len(), 3);
    let (mut publisher, endpoint) = bind_pub().await;
    let (_silent, silent_endpoint) = bind_pub().await;
    let follower = KvFollower::start(
        settings(Duration::from_secs(60)),
        vec![
            stream(W1, &endpoint, None),
            stream(W2, &silent_endpoint, None),
        ],
    )
    .unwrap();
    let view = follower.view().clone();
    publish_until_seen(&mut publisher, &view, W1, &records[0], 2).await;
    for record in &records[1..] {
        publish(&mut publisher, record.seq, &record.payload).await;
    }
    wait_until("every recorded block is indexed", || {
        view.worker_blocks(W1) == 11
    })
    .await;
    wait_until("W2 is connected", || {
        view.cache_state(W2) == CacheState::Known
    })
    .await;
    let lookup = follower.lookup();
    for prompt in &prompts {
        let mut longer = prompt.clone();
        longer.extend([7, 7, 7]);
        assert_eq!(
            lookup.cached_prefix_tokens(&[W1, W2, "http://other:1"], &longer),
            vec![Some(whole(prompt)), Some(0), None]
        );
    }
    // A prompt sharing only the first block of the first recorded prompt.
    let mut diverging = prompts[0][..BLOCK].to_vec();
    diverging.extend(1000..1000 + BLOCK as u32);
    assert_eq!(cached(&view, &[W1], &diverging), vec![Some(BLOCK)]);
    follower.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_dropped_and_the_stream_goes_on() {
    let records = records();
    let prompts = prompts(&records);
    let (mut publisher, endpoint) = bind_pub().await;
    let follower = KvFollower::start(
        settings(Duration::from_secs(60)),
        vec![stream(W1, &endpoint, None)],
    )
    .unwrap();
    let view = follower.view().clone();
    publish_until_seen(&mut publisher, &view, W1, &records[0], 2).await;
    let seq1 = 1u64.to_be_bytes();
    let huge = vec![0x90u8; 17 << 20];
    let garbage: Vec<Vec<&[u8]>> = vec![
        vec![TOPIC.as_bytes(), &seq1],
        vec![TOPIC.as_bytes(), b"\x01", &records[1].payload],
        vec![TOPIC.as_bytes(), &seq1, b"\xc1\xff\x00"],
        vec![TOPIC.as_bytes(), &seq1, &records[1].payload[..20]],
        vec![TOPIC.as_bytes(), &seq1, &huge],
        vec![b"\xff\xfe", &seq1, &records[1].payload],
        vec![b"kv-events-other", &seq1, &records[1].payload],
        vec![TOPIC.as_bytes(), &seq1, &records[1].payload, b"extra"],
    ];
    for frames in &garbage {
        publisher.send(message(frames)).await.expect("publish");
    }
    publish(&mut publisher, 1, &records[1].payload).await;
    wait_until("seq 1 is applied after the garbage", || {
        view.worker_blocks(W1) == 5
    })
    .await;
    assert_eq!(view.cache_state(W1), CacheState::Known);
    assert_eq!(
        cached(&view, &[W1], &prompts[0]),
        vec![Some(whole(&prompts[0]))]
    );
    follower.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_is_filled_from_the_replay_socket() {
    let records = records();
    let prompts = prompts(&records);
    let (mut publisher, endpoint) = bind_pub().await;
    let (replay, requests, _server) = replay_server(&records, 0, true).await;
    let follower = KvFollower::start(
        settings(Duration::from_secs(60)),
        vec![stream(W1, &endpoint, Some(&replay))],
    )
    .unwrap();
    let view = follower.view().clone();
    publish_until_seen(&mut publisher, &view, W1, &records[0], 2).await;
    // Seq 1 and 2 are lost on the live stream.
    publish(&mut publisher, records[3].seq, &records[3].payload).await;
    wait_until("the gap is replayed", || view.worker_blocks(W1) == 8).await;
    assert_eq!(requests.load(Ordering::Relaxed), 1);
    assert_eq!(view.cache_state(W1), CacheState::Known);
    assert_eq!(
        cached(&view, &[W1], &prompts[0]),
        vec![Some(whole(&prompts[0]))]
    );
    assert_eq!(
        cached(&view, &[W1], &prompts[1]),
        vec![Some(whole(&prompts[1]))]
    );
    publish(&mut publisher, records[4].seq, &records[4].payload).await;
    wait_until("the stream goes on", || view.worker_blocks(W1) == 11).await;
    assert_eq!(requests.load(Ordering::Relaxed), 1);
    follower.shutdown();
}

/// Publishes seq 0, loses 1 and 2, publishes 3 and 4: the follower, the recorded
/// prompts and the publisher (dropping it would disconnect the worker).
async fn gap_with(replay: Option<&str>) -> (KvFollower, Vec<Vec<u32>>, PubSocket) {
    let records = records();
    let (mut publisher, endpoint) = bind_pub().await;
    let follower = KvFollower::start(
        settings(Duration::from_secs(60)),
        vec![stream(W1, &endpoint, replay)],
    )
    .unwrap();
    let view = follower.view().clone();
    publish_until_seen(&mut publisher, &view, W1, &records[0], 2).await;
    publish(&mut publisher, records[3].seq, &records[3].payload).await;
    // Seq 3 continues a chain whose start was lost: after the reset nothing is left.
    wait_until("the worker is reset", || view.worker_blocks(W1) == 0).await;
    assert_eq!(view.cache_state(W1), CacheState::Known);
    // The next message follows seq 3 and is applied to the empty state.
    publish(&mut publisher, records[4].seq, &records[4].payload).await;
    wait_until("seq 4 is applied", || view.worker_blocks(W1) == 3).await;
    (follower, prompts(&records), publisher)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_the_replay_buffer_no_longer_holds_resets_the_worker() {
    let records = records();
    let (replay, requests, _server) = replay_server(&records, 2, true).await;
    let (follower, prompts, _publisher) = gap_with(Some(&replay)).await;
    assert_eq!(requests.load(Ordering::Relaxed), 1);
    let view = follower.view();
    assert_eq!(cached(view, &[W1], &prompts[0]), vec![Some(0)]);
    assert_eq!(
        cached(view, &[W1], &prompts[2]),
        vec![Some(whole(&prompts[2]))]
    );
    follower.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_without_replay_or_with_a_silent_replay_server_resets_the_worker() {
    let (follower, prompts, _publisher) = gap_with(None).await;
    assert_eq!(cached(follower.view(), &[W1], &prompts[0]), vec![Some(0)]);
    follower.shutdown();
    let records = records();
    let (replay, requests, _server) = replay_server(&records, 0, false).await;
    let (follower, prompts, _publisher) = gap_with(Some(&replay)).await;
    assert_eq!(requests.load(Ordering::Relaxed), 1);
    assert_eq!(cached(follower.view(), &[W1], &prompts[0]), vec![Some(0)]);
    follower.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_restart_resets_the_worker() {
    let records = records();
    let prompts = prompts(&records);
    let (mut publisher, endpoint) = bind_pub().await;
    let follower = KvFollower::start(
        settings(Duration::from_secs(60)),
        vec![stream(W1, &endpoint, None)],
    )
    .unwrap();
    let view = follower.view().clone();
    publish_until_seen(&mut publisher, &view, W1, &records[0], 2).await;
    for record in &records[1..] {
        publish(&mut publisher, record.seq, &record.payload).await;
    }
    wait_until("everything is indexed", || view.worker_blocks(W1) == 11).await;
    // The engine restarts: its cache is empty and its sequence starts at 0 again.
    publish(&mut publisher, 0, &records[4].payload).await;
    wait_until("the worker is reset", || view.worker_blocks(W1) == 3).await;
    assert_eq!(cached(&view, &[W1], &prompts[0]), vec![Some(0)]);
    assert_eq!(
        cached(&view, &[W1], &prompts[2]),
        vec![Some(whole(&prompts[2]))]
    );
    follower.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_events_stop_is_unknown_until_they_resume() {
    let records = records();
    let prompts = prompts(&records);
    let (mut publisher, endpoint) = bind_pub().await;
    let follower = KvFollower::start(
        settings(Duration::from_millis(300)),
        vec![stream(W1, &endpoint, None)],
    )
    .unwrap();
    let view = follower.view().clone();
    publish_until_seen(&mut publisher, &view, W1, &records[0], 2).await;
    view.note_routed(W1);
    view.note_routed("http://not-followed:1");
    wait_until("the events count as stopped", || {
        view.cache_state(W1) == CacheState::EventsStopped
    })
    .await;
    assert_eq!(cached(&view, &[W1], &prompts[0]), vec![None]);
    publish(&mut publisher, records[1].seq, &records[1].payload).await;
    wait_until("events resumed", || {
        view.cache_state(W1) == CacheState::Known
    })
    .await;
    assert_eq!(
        cached(&view, &[W1], &prompts[0]),
        vec![Some(whole(&prompts[0]))]
    );
    follower.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_publisher_makes_the_cache_unknown_and_unfollowing_forgets_it() {
    let records = records();
    let prompts = prompts(&records);
    let (mut publisher, endpoint) = bind_pub().await;
    let follower = KvFollower::start(
        settings(Duration::from_secs(60)),
        vec![stream(W1, &endpoint, None)],
    )
    .unwrap();
    let view = follower.view().clone();
    publish_until_seen(&mut publisher, &view, W1, &records[0], 2).await;
    drop(publisher);
    wait_until("the publisher is gone", || {
        view.cache_state(W1) == CacheState::Disconnected
    })
    .await;
    assert_eq!(view.worker_blocks(W1), 0);
    assert_eq!(cached(&view, &[W1], &prompts[0]), vec![None]);
    // It comes back on the same endpoint: followed again from its new messages.
    let mut publisher = PubSocket::new();
    publisher.bind(&endpoint).await.expect("rebind");
    publish_until_seen(&mut publisher, &view, W1, &records[0], 2).await;
    assert_eq!(view.cache_state(W1), CacheState::Known);
    let handle = follower.handle();
    handle.unfollow(W1).await.unwrap();
    assert_eq!(view.cache_state(W1), CacheState::NotFollowed);
    assert_eq!(view.worker_blocks(W1), 0);
    assert_eq!(cached(&view, &[W1], &prompts[0]), vec![None]);
    follower.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_client_takes_the_range_asked_and_no_more_than_its_limits() {
    let records = records();
    let (endpoint, requests, _server) = replay_server(&records, 0, true).await;
    let limits = ReplayLimits {
        timeout: Duration::from_secs(2),
        max_bytes: 1 << 20,
    };
    let seqs = |batches: &[(u64, _)]| batches.iter().map(|(seq, _)| *seq).collect::<Vec<_>>();
    let all = fetch_replay(&endpoint, 0, 5, limits).await.unwrap();
    assert_eq!(seqs(&all), vec![0, 1, 2, 3, 4]);
    let middle = fetch_replay(&endpoint, 1, 3, limits).await.unwrap();
    assert_eq!(seqs(&middle), vec![1, 2]);
    let past_the_end = fetch_replay(&endpoint, 3, 7, limits).await.unwrap_err();
    assert!(
        matches!(past_the_end, ReplayError::Incomplete { missing: 5 }),
        "{past_the_end}"
    );
    let small = ReplayLimits {
        max_bytes: records[0].payload.len(),
        ..limits
    };
    let too_large = fetch_replay(&endpoint, 0, 5, small).await.unwrap_err();
    assert!(matches!(too_large, ReplayError::TooLarge(_)), "{too_large}");
    assert_eq!(requests.load(Ordering::Relaxed), 4);
    let (silent, _, _server) = replay_server(&records, 0, false).await;
    let short = ReplayLimits {
        timeout: Duration::from_millis(200),
        ..limits
    };
    let timeout = fetch_replay(&silent, 0, 5, short).await.unwrap_err();
    assert!(matches!(timeout, ReplayError::Timeout(_)), "{timeout}");
}
