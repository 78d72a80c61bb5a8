//! What a client can make `tandem route` send to workers, with real processes on
//! loopback: a client's own `kv_transfer_params` reach no worker on any path
//! (replicated, the conditional-disaggregation local path, the prompt-list local path,
//! P/D with a prefill worker that answers without params) — stripped, or refused with
//! a 400; the client's `Authorization` is never forwarded, the worker key is sent on
//! every upstream call; worker URLs with credentials are refused and no credential
//! shows in `/metrics` or the logs; and P/D mode with no prefill worker degrades to
//! decode-only answers (or a 503 with `--require-prefill`).
//!
//! A recording upstream written here (it records each call's path, `Authorization`
//! and body, and answers like a worker) stands in for workers where headers matter.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Server, default_model_present, free_port, metric_with, text_of};
use serde_json::{Value, json};

/// A secret passed to the spawned workers, for `--kv-port` once it needs one.
const KV_SECRET: (&str, &str) = ("TANDEM_KV_SECRET", "route-security-kv-secret-0123456789");

fn worker(extra: &[&str]) -> Server {
    let mut args = vec!["--threads", "1", "--kv-cache-memory", "128MiB"];
    args.extend_from_slice(extra);
    Server::start_with_env(&args, &[KV_SECRET])
}

/// A router over `workers` (flag, base URL) with `extra` flags, health checked every
/// 200 ms; waits until its `/health` answers 200.
async fn router(workers: &[(&str, String)], extra: &[&str]) -> Server {
    router_with_env(workers, extra, &[]).await
}

async fn router_with_env(
    workers: &[(&str, String)],
    extra: &[&str],
    env: &[(&str, &str)],
) -> Server {
    let router = unready_router(workers, extra, env);
    router.wait_for_health(200).await;
    router
}

fn unready_router(workers: &[(&str, String)], extra: &[&str], env: &[(&str, &str)]) -> Server {
    let mut args: Vec<String> = vec!["--health-interval-ms".into(), "200".into()];
    for (flag, url) in workers {
        args.push(format!("--{flag}"));
        args.push(url.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_router_with_env(&args, env)
}

/// Waits (bounded) until `/health` answers 200 `"degraded"`: no healthy prefill
/// worker, decode workers serving.
async fn wait_for_degraded(router: &Server) {
    for _ in 0..150 {
        let response = router.client.get(router.url("/health")).send().await;
        if let Ok(response) = response
            && response.status() == 200
            && let Ok(body) = response.json::<Value>().await
            && body["status"] == json!("degraded")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/health never said degraded");
}

/// A port that counts every connection made to it (the "server" a hostile client
/// names in `remote_host`/`remote_port`), closing each at once.
struct Trap {
    port: u16,
    connections: Arc<AtomicUsize>,
}

impl Trap {
    fn new() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                count.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Self { port, connections }
    }

    fn port(&self) -> u16 {
        self.port
    }

    /// `do_remote_prefill` params pointing at this port.
    fn params(&self) -> Value {
        json!({"do_remote_prefill": true, "do_remote_decode": false,
            "remote_host": "127.0.0.1", "remote_port": self.port(),
            "remote_engine_id": "hostile-engine", "remote_request_id": "hostile-request",
            "remote_block_ids": [[0, 1]]})
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn with_params(mut body: Value, params: &Value) -> Value {
    body["kv_transfer_params"] = params.clone();
    body
}

fn stripped(metrics: &str, action: &str) -> f64 {
    metric_with(
        metrics,
        "tandem_router_client_kv_transfer_params_total",
        &[("action", action)],
    )
    .unwrap_or(0.0)
}

fn decisions(metrics: &str, decision: &str, reason: &str) -> f64 {
    metric_with(
        metrics,
        "tandem_router_disagg_decisions_total",
        &[("decision", decision), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn client_kv_transfer_params_reach_no_worker_on_any_path() {
    if !default_model_present() {
        return;
    }
    // w can prefill for others (and so could hold blocks); p0 answers prefill legs
    // with `kv_transfer_params: null`.
    let (w, p0) = (worker(&["--kv-port", "0"]), worker(&[]));
    let trap = Trap::new();
    let hostile = trap.params();
    let (w_url, p0_url) = (w.url(""), p0.url(""));
    let replicated = router(&[("worker", w_url.clone())], &[]).await;
    let pd_workers = [("prefill", p0_url.clone()), ("decode", w_url.clone())];
    let conditional = router(&pd_workers, &["--local-prefill-threshold", "100000"]).await;
    let pd = router(&pd_workers, &[]).await;

    let one = json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0});
    let chat = json!({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4});
    let list = json!({"prompt": ["One", "Two"], "max_tokens": 2});
    let cases = [
        ("replicated", &replicated, "/v1/completions", &one),
        (
            "replicated chat",
            &replicated,
            "/v1/chat/completions",
            &chat,
        ),
        ("conditional local", &conditional, "/v1/completions", &one),
        ("prompt list", &pd, "/v1/completions", &list),
        ("P without params", &pd, "/v1/completions", &one),
        ("P without params, chat", &pd, "/v1/chat/completions", &chat),
    ];
    // Every path is tried before anything is asserted, so a failure names them all.
    let mut leaks = Vec::new();
    for (name, router, path, body) in cases {
        let (honest_status, honest) = router.post(path, body).await;
        assert_eq!(honest_status, 200, "{name}: {honest}");
        let before = trap.connections();
        let (status, answer) = router
            .post(path, &with_params(body.clone(), &hostile))
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await; // the trap's accept thread
        if trap.connections() != before {
            leaks.push(format!(
                "{name}: a worker connected to the client's address"
            ));
        }
        if status != 200 {
            leaks.push(format!("{name}: {status} {answer}"));
        } else if path == "/v1/completions" && name != "prompt list" {
            assert_eq!(text_of(&answer), text_of(&honest), "{name}: same answer");
        } else if name == "prompt list" {
            assert_eq!(answer["choices"].as_array().unwrap().len(), 2);
        }
    }
    assert!(leaks.is_empty(), "{leaks:#?}");
    let metrics = pd.metrics().await;
    assert_eq!(stripped(&metrics, "stripped"), 3.0, "{metrics}");
    assert_eq!(
        decisions(&metrics, "local", "prompt_list"),
        2.0,
        "{metrics}"
    );
    let fallbacks = metric_with(&metrics, "tandem_router_pd_fallbacks_total", &[]);
    assert_eq!(fallbacks, Some(4.0), "P answered without params: {metrics}");
    let metrics = conditional.metrics().await;
    assert_eq!(decisions(&metrics, "local", "below_threshold"), 2.0);
    assert_eq!(stripped(&replicated.metrics().await, "stripped"), 2.0);

    // A client's do_remote_decode would pin w's blocks for the lease time.
    let long = "Pinning blocks for a remote decode that never comes. ".repeat(20);
    let pin = json!({"prompt": long, "max_tokens": 1,
        "kv_transfer_params": {"do_remote_decode": true}});
    let (status, answer) = replicated.post("/v1/completions", &pin).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["kv_transfer_params"], Value::Null, "{answer}");
    let metrics = w.metrics().await;
    let held = metric_with(&metrics, "tandem:kv_blocks_held_for_remote", &[]);
    assert_eq!(
        held.unwrap_or(0.0),
        0.0,
        "the worker holds blocks: {metrics}"
    );

    // `reject`: a 400 naming the param, and still no connection.
    let rejecting = [
        router(
            &[("worker", w_url.clone())],
            &["--client-kv-transfer-params", "reject"],
        )
        .await,
        router(&pd_workers, &["--client-kv-transfer-params", "reject"]).await,
        router(
            &pd_workers,
            &[
                "--client-kv-transfer-params",
                "reject",
                "--local-prefill-threshold",
                "100000",
            ],
        )
        .await,
    ];
    for router in &rejecting {
        for (path, body) in [
            ("/v1/completions", &one),
            ("/v1/chat/completions", &chat),
            ("/v1/completions", &list),
        ] {
            let (status, answer) = router
                .post(path, &with_params(body.clone(), &hostile))
                .await;
            common::assert_error(status, &answer, 400);
            assert_eq!(answer["error"]["param"], json!("kv_transfer_params"));
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.contains("kv_transfer_params"), "{message}");
            let (status, _) = router.post(path, body).await;
            assert_eq!(status, 200, "honest requests pass");
        }
        let metrics = router.metrics().await;
        assert_eq!(stripped(&metrics, "rejected"), 3.0, "{metrics}");
    }
    assert_eq!(trap.connections(), 0, "reject: a worker connected");
}

/// One call a recording upstream received.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    authorization: Option<String>,
    body: Value,
}

/// What a prefill answer of the recording upstream carries; unknown keys included.
fn recorded_params() -> Value {
    json!({"do_remote_prefill": true, "do_remote_decode": false,
        "remote_block_ids": [[7, 8]], "remote_engine_id": "recorder",
        "remote_request_id": "rec-1", "remote_host": "127.0.0.1", "remote_port": 1,
        "tp_size": 1, "future_key": {"kept": true}})
}

/// A tiny worker look-alike on loopback that records what it gets, on its own thread
/// and runtime (the tests block while routers start).
struct Recorder {
    address: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    fn start() -> Self {
        Self::start_answering(true)
    }

    /// `hands_off`: whether prefill legs (`do_remote_decode`) are answered with
    /// `kv_transfer_params` ([`recorded_params`]) or with `null`.
    fn start_answering(hands_off: bool) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let record = seen.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let app =
                    axum::Router::new().fallback(
                        move |uri: axum::http::Uri,
                              headers: axum::http::HeaderMap,
                              body: axum::body::Bytes| {
                            let record = record.clone();
                            async move {
                                Recorder::answer(&record, hands_off, uri.path(), &headers, &body)
                            }
                        },
                    );
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        Self { address, seen }
    }

    fn answer(
        record: &Mutex<Vec<Seen>>,
        hands_off: bool,
        path: &str,
        headers: &axum::http::HeaderMap,
        body: &[u8],
    ) -> axum::Json<Value> {
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let authorization = headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        record.lock().unwrap().push(Seen {
            path: path.to_owned(),
            authorization,
            body: body.clone(),
        });
        let answer = match path {
            "/v1/models" => {
                json!({"object": "list", "data": [{"id": "recorded", "object": "model"}]})
            }
            "/health" => json!({}),
            _ => {
                let remote_decode = body["kv_transfer_params"]["do_remote_decode"] == json!(true);
                let params = if remote_decode && hands_off {
                    recorded_params()
                } else {
                    Value::Null
                };
                json!({"id": "cmpl-rec", "object": "text_completion", "model": "recorded",
                    "choices": [{"index": 0, "text": " recorded", "finish_reason": "length"}],
                    "kv_transfer_params": params})
            }
        };
        axum::Json(answer)
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn seen_at(&self, path: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.path == path).collect()
    }
}

/// Whether any call `recorder` got carries params other than the router's own
/// prefill-leg dict or [`recorded_params`] (the prefill answer relayed to decode).
fn foreign_params(recorder: &Recorder) -> Vec<Value> {
    let prefill_leg = json!({"do_remote_decode": true, "do_remote_prefill": false,
        "remote_engine_id": null, "remote_block_ids": null, "remote_host": null,
        "remote_port": null});
    recorder
        .seen()
        .into_iter()
        .filter_map(|call| call.body.get("kv_transfer_params").cloned())
        .filter(|params| *params != prefill_leg && *params != recorded_params())
        .collect()
}

#[tokio::test]
async fn client_kv_transfer_params_reach_no_recorded_worker_on_any_path() {
    let hostile = json!({"do_remote_prefill": true, "remote_host": "10.9.9.9",
        "remote_port": 5600, "remote_engine_id": "e", "remote_request_id": "r",
        "remote_block_ids": [[0, 1]]});
    let one = with_params(json!({"prompt": "Hi", "max_tokens": 2}), &hostile);
    let list = with_params(json!({"prompt": ["a", "b"], "max_tokens": 2}), &hostile);
    let chat = with_params(
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        &hostile,
    );
    let mut leaks = Vec::new();
    let mut check = |name: &str, recorders: &[&Recorder]| {
        for recorder in recorders {
            let foreign = foreign_params(recorder);
            if !foreign.is_empty() {
                leaks.push(format!("{name}: a worker got {foreign:?}"));
            }
        }
    };
    let a = Recorder::start();
    let replicated = router(&[("worker", a.url())], &[]).await;
    assert_eq!(replicated.post("/v1/completions", &one).await.0, 200);
    assert_eq!(replicated.post("/v1/chat/completions", &chat).await.0, 200);
    check("replicated", &[&a]);

    // A fresh pair of workers per path, so each path's calls are checked alone.
    let pair = || (Recorder::start(), Recorder::start());
    let pd_of = |p: &Recorder, d: &Recorder| [("prefill", p.url()), ("decode", d.url())];
    let (p, d) = pair();
    let conditional = router(&pd_of(&p, &d), &["--local-prefill-threshold", "100000"]).await;
    assert_eq!(conditional.post("/v1/completions", &one).await.0, 200);
    check("conditional local", &[&p, &d]);
    let (p, d) = pair();
    let pd = router(&pd_of(&p, &d), &[]).await;
    assert_eq!(pd.post("/v1/completions", &list).await.0, 200);
    check("prompt list", &[&p, &d]);
    let (p, d) = pair();
    let pd = router(&pd_of(&p, &d), &[]).await;
    assert_eq!(pd.post("/v1/chat/completions", &chat).await.0, 200);
    check("P/D with params from P", &[&p, &d]);
    let relayed = d.seen_at("/v1/chat/completions");
    assert_eq!(relayed[0].body["kv_transfer_params"], recorded_params());

    let (quiet_p, d2) = (Recorder::start_answering(false), Recorder::start());
    let pd_without_params = router(&[("prefill", quiet_p.url()), ("decode", d2.url())], &[]).await;
    assert_eq!(pd_without_params.post("/v1/completions", &one).await.0, 200);
    check("P without params", &[&quiet_p, &d2]);
    assert!(leaks.is_empty(), "{leaks:#?}");
}

const CLIENT_KEY: &str = "client-key-must-stay-home";
const ADMIN_TOKEN: &str = "admin-token-must-stay-home";
const WORKER_KEY: &str = "worker-key-for-upstream";

async fn call(router: &Server, path: &str, body: Option<&Value>) -> (u16, Value) {
    let request = match body {
        Some(body) => router.client.post(router.url(path)).json(body),
        None => router.client.get(router.url(path)),
    };
    let response = request.bearer_auth(CLIENT_KEY).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Every secret of these tests, none of which may show where the router talks.
fn assert_no_secret(text: &str, what: &str) {
    for secret in [CLIENT_KEY, ADMIN_TOKEN, WORKER_KEY, "pw-never-shown"] {
        assert!(!text.contains(secret), "{what} shows {secret}:\n{text}");
    }
}

#[tokio::test]
async fn workers_get_the_worker_key_and_never_the_clients() {
    let (a, p, d) = (Recorder::start(), Recorder::start(), Recorder::start());
    let keys = [
        "--api-key",
        CLIENT_KEY,
        "--admin-token",
        ADMIN_TOKEN,
        "--worker-api-key",
        WORKER_KEY,
    ];
    let debug_log = [("TANDEM_LOG", "debug")];
    let replicated = router_with_env(&[("worker", a.url())], &keys, &debug_log).await;
    // The worker key from the environment, for the P/D router.
    let env = [
        ("TANDEM_LOG", "debug"),
        ("TANDEM_WORKER_API_KEY", WORKER_KEY),
    ];
    let pd = router_with_env(
        &[("prefill", p.url()), ("decode", d.url())],
        &keys[..4],
        &env,
    )
    .await;
    let completion = json!({"prompt": "Hi", "max_tokens": 3,
        "kv_transfer_params": {"do_remote_prefill": true, "remote_host": "10.9.9.9"}});
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3});
    for router in [&replicated, &pd] {
        for (path, body) in [
            ("/v1/completions", &completion),
            ("/v1/chat/completions", &chat),
        ] {
            let (status, answer) = call(router, path, Some(body)).await;
            assert_eq!(status, 200, "{answer}");
        }
        let (status, models) = call(router, "/v1/models", None).await;
        assert_eq!(status, 200, "{models}");
        assert_eq!(models["data"][0]["id"], json!("recorded"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // a few health checks
    for (name, recorder) in [("worker", &a), ("prefill", &p), ("decode", &d)] {
        let seen = recorder.seen();
        for path in ["/health", "/v1/completions"] {
            assert!(seen.iter().any(|s| s.path == path), "{name}: no {path}");
        }
        for call in &seen {
            let expected = format!("Bearer {WORKER_KEY}");
            assert_eq!(
                call.authorization.as_deref(),
                Some(expected.as_str()),
                "{name}: {call:?}"
            );
        }
    }
    assert_eq!(a.seen_at("/v1/models").len(), 1);
    assert_eq!(d.seen_at("/v1/models").len(), 1, "decode workers first");
    // The client's params never arrive; the decode leg gets P's params verbatim.
    let prefill_legs = p.seen_at("/v1/completions");
    assert_eq!(
        prefill_legs[0].body["kv_transfer_params"]["remote_host"],
        Value::Null
    );
    assert_eq!(
        d.seen_at("/v1/completions")[0].body["kv_transfer_params"],
        recorded_params()
    );
    assert_eq!(
        a.seen_at("/v1/completions")[0]
            .body
            .get("kv_transfer_params"),
        None
    );

    // Without a worker key, nothing goes upstream; the client's key is not passed on.
    let bare = Recorder::start();
    let unkeyed = router(&[("worker", bare.url())], &keys[..2]).await;
    let (status, _) = call(&unkeyed, "/v1/completions", Some(&chat)).await;
    assert_eq!(status, 200);
    let (status, _) = call(&unkeyed, "/v1/models", None).await;
    assert_eq!(status, 200);
    // The health checker's first call may come after the two requests.
    for _ in 0..100 {
        if bare.seen_at("/health").is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let seen = bare.seen();
    assert!(seen.len() >= 3, "{seen:?}");
    assert!(seen.iter().all(|s| s.authorization.is_none()), "{seen:?}");

    for router in [&replicated, &pd, &unkeyed] {
        assert_no_secret(&router.metrics().await, "/metrics");
        assert_no_secret(&router.log().join("\n"), "the log");
    }
}

/// The stderr of `tandem route ARGS`, which must exit with an error within 10 s.
fn refused_route(args: &[&str]) -> String {
    let mut child = common::tandem()
        .args(["route", "--port", "0"])
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    for _ in 0..100 {
        if let Some(status) = child.try_wait().unwrap() {
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            assert!(!status.success(), "{stderr}");
            return stderr;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("tandem route {args:?} started instead of refusing");
}

#[tokio::test]
async fn worker_urls_with_credentials_are_refused_and_nothing_shows_a_secret() {
    // By flag: a config error that does not repeat the password.
    let stderr = refused_route(&["--worker", "http://user:pw-never-shown@127.0.0.1:9"]);
    assert!(stderr.contains("credentials"), "{stderr}");
    assert_no_secret(&stderr, "the refusal");
    // And in P/D mode, a decode URL.
    let stderr = refused_route(&[
        "--prefill",
        "http://127.0.0.1:9",
        "--decode",
        "http://pw-never-shown@127.0.0.1:10",
    ]);
    assert_no_secret(&stderr, "the refusal");

    // By the admin API: a 400 on `url`.
    let a = Recorder::start();
    let env = [("TANDEM_LOG", "debug"), ("TANDEM_API_KEY", CLIENT_KEY)];
    let r = router_with_env(
        &[("worker", a.url())],
        &["--admin-token", ADMIN_TOKEN],
        &env,
    )
    .await;
    let added = r
        .client
        .post(r.url("/workers"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"url": "http://user:pw-never-shown@127.0.0.1:9"}))
        .send()
        .await
        .unwrap();
    let status = added.status().as_u16();
    let answer: Value = added.json().await.unwrap();
    common::assert_error(status, &answer, 400);
    assert_eq!(answer["error"]["param"], json!("url"));
    assert_no_secret(&answer.to_string(), "the admin API's answer");
    let listed = r
        .client
        .get(r.url("/workers"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!listed.contains("pw-never-shown"), "{listed}");
    // A refused key, a refused admin call: still nothing in metrics or logs.
    let (status, _) = r
        .post("/v1/completions", &json!({"prompt": "x", "max_tokens": 1}))
        .await;
    assert_eq!(status, 401);
    let (status, _) = call(&r, "/v1/completions", Some(&json!({"prompt": "x"}))).await;
    assert_eq!(status, 200);
    assert_no_secret(&r.metrics().await, "/metrics");
    assert_no_secret(&r.log().join("\n"), "the log");
    // The --help output does not show keys taken from the environment either.
    let help = common::tandem()
        .args(["route", "--help"])
        .env("TANDEM_WORKER_API_KEY", WORKER_KEY)
        .env("TANDEM_API_KEY", CLIENT_KEY)
        .env("TANDEM_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert_no_secret(&String::from_utf8_lossy(&help.stdout), "--help");
}

#[tokio::test]
async fn with_no_prefill_worker_the_decode_worker_computes_the_prompt() {
    if !default_model_present() {
        return;
    }
    let d = worker(&[]);
    let dead_prefill = format!("http://127.0.0.1:{}", free_port());
    let workers = [("prefill", dead_prefill.clone()), ("decode", d.url(""))];
    // Health checks take the dead prefill worker out: no prefill worker available.
    let checked = router(&workers, &[]).await;
    wait_for_degraded(&checked).await;
    // Checked once at start only: it stays in selection and every call to it fails
    // to connect.
    let unchecked = {
        let mut args = workers
            .iter()
            .flat_map(|(flag, url)| [format!("--{flag}"), url.clone()])
            .collect::<Vec<_>>();
        args.extend(["--health-interval-ms".into(), "3600000".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let router = Server::start_router(&args);
        router.wait_for_health(200).await;
        router
    };
    let body = json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0});
    let (status, alone) = d.post("/v1/completions", &body).await;
    assert_eq!(status, 200);
    for (name, router) in [("unchecked", &unchecked), ("checked", &checked)] {
        for _ in 0..3 {
            let (status, answer) = router.post("/v1/completions", &body).await;
            assert_eq!(status, 200, "{name}: {answer}");
            assert_eq!(text_of(&answer), text_of(&alone), "{name}");
        }
        let metrics = router.metrics().await;
        let local = decisions(&metrics, "local", "no_prefill_worker");
        assert_eq!(local, 3.0, "{name}: {metrics}");
        assert_eq!(decisions(&metrics, "remote", "always"), 0.0, "{name}");
        let warnings = router
            .log()
            .iter()
            .filter(|l| l.contains("decode workers compute prompts"))
            .count();
        assert_eq!(warnings, 1, "{name}: one warning, not one per request");
    }

    // --require-prefill: a 503, as before, and /health says not ready.
    let strict = unready_router(&workers, &["--require-prefill"], &[]);
    strict.wait_for_health(503).await;
    let (status, answer) = strict.post("/v1/completions", &body).await;
    common::assert_error(status, &answer, 503);
}

/// Real workers started with `--api-key`, in P/D mode behind a router with its own
/// client key and `--worker-api-key`: clients holding the router's key are served
/// through the router, but that key opens no worker, and the worker key is what the
/// router presents on both legs.
#[tokio::test]
async fn keyed_workers_serve_the_router_and_refuse_its_clients_key() {
    if !default_model_present() {
        return;
    }
    let p = worker(&["--kv-port", "0", "--api-key", WORKER_KEY]);
    let d = worker(&["--api-key", WORKER_KEY]);
    let body = json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0});
    let post = |url: String, key: Option<&'static str>| {
        let client = reqwest::Client::new();
        let body = body.clone();
        async move {
            let mut request = client.post(url).json(&body);
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            let response = request.send().await.expect("an answer");
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    // The client's key opens no worker.
    for w in [&p, &d] {
        let (status, answer) = post(w.url("/v1/completions"), Some(CLIENT_KEY)).await;
        common::assert_error(status, &answer, 401);
    }
    let direct = post(d.url("/v1/completions"), Some(WORKER_KEY)).await;
    assert_eq!(direct.0, 200, "{}", direct.1);

    let router = router(
        &[("prefill", p.url("")), ("decode", d.url(""))],
        &["--api-key", CLIENT_KEY, "--worker-api-key", WORKER_KEY],
    )
    .await;
    let (status, answer) = post(router.url("/v1/completions"), None).await;
    common::assert_error(status, &answer, 401);
    let (status, answer) = post(router.url("/v1/completions"), Some(CLIENT_KEY)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(text_of(&answer), text_of(&direct.1));
    // The answer came through P and D: P leased, D pulled.
    let received = metric_with(
        &d.metrics().await,
        "tandem:kv_transfer_bytes_total",
        &[("direction", "received")],
    );
    assert!(received.is_some_and(|b| b > 0.0), "D pulled no KV");
}
