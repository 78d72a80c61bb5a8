//! The server loop in-process, spoken to over raw TCP: bodies within the limit reach
//! the application whole, chunked or not; bodies over it get 413 (from
//! `Content-Length` before the body is sent, or once a chunked body passes the limit)
//! and the connection is closed; bodies past the server's budget of bytes in flight
//! get 503 until room is given back; shutdown lets a request in flight finish.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::routing::{get, post};
use serde_json::Value;
use tandem_httpd::HttpLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot};

const LIMIT: usize = 1000;

fn limits() -> HttpLimits {
    HttpLimits {
        max_body_bytes: LIMIT,
        ..HttpLimits::default()
    }
}

/// Serves `app` on a free loopback port until the returned sender is used or dropped.
async fn start(app: Router) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    start_with(app, limits()).await
}

async fn start_with(
    app: Router,
    limits: HttpLimits,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(tandem_httpd::serve(listener, app, limits, async move {
        let _ = stopped.await;
    }));
    (address, stop, server)
}

fn echo_length() -> Router {
    Router::new().route(
        "/echo",
        post(|body: Bytes| async move { body.len().to_string() }),
    )
}

/// Sends `request` and reads until the server closes the connection.
async fn exchange(address: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8(answer).unwrap()
}

fn chunked(body_len: usize) -> Vec<u8> {
    let mut request =
        b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for piece in vec![b'a'; body_len].chunks(300) {
        request.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        request.extend_from_slice(piece);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    request
}

fn assert_413(answer: &str) {
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], 413, "{body}");
    assert_eq!(
        body["error"]["type"], "RequestEntityTooLargeError",
        "{body}"
    );
}

#[tokio::test]
async fn bodies_within_the_limit_arrive_whole() {
    let (address, _stop, _server) = start(echo_length()).await;
    let answer = exchange(address, &chunked(LIMIT)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n1000"), "{answer}");
    let sized: &[u8] =
        b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello";
    assert!(exchange(address, sized).await.ends_with("\r\n\r\n5"));
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_gets_413_and_a_close() {
    let (address, _stop, _server) = start(echo_length()).await;
    assert_413(&exchange(address, &chunked(LIMIT + 1)).await);
}

#[tokio::test]
async fn a_declared_length_over_the_limit_gets_413_before_the_body_is_sent() {
    let (address, _stop, _server) = start(echo_length()).await;
    // Keep-alive asked for, no body sent: the answer comes anyway, then the close.
    let headers = format!(
        "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        LIMIT + 1
    );
    assert_413(&exchange(address, headers.as_bytes()).await);
}

#[tokio::test]
async fn bodies_past_the_budget_in_flight_wait_for_room() {
    // Room for two bodies of the largest size (1,000 bytes: one KiB of budget each).
    let limits = HttpLimits {
        max_body_bytes_in_flight: 2 * LIMIT,
        ..limits()
    };
    let app = echo_length().route("/ping", get(|| async { "pong" }));
    let (address, _stop, _server) = start_with(app, limits).await;
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {LIMIT}\r\n\r\n"
    );
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&[b'a'; 10]).await.unwrap();
        held.push(stream);
    }
    let small: &[u8] =
        b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello";
    // Once the server has read both heads, a third body finds no room.
    let mut refused = String::new();
    for _ in 0..100 {
        refused = exchange(address, small).await;
        if !refused.starts_with("HTTP/1.1 200") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("retry-after: 1"), "{refused}");
    let body: Value = serde_json::from_str(refused.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["type"], "ServiceUnavailableError", "{body}");
    // Requests without a body take no room.
    let ping = exchange(
        address,
        b"GET /ping HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(ping.ends_with("\r\n\r\npong"), "{ping}");
    // One held body ends and is answered; its room goes to the next.
    let mut first = held.remove(0);
    first.write_all(&vec![b'a'; LIMIT - 10]).await.unwrap();
    let mut answer = Vec::new();
    first.read_to_end(&mut answer).await.unwrap();
    assert!(String::from_utf8(answer).unwrap().ends_with("\r\n\r\n1000"));
    assert!(exchange(address, small).await.ends_with("\r\n\r\n5"));
}

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish() {
    let (started, mut has_started) = mpsc::unbounded_channel::<()>();
    let release = Arc::new(Notify::new());
    let app = {
        let release = release.clone();
        Router::new().route(
            "/slow",
            get(move || {
                let (started, release) = (started.clone(), release.clone());
                async move {
                    let _ = started.send(());
                    release.notified().await;
                    "done"
                }
            }),
        )
    };
    let (address, stop, server) = start(app).await;
    let client = tokio::spawn(exchange(
        address,
        b"GET /slow HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    ));
    has_started.recv().await.unwrap();
    stop.send(()).unwrap();
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(
        !server.is_finished(),
        "the server stopped with a request in flight"
    );
    release.notify_one();
    let answer = client.await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("done"),
        "{answer}"
    );
    server.await.unwrap();
}
