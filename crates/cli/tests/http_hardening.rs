//! What a hostile or broken client can do to tandem's HTTP servers (the worker's API
//! and the router, real processes on loopback): hold connections with headers that
//! never end, nothing at all, idle keep-alives or short bodies (all closed within the
//! configured timeouts, while ordinary requests are served); send huge prompts (refused
//! without the memory tokenizing them would take); send oversized bodies through the
//! router (413 from the router, every time); hold more body bytes at once than the
//! router's budget (503 until room is given back); and reach a worker that has an API key
//! without it (401 on `/v1/*`, `/health` open).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use common::{Server, assert_error, default_model_present};
use futures_util::future::join_all;
use serde_json::{Value, json};

/// Timeouts the servers of the slow-client test run with.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
const BODY_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed past a timeout for the server to act on it (generous: CI machines are
/// busy).
const MARGIN: Duration = Duration::from_secs(4);

fn worker(extra: &[&str]) -> Server {
    let mut args = vec![
        "--threads",
        "1",
        "--kv-cache-memory",
        "128MiB",
        "--max-model-len",
        "512",
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// A router in front of `worker`, once it reports the worker healthy.
fn router(worker: &Server, extra: &[&str]) -> Server {
    let mut args = vec!["--threads", "1", "--health-interval-ms", "200", "--worker"];
    let worker_url = worker.url("");
    args.push(&worker_url);
    args.extend_from_slice(extra);
    let router = Server::start_router(&args);
    for _ in 0..150 {
        if ureq::get(&router.url("/health")).call().is_ok() {
            return router;
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("the router never became healthy");
}

fn address(server: &Server) -> SocketAddr {
    let url = server.url("");
    url.trim_start_matches("http://")
        .parse()
        .expect("a loopback address")
}

/// What a slow client does on its connection.
#[derive(Clone, Copy)]
enum Pattern {
    /// Connects and sends nothing.
    Nothing,
    /// Sends these bytes one per tick (never a complete request).
    Trickle(&'static [u8]),
    /// Sends these bytes at once, then nothing.
    Burst(&'static [u8]),
}

const PARTIAL_HEADERS: &[u8] = b"POST /v1/completions HTTP/1.1\r\nHost: tandem\r\nContent-Type: application/json\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const HEALTH_THEN_IDLE: &[u8] = b"GET /health HTTP/1.1\r\nHost: tandem\r\n\r\n";
const SHORT_BODY: &[u8] = b"POST /v1/completions HTTP/1.1\r\nHost: tandem\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": \"only the start";

/// How one slow connection ended.
#[derive(Debug)]
struct Outcome {
    /// From connecting to the server closing the connection; `None`: still open.
    closed_after: Option<Duration>,
    /// Everything the server sent.
    received: Vec<u8>,
}

struct SlowConnection {
    stream: TcpStream,
    /// When the connection was established.
    opened: Instant,
    pattern: Pattern,
    sent: usize,
    outcome: Outcome,
}

impl SlowConnection {
    fn open(address: SocketAddr, pattern: Pattern) -> Self {
        let stream = TcpStream::connect(address).expect("connects");
        stream.set_nonblocking(true).unwrap();
        Self {
            stream,
            opened: Instant::now(),
            pattern,
            sent: 0,
            outcome: Outcome {
                closed_after: None,
                received: Vec::new(),
            },
        }
    }

    fn is_open(&self) -> bool {
        self.outcome.closed_after.is_none()
    }

    /// One tick: sends what the pattern says, reads what arrived, notes a close.
    fn tick(&mut self) {
        let to_send = match self.pattern {
            Pattern::Nothing => &[][..],
            Pattern::Trickle(bytes) => bytes
                .get(self.sent..bytes.len().min(self.sent + 1))
                .unwrap_or(&[]),
            Pattern::Burst(bytes) => bytes.get(self.sent..).unwrap_or(&[]),
        };
        if !to_send.is_empty() {
            match self.stream.write(to_send) {
                Ok(written) => self.sent += written,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return self.close(),
            }
        }
        let mut buffer = [0u8; 4096];
        loop {
            match self.stream.read(&mut buffer) {
                Ok(0) => return self.close(),
                Ok(read) => self.outcome.received.extend_from_slice(&buffer[..read]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => return self.close(),
            }
        }
    }

    fn close(&mut self) {
        self.outcome.closed_after = Some(self.opened.elapsed());
    }
}

/// Opens a connection per pattern to `address` and plays them until the server has
/// closed all of them or `deadline` has passed.
fn play(
    address: SocketAddr,
    patterns: Vec<Pattern>,
    deadline: Duration,
) -> Vec<(Pattern, Outcome)> {
    let mut connections: Vec<SlowConnection> = patterns
        .into_iter()
        .map(|pattern| SlowConnection::open(address, pattern))
        .collect();
    let start = Instant::now();
    while start.elapsed() < deadline && connections.iter().any(SlowConnection::is_open) {
        for connection in connections.iter_mut().filter(|c| c.is_open()) {
            connection.tick();
        }
        thread::sleep(Duration::from_millis(100));
    }
    connections
        .into_iter()
        .map(|c| (c.pattern, c.outcome))
        .collect()
}

/// 200 slow connections of every kind: all closed after the header timeout, within
/// the margin; the idle keep-alive ones after their answer.
fn assert_slow_headers_cut_off(name: &str, address: SocketAddr) {
    let patterns = (0..200)
        .map(|i| match i % 4 {
            0 => Pattern::Nothing,
            1 | 2 => Pattern::Trickle(PARTIAL_HEADERS),
            _ => Pattern::Burst(HEALTH_THEN_IDLE),
        })
        .collect();
    let outcomes = play(address, patterns, HEADER_TIMEOUT + MARGIN);
    let mut slowest = std::collections::BTreeMap::new();
    for (pattern, outcome) in &outcomes {
        let closed = outcome
            .closed_after
            .unwrap_or_else(|| panic!("{name}: a connection is still open: {outcome:?}"));
        assert!(
            closed >= HEADER_TIMEOUT / 2,
            "{name}: closed before the timeout ({closed:?})"
        );
        let kind = match pattern {
            Pattern::Nothing => "nothing sent",
            Pattern::Trickle(_) => "headers trickled",
            Pattern::Burst(_) => "idle keep-alive",
        };
        let slowest = slowest.entry(kind).or_insert(closed);
        *slowest = closed.max(*slowest);
        let text = String::from_utf8_lossy(&outcome.received);
        match pattern {
            Pattern::Burst(_) => assert!(text.starts_with("HTTP/1.1 200"), "{name}: {text}"),
            _ => assert!(
                text.is_empty(),
                "{name}: answered a partial request: {text}"
            ),
        }
    }
    eprintln!("{name}: 200 slow connections closed, the last of each kind after {slowest:?}");
}

/// Bodies shorter than their `Content-Length`: 408 (or a plain close) after the body
/// timeout, within the margin.
fn assert_short_bodies_cut_off(name: &str, address: SocketAddr) {
    let outcomes = play(
        address,
        vec![Pattern::Burst(SHORT_BODY); 20],
        BODY_TIMEOUT + MARGIN,
    );
    let mut slowest = Duration::ZERO;
    for (_, outcome) in &outcomes {
        let closed = outcome
            .closed_after
            .unwrap_or_else(|| panic!("{name}: a short body is still held: {outcome:?}"));
        assert!(
            closed >= BODY_TIMEOUT / 2,
            "{name}: closed early ({closed:?})"
        );
        slowest = slowest.max(closed);
        let text = String::from_utf8_lossy(&outcome.received);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{name}: {text}"
        );
        if !text.is_empty() {
            let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            assert_error(408, &body, 408);
        }
    }
    eprintln!("{name}: 20 short bodies cut off, the last after {slowest:?}");
}

#[test]
fn slow_clients_are_cut_off_while_others_are_served() {
    if !default_model_present() {
        return;
    }
    let header = HEADER_TIMEOUT.as_secs().to_string();
    let body = BODY_TIMEOUT.as_secs().to_string();
    let limits = [
        "--header-read-timeout-secs",
        &header,
        "--body-read-timeout-secs",
        &body,
    ];
    let worker = worker(&limits);
    let router = router(&worker, &limits);
    let (worker_at, router_at) = (address(&worker), address(&router));
    let players = [
        thread::spawn(move || assert_slow_headers_cut_off("worker", worker_at)),
        thread::spawn(move || assert_slow_headers_cut_off("router", router_at)),
        thread::spawn(move || assert_short_bodies_cut_off("worker", worker_at)),
        thread::spawn(move || assert_short_bodies_cut_off("router", router_at)),
    ];
    // Meanwhile, ordinary clients are served.
    thread::sleep(Duration::from_millis(500));
    for server in [&worker, &router] {
        common::chat_once(&server.url(""));
    }
    for player in players {
        player.join().expect("the slow clients' checks pass");
    }
}

/// Largest resident set of process `pid` until `stop`, sampled every 10 ms.
fn sample_rss(pid: u32, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(rss_kib(pid));
            thread::sleep(Duration::from_millis(10));
        }
        peak
    })
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// About `bytes` bytes of text.
fn text_of_len(bytes: usize) -> String {
    "hello world ".repeat(bytes / 12)
}

/// Sends every body at once to `path`; returns each answer's status and body.
async fn post_all(server: &Server, bodies: &[(&str, Bytes)]) -> Vec<(u16, Value)> {
    let sends = bodies.iter().map(|(path, body)| async move {
        let response = server
            .client
            .post(server.url(path))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("the server answers");
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.expect("a JSON body"))
    });
    join_all(sends).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_prompts_are_refused_without_the_memory_they_would_take() {
    if !default_model_present() {
        return;
    }
    let server = worker(&[]);
    let warm_up = json!({"prompt": "Hello", "max_tokens": 2});
    assert_eq!(server.post("/v1/completions", &warm_up).await.0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kib(server.pid());

    let over_limit =
        Bytes::from(json!({"prompt": text_of_len(10_000_000), "max_tokens": 4}).to_string());
    let huge = text_of_len(7_800_000);
    let half = text_of_len(3_900_000);
    let under_limit: Vec<(&str, Bytes)> = vec![
        (
            "/v1/completions",
            json!({"prompt": huge, "max_tokens": 4}).to_string().into(),
        ),
        (
            "/v1/completions",
            json!({"prompt": [half, half]}).to_string().into(),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": huge}]})
                .to_string()
                .into(),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": half},
            {"role": "user", "content": [{"type": "text", "text": half}]}]})
            .to_string()
            .into(),
        ),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(server.pid(), stop.clone());
    let started = Instant::now();
    let oversized: Vec<(&str, Bytes)> = (0..8)
        .map(|_| ("/v1/completions", over_limit.clone()))
        .collect();
    for (status, body) in post_all(&server, &oversized).await {
        assert_error(status, &body, 413);
    }
    let refused: Vec<(&str, Bytes)> = under_limit.iter().cycle().take(8).cloned().collect();
    for (status, body) in post_all(&server, &refused).await {
        assert_error(status, &body, 400);
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("maximum context length is 512 tokens"),
            "{message}"
        );
    }
    let answered_in = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap().max(rss_kib(server.pid()));
    eprintln!(
        "RSS idle {} MiB, peak {} MiB (16 bodies of 8-10 MB answered in {answered_in:?})",
        idle / 1024,
        peak / 1024
    );
    assert!(peak < 2 * idle, "RSS went from {idle} KiB to {peak} KiB");
    // The server still serves.
    assert_eq!(server.post("/v1/completions", &warm_up).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_the_routers_413_every_time() {
    if !default_model_present() {
        return;
    }
    let worker = worker(&[]);
    let router = router(&worker, &[]);
    // Over both limits, and between the router's and the worker's default limits.
    let text = Bytes::from(json!({"prompt": text_of_len(9_000_000)}).to_string());
    let ids = Bytes::from(format!(r#"{{"prompt": [{}1]}}"#, "1,".repeat(4_150_000)));
    let between =
        tandem_router::config::DEFAULT_MAX_BODY_BYTES..tandem_httpd::DEFAULT_MAX_BODY_BYTES;
    assert!(between.contains(&ids.len()), "{}", ids.len());
    let bodies: Vec<(&str, Bytes)> = (0..96)
        .map(|i| {
            (
                "/v1/completions",
                if i % 2 == 0 {
                    text.clone()
                } else {
                    ids.clone()
                },
            )
        })
        .collect();
    let started = Instant::now();
    let answers = post_all(&router, &bodies).await;
    for (status, body) in &answers {
        assert_error(*status, body, 413);
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("larger than the server accepts"),
            "{message}"
        );
    }
    eprintln!(
        "96 oversized bodies: 413 from the router in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_routers_budget_in_flight_get_503_until_room_is_given_back() {
    if !default_model_present() {
        return;
    }
    let worker = worker(&[]);
    let router = router(
        &worker,
        &[
            "--max-body-bytes",
            "1MiB",
            "--max-body-bytes-in-flight",
            "2MiB",
        ],
    );
    // Two uploads of a declared 1 MiB that stall after their first bytes take the
    // whole budget.
    let head = "POST /v1/completions HTTP/1.1\r\nHost: tandem\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n{\"prompt\": \"";
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut stream = TcpStream::connect(address(&router)).unwrap();
            stream.write_all(head.as_bytes()).unwrap();
            stream
        })
        .collect();
    let request = json!({"prompt": "Hello", "max_tokens": 2});
    let mut refused = (0, Value::Null);
    for _ in 0..100 {
        refused = router.post("/v1/completions", &request).await;
        if refused.0 != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_error(refused.0, &refused.1, 503);
    let message = refused.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("retry shortly"), "{message}");
    // Requests without a body still pass; the stalled uploads end (408 or closed by
    // the client) and give their room back.
    assert!(ureq::get(&router.url("/health")).call().is_ok());
    drop(held);
    let mut answered = 0;
    for _ in 0..100 {
        answered = router.post("/v1/completions", &request).await.0;
        if answered == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(answered, 200);
}

#[tokio::test]
async fn an_api_key_guards_the_workers_v1_routes() {
    if !default_model_present() {
        return;
    }
    let server = worker(&["--api-key", "sesame"]);
    let completion = json!({"prompt": "Hello", "max_tokens": 2});
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let send = |path: &str, body: Option<&Value>, key: Option<&str>| {
        let mut request = match body {
            Some(body) => server.client.post(server.url(path)).json(body),
            None => server.client.get(server.url(path)),
        };
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        async move {
            let response = request.send().await.expect("the worker answers");
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            (
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            )
        }
    };
    let routes = [
        ("/v1/completions", Some(&completion)),
        ("/v1/chat/completions", Some(&chat)),
        ("/v1/models", None),
    ];
    for (path, body) in routes {
        for key in [None, Some("open sesame"), Some("sesam")] {
            let (status, answer) = send(path, body, key).await;
            assert_error(status, &answer, 401);
        }
        let (status, answer) = send(path, body, Some("sesame")).await;
        assert_eq!(status, 200, "{path}: {answer}");
    }
    for open in ["/health", "/metrics"] {
        assert_eq!(send(open, None, None).await.0, 200, "{open}");
    }
}
