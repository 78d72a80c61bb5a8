//! The hand-off's authentication, attacked from outside, with real `tandem serve`
//! processes on loopback:
//!
//! - forged `kv_transfer_params` sent straight to a worker never make it connect
//!   anywhere (a hostile listener in the test, ready to serve forged KV, counts its
//!   connections) and never put forged KV in its prefix cache;
//! - a worker without a secret refuses decode legs, and refuses to start a KV port;
//! - the KV port tells a peer without the cluster secret nothing but "unauthorized",
//!   serves a lease only to the holder of its secret, and reads only blocks covered by
//!   the tokens whose digest the reader presents.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Server, default_model_present, metric_with, tandem, text_of};
use serde_json::{Value, json};
use tandem_engine::kv::{KvDtype, KvLayout};
use tandem_engine::transfer::auth::{self, ClusterSecret, Nonce, SignedParams};
use tandem_engine::transfer::handshake::{self, Greeting};
use tandem_engine::transfer::model_identity;
use tandem_engine::transfer::wire::{self, ErrorCode, Fingerprint, LeaseRef, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKENS: usize = 16;
const ENGINE: &str = "engine-under-attack-7f3a";
const IO: Duration = Duration::from_secs(10);

fn worker(extra: &[&str]) -> Server {
    let mut args = vec!["--threads", "1", "--kv-cache-memory", "128MiB"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn greedy(prompt: Value) -> Value {
    json!({"prompt": prompt, "max_tokens": TOKENS, "temperature": 0})
}

fn with_params(body: &Value, params: &Value) -> Value {
    let mut leg = body.clone();
    leg["kv_transfer_params"] = params.clone();
    leg
}

/// A counter's value with `label` (0 before its first increment).
fn labelled(exposition: &str, name: &str, label: (&str, &str)) -> f64 {
    metric_with(exposition, name, &[label]).unwrap_or(0.0)
}

fn received_bytes(exposition: &str) -> f64 {
    labelled(
        exposition,
        "tandem:kv_transfer_bytes_total",
        ("direction", "received"),
    )
}

/// A listener that plays a prefill worker for anyone: it echoes whatever a reader
/// presents (its nonce as "proof", its fingerprint and engine id) and serves blocks of
/// forged bytes. Counts the connections it gets.
struct HostilePeer {
    port: u16,
    connections: Arc<AtomicUsize>,
}

impl HostilePeer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_forged_kv(stream));
            }
        });
        Self { port, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve_forged_kv(mut stream: TcpStream) {
    while let Ok(message) = wire::receive(&mut stream).await {
        let reply = match message {
            Message::Hello { client_nonce } => Message::Challenge {
                server_nonce: client_nonce.clone(),
                server_proof: client_nonce,
            },
            Message::Auth {
                fingerprint,
                engine_id,
                ..
            } => Message::Welcome {
                fingerprint,
                engine_id,
                device: None,
            },
            Message::Read { block_ids, .. } => {
                let block_bytes = 368_640;
                let ok = Message::ReadOk {
                    blocks: block_ids.len(),
                    block_bytes,
                };
                let _ = wire::send(&mut stream, &ok).await;
                let _ = stream
                    .write_all(&vec![7u8; block_ids.len() * block_bytes])
                    .await;
                continue;
            }
            _ => Message::Ack { count: 1 },
        };
        if wire::send(&mut stream, &reply).await.is_err() {
            return;
        }
    }
}

/// Decode-leg params naming the hostile peer: unsigned, and signed under a secret
/// other than the cluster's.
fn forged_params(port: u16) -> Vec<Value> {
    let blocks = [0u32, 1, 2, 3];
    let unsigned = json!({"do_remote_prefill": true, "do_remote_decode": false,
        "remote_block_ids": [blocks], "remote_engine_id": "evil",
        "remote_request_id": "cmpl-evil-0-00000000", "remote_host": "127.0.0.1",
        "remote_port": port, "tp_size": 1, "remote_num_tokens": 60});
    let lease_secret = auth::new_lease_secret();
    let expires_at = auth::now_unix() + 30;
    let fields = SignedParams {
        engine_id: "evil",
        request_id: "cmpl-evil-0-00000000",
        block_ids: &blocks,
        host: "127.0.0.1",
        port,
        num_tokens: 60,
        expires_at,
        lease_secret: &lease_secret,
    };
    let elsewhere = ClusterSecret::new(b"the attacker's own secret", "test").unwrap();
    let mut signed_elsewhere = unsigned.clone();
    let extra = json!({"tandem_lease_secret": lease_secret, "tandem_expires_at": expires_at,
        "tandem_signature": fields.sign(&elsewhere)});
    signed_elsewhere
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    vec![unsigned, signed_elsewhere]
}

/// A prompt of four blocks, as token ids.
fn four_block_prompt(seed: u32) -> Vec<u32> {
    (0..60)
        .map(|i| 1000 + (i * 37 + seed * 101) % 5000)
        .collect()
}

#[tokio::test]
async fn forged_params_reach_no_one_and_poison_no_cache() {
    if !default_model_present() {
        return;
    }
    let hostile = HostilePeer::start().await;
    let strict = worker(&["--kv-load-failure-policy", "fail"]);
    let lenient = worker(&[]);
    let single = worker(&[]);
    let body = greedy(json!(four_block_prompt(1)));
    let (_, alone) = single.post("/v1/completions", &body).await;
    for params in forged_params(hostile.port) {
        let leg = with_params(&body, &params);
        let (status, answer) = strict.post("/v1/completions", &leg).await;
        common::assert_error(status, &answer, 400);
        assert_eq!(answer["error"]["param"], json!("kv_transfer_params"));
        let text = answer.to_string();
        for leak in ["127.0.0.1", &hostile.port.to_string(), "onnect", "refused"] {
            assert!(!text.contains(leak), "{leak} in {text}");
        }
        let (status, answer) = lenient.post("/v1/completions", &leg).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(text_of(&answer), text_of(&alone));
    }
    let metrics = lenient.metrics().await;
    let failures = ("kind", "unauthenticated");
    assert_eq!(
        labelled(&metrics, "tandem:kv_transfer_failures_total", failures),
        2.0
    );
    // The honest request afterwards is answered from honest KV.
    for w in [&strict, &lenient] {
        let (status, answer) = w.post("/v1/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(text_of(&answer), text_of(&alone));
        assert_eq!(received_bytes(&w.metrics().await), 0.0);
    }
    // The strict worker never ran the forged legs: nothing was cached before.
    let hits = metric_with(&strict.metrics().await, "vllm:prefix_cache_hits_total", &[]);
    assert_eq!(hits.unwrap_or(0.0), 0.0);
    // Heartbeats would have gone out by now (every 5 s by default) too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        hostile.connections(),
        0,
        "a worker connected to the hostile peer"
    );
}

#[tokio::test]
async fn a_worker_without_a_secret_refuses_decode_legs() {
    if !default_model_present() {
        return;
    }
    let hostile = HostilePeer::start().await;
    let unsecured =
        Server::start_without_secret(&["--threads", "1", "--kv-cache-memory", "128MiB"]);
    let body = greedy(json!(four_block_prompt(2)));
    let mut all = forged_params(hostile.port);
    // Even params signed with the real secret: this worker cannot check them.
    all.push(common::kv::signed_params(
        hostile.port,
        "evil",
        &[0, 1, 2, 3],
        60,
    ));
    for params in all {
        let (status, answer) = unsecured
            .post("/v1/completions", &with_params(&body, &params))
            .await;
        common::assert_error(status, &answer, 400);
        assert_eq!(answer["error"]["param"], json!("kv_transfer_params"));
        let message = answer["error"]["message"].as_str().unwrap();
        for how in ["--kv-secret-file", "TANDEM_KV_SECRET", "tandem up"] {
            assert!(message.contains(how), "{message}");
        }
    }
    // Ordinary requests are served as ever.
    let (status, answer) = unsecured.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        hostile.connections(),
        0,
        "a worker connected to the hostile peer"
    );
}

/// Runs `command` to its exit (bounded); its status and stderr.
fn run_to_exit(mut command: Command) -> (bool, String) {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the command did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_kv_port_needs_a_secret_of_16_bytes() {
    let serve = |secret_env: Option<&str>, extra: &[&str]| {
        let mut command = tandem();
        match secret_env {
            Some(value) => command.env("TANDEM_KV_SECRET", value),
            None => command.env_remove("TANDEM_KV_SECRET"),
        };
        command
            .args(["serve", "--port", "0", "--kv-port", "0"])
            .args(extra);
        run_to_exit(command)
    };
    let (ok, stderr) = serve(None, &[]);
    assert!(!ok);
    for how in [
        "--kv-secret-file",
        "TANDEM_KV_SECRET",
        "same secret",
        "tandem up",
    ] {
        assert!(stderr.contains(how), "{how}: {stderr}");
    }
    let (ok, stderr) = serve(Some("too-short"), &[]);
    assert!(!ok);
    assert!(stderr.contains("at least 16"), "{stderr}");
    assert!(
        !stderr.contains("too-short"),
        "the secret is never printed: {stderr}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, "short-secret\n").unwrap();
    // The file wins over the (valid) environment.
    let path = file.to_str().unwrap();
    let (ok, stderr) = serve(Some(common::TEST_KV_SECRET), &["--kv-secret-file", path]);
    assert!(!ok);
    assert!(stderr.contains("12 bytes"), "{stderr}");
    assert!(!stderr.contains("short-secret\n"), "{stderr}");
}

/// The default model's fingerprint, as a reader of its KV presents it.
fn fingerprint() -> Fingerprint {
    let output = tandem().args(["model", "path"]).output().unwrap();
    let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let identity = model_identity(std::path::Path::new(&path)).unwrap();
    // SmolLM2-135M: 30 layers, 3 KV heads of 64; the worker's default block and dtype.
    let layout = KvLayout {
        num_layers: 30,
        num_kv_heads: 3,
        head_dim: 64,
        block_size: 16,
        dtype: KvDtype::F16,
    };
    Fingerprint::new(identity, layout)
}

/// Runs the prefill leg of `body` on `p`; its `kv_transfer_params`.
async fn prefill(p: &Server, body: &Value) -> Value {
    let mut leg = body.clone();
    leg["max_tokens"] = json!(1);
    leg["kv_transfer_params"] = json!({"do_remote_decode": true});
    let (status, answer) = p.post("/v1/completions", &leg).await;
    assert_eq!(status, 200, "{answer}");
    answer["kv_transfer_params"].clone()
}

fn frame(message: &Value) -> Vec<u8> {
    let body = message.to_string().into_bytes();
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend(body);
    frame
}

/// Everything the server sends until it closes the connection (bounded).
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut bytes))
        .await
        .expect("the server closes the connection")
        .ok();
    bytes
}

/// The frames of `bytes` as JSON.
fn frames(mut bytes: &[u8]) -> Vec<Value> {
    let mut out = Vec::new();
    while bytes.len() >= 4 {
        let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        out.push(serde_json::from_slice(&bytes[4..4 + len]).unwrap());
        bytes = &bytes[4 + len..];
    }
    out
}

/// `bytes` end with the one refusal an unauthenticated peer gets, and mention none of
/// `secrets`.
fn assert_told_nothing(bytes: &[u8], secrets: &[&str]) {
    let text = String::from_utf8_lossy(bytes);
    for secret in secrets {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    let frames = frames(bytes);
    assert_eq!(
        frames.last(),
        Some(&json!({"type": "error", "code": "unauthorized", "message": "authentication failed"})),
        "{text}"
    );
}

#[tokio::test]
async fn the_kv_port_tells_a_peer_without_the_secret_nothing() {
    if !default_model_present() {
        return;
    }
    let p = worker(&["--kv-port", "0", "--engine-id", ENGINE]);
    let params = prefill(&p, &greedy(json!(four_block_prompt(3)))).await;
    let port = params["remote_port"].as_u64().unwrap() as u16;
    let fingerprint = fingerprint();
    let request_id = params["remote_request_id"].as_str().unwrap().to_owned();
    let leaks = [
        ENGINE,
        fingerprint.model.as_str(),
        request_id.as_str(),
        "fingerprint",
        "engine",
        "lease",
        "incompatible",
    ];
    let connect = || TcpStream::connect(("127.0.0.1", port));

    // A version-1 reader: hello with the fingerprint and the right engine id.
    let mut stream = connect().await.unwrap();
    let v1 = json!({"type": "hello", "engine_id": ENGINE,
        "fingerprint": {"protocol_version": 1, "model": fingerprint.model, "num_layers": 30,
            "num_kv_heads": 3, "head_dim": 64, "block_size": 16, "kv_dtype": "f16"}});
    stream.write_all(&frame(&v1)).await.unwrap();
    assert_told_nothing(&read_to_close(&mut stream).await, &leaks);

    // Not the protocol at all.
    let mut stream = connect().await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert_told_nothing(&read_to_close(&mut stream).await, &leaks);

    // A frame too large for a handshake (5 KiB, well within the 1 MiB an authenticated
    // reader may send) is refused from its length alone, before its body arrives.
    let mut stream = connect().await.unwrap();
    stream.write_all(&(5u32 << 10).to_le_bytes()).await.unwrap();
    assert_told_nothing(&read_to_close(&mut stream).await, &leaks);

    // A version-2 reader with another secret: P's challenge, then the refusal.
    let mut stream = connect().await.unwrap();
    let client = Nonce::random();
    let hello = json!({"type": "hello", "client_nonce": client.to_hex()});
    stream.write_all(&frame(&hello)).await.unwrap();
    let Message::Challenge { server_nonce, .. } = wire::receive(&mut stream).await.unwrap() else {
        panic!("no challenge");
    };
    let server = Nonce::from_hex(&server_nonce).unwrap();
    let wrong = ClusterSecret::new(b"a guess at the cluster secret", "test").unwrap();
    let auth = Message::Auth {
        client_proof: auth::client_proof(&wrong, &client, &server),
        fingerprint: fingerprint.clone(),
        engine_id: ENGINE.into(),
    };
    wire::send(&mut stream, &auth).await.unwrap();
    assert_told_nothing(&read_to_close(&mut stream).await, &leaks);

    // P's own proof reflected back as the reader's.
    let mut stream = connect().await.unwrap();
    stream.write_all(&frame(&hello)).await.unwrap();
    let Message::Challenge { server_proof, .. } = wire::receive(&mut stream).await.unwrap() else {
        panic!("no challenge");
    };
    let reflected = Message::Auth {
        client_proof: server_proof,
        fingerprint: fingerprint.clone(),
        engine_id: ENGINE.into(),
    };
    wire::send(&mut stream, &reflected).await.unwrap();
    assert_told_nothing(&read_to_close(&mut stream).await, &leaks);

    let metrics = p.metrics().await;
    let failures = labelled(
        &metrics,
        "tandem:kv_auth_failures_total",
        ("side", "server"),
    );
    assert_eq!(failures, 5.0, "{metrics}");
    // The lease is untouched.
    let held = metric_with(&metrics, "tandem:kv_blocks_held_for_remote", &[]);
    assert_eq!(held, Some(4.0));
}

/// A connection to P past the handshake, with the cluster secret.
async fn authenticated(port: u16, fingerprint: &Fingerprint) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let secret = common::kv::secret();
    let greeting = Greeting {
        secret: &secret,
        fingerprint,
        engine_id: ENGINE,
        io: IO,
    };
    handshake::greet(&mut stream, &greeting).await.unwrap();
    stream
}

async fn ask(stream: &mut TcpStream, message: Message) -> Message {
    wire::send(stream, &message).await.unwrap();
    wire::receive(stream).await.unwrap()
}

fn read(request_id: &str, lease_secret: &str, blocks: &[u32], tokens: &[u32]) -> Message {
    Message::Read {
        request_id: request_id.into(),
        lease_secret: lease_secret.into(),
        block_ids: blocks.to_vec(),
        num_tokens: tokens.len(),
        tokens_digest: wire::tokens_digest(tokens),
    }
}

fn refusal(answer: Message) -> (ErrorCode, String) {
    match answer {
        Message::Error { code, message } => (code, message),
        other => panic!("not refused: {other:?}"),
    }
}

#[tokio::test]
async fn a_lease_serves_only_its_secret_and_only_vouched_blocks() {
    if !default_model_present() {
        return;
    }
    let p = worker(&["--kv-port", "0", "--engine-id", ENGINE]);
    let (d, single) = (worker(&[]), worker(&[]));
    let prompt = four_block_prompt(4);
    let body = greedy(json!(prompt));
    let (_, alone) = single.post("/v1/completions", &body).await;
    let params = prefill(&p, &body).await;
    let port = params["remote_port"].as_u64().unwrap() as u16;
    let id = params["remote_request_id"].as_str().unwrap().to_owned();
    let lease_secret = params["tandem_lease_secret"].as_str().unwrap().to_owned();
    let blocks: Vec<u32> = serde_json::from_value(params["remote_block_ids"][0].clone()).unwrap();
    assert_eq!(blocks.len(), 4);
    let mut stream = authenticated(port, &fingerprint()).await;

    // A wrong lease secret is answered exactly as an unknown request.
    let unknown = refusal(
        ask(
            &mut stream,
            read("cmpl-nobody-0-00000000", &lease_secret, &blocks, &prompt),
        )
        .await,
    );
    assert_eq!(unknown.0, ErrorCode::UnknownRequest);
    let guessed = auth::new_lease_secret();
    for wrong in ["", guessed.as_str(), &lease_secret[..31]] {
        let refused = refusal(ask(&mut stream, read(&id, wrong, &blocks, &prompt)).await);
        assert_eq!(refused.0, ErrorCode::UnknownRequest);
        assert_eq!(refused.1, unknown.1.replace("cmpl-nobody-0-00000000", &id));
    }
    // No tokens vouched for (the empty prompt's digest): nothing is read.
    for some in [&blocks[..], &blocks[..1], &[]] {
        let (code, _) = refusal(ask(&mut stream, read(&id, &lease_secret, some, &[])).await);
        assert_eq!(code, ErrorCode::PromptMismatch);
    }
    // One block's tokens vouch for that block only.
    let (code, _) = refusal(
        ask(
            &mut stream,
            read(&id, &lease_secret, &blocks[..2], &prompt[..16]),
        )
        .await,
    );
    assert_eq!(code, ErrorCode::BlockOutOfRange);
    // Done and heartbeat without the lease's secret neither end nor renew it.
    let done = Message::Done {
        request_id: id.clone(),
        lease_secret: guessed.clone(),
    };
    assert_eq!(ask(&mut stream, done).await, Message::Ack { count: 0 });
    let heartbeat = Message::Heartbeat {
        leases: vec![LeaseRef {
            request_id: id.clone(),
            lease_secret: String::new(),
        }],
    };
    assert_eq!(ask(&mut stream, heartbeat).await, Message::Ack { count: 0 });
    drop(stream);
    let held = metric_with(&p.metrics().await, "tandem:kv_blocks_held_for_remote", &[]);
    assert_eq!(held, Some(4.0));
    let sent = labelled(
        &p.metrics().await,
        "tandem:kv_transfer_bytes_total",
        ("direction", "sent"),
    );
    assert_eq!(sent, 0.0, "no byte of KV left P");

    // The honest decode worker still pulls the lease.
    let (status, answer) = d
        .post("/v1/completions", &with_params(&body, &params))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(text_of(&answer), text_of(&alone));
    let metrics = d.metrics().await;
    assert!(received_bytes(&metrics) > 0.0, "{metrics}");
    let recomputed = metric_with(&metrics, "tandem:kv_load_recomputes_total", &[]);
    assert_eq!(recomputed.unwrap_or(0.0), 0.0);
}
