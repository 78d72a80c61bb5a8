//! The online planner and worker moves on a real P/D router over real `tandem serve`
//! workers: a pool that misses its limit gets a worker from the pool with room (after
//! confirmation), every request answered throughout; once no move can help, the
//! planner says so (log, journal, metrics) and stops moving. Prompts queued past the
//! TTFT limit count as misses while they wait; a move that would fill the giving pool's
//! KV caches waits. An admin move waits for the worker's
//! stream to finish before the worker changes pool; bad moves are refused.

mod common;

use std::time::{Duration, Instant};

use common::{Server, assert_error, default_model_present, metric_with, sse_payloads};
use serde_json::{Value, json};

const ADMIN: &str = "admin-secret";

fn worker() -> Server {
    Server::start(&["--threads", "1", "--kv-port", "0", "--max-model-len", "512"])
}

fn encoded(url: &str) -> String {
    url.replace(':', "%3A").replace('/', "%2F")
}

async fn admin_get(router: &Server, path: &str) -> (u16, Value) {
    let response = router
        .client
        .get(router.url(path))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn admin_move(router: &Server, url: &str, body: &Value) -> (u16, Value) {
    let response = router
        .client
        .post(router.url(&format!("/workers/{}/move", encoded(url))))
        .bearer_auth(ADMIN)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The role of each listed worker, by URL.
async fn roles(router: &Server) -> Vec<(String, String)> {
    let (status, listed) = admin_get(router, "/workers").await;
    assert_eq!(status, 200, "{listed}");
    common::listed_roles(&listed)
}

/// One streamed completion through the router; its `data:` payloads.
async fn streamed(router: &Server, max_tokens: u32) -> Result<Vec<String>, String> {
    streamed_prompt(router, "The planner moves workers between", max_tokens).await
}

async fn streamed_prompt(
    router: &Server,
    prompt: &str,
    max_tokens: u32,
) -> Result<Vec<String>, String> {
    let body = json!({"prompt": prompt, "max_tokens": max_tokens,
        "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true});
    let response = router
        .client
        .post(router.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let text = response.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {text}"));
    }
    Ok(sse_payloads(&text))
}

/// A P/D router over `prefill` and `decode` with the `[planner]` settings given (the
/// folder holds its config file).
fn planner_router(
    planner: &str,
    prefill: &[&Server],
    decode: &[&Server],
) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("router.toml");
    std::fs::write(&config, format!("[planner]\n{planner}")).unwrap();
    let mut args = vec![
        "--config".to_owned(),
        config.to_str().unwrap().to_owned(),
        "--admin-token".to_owned(),
        ADMIN.to_owned(),
    ];
    for (flag, workers) in [("--prefill", prefill), ("--decode", decode)] {
        for worker in workers {
            args.extend([flag.to_owned(), worker.url("")]);
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (Server::start_router(&args), dir)
}

/// The number of tokens a streamed completion sent (its usage chunk's count: a sampled
/// byte token can share a text chunk with the next), checking it ended properly.
fn tokens_of(payloads: &[String]) -> usize {
    assert_eq!(
        payloads.last().map(String::as_str),
        Some("[DONE]"),
        "{payloads:?}"
    );
    payloads
        .iter()
        .filter(|p| p.as_str() != "[DONE]")
        .map(|p| serde_json::from_str::<Value>(p).unwrap())
        .find_map(|event| event["usage"]["completion_tokens"].as_u64())
        .unwrap_or_else(|| panic!("no usage chunk: {payloads:?}")) as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_planner_moves_a_worker_to_the_missing_pool_then_says_it_cannot_do_more() {
    if !default_model_present() {
        return;
    }
    let (p1, p2, d1) = (worker(), worker(), worker());
    // A TPOT limit no worker meets and a TTFT limit every request meets: the decode
    // pool misses, the prefill pool has room, so one prefill worker must move; after
    // that the prefill pool has none to give.
    let (router, _config) = planner_router(
        "ttft_secs = 1000.0\ntpot_secs = 0.0001\ninterval_ms = 300\n\
         window_secs = 60\nmin_samples = 4\nconfirm = 2\ncooldown_secs = 1\n",
        &[&p1, &p2],
        &[&d1],
    );

    let started = Instant::now();
    let mut answered = 0;
    let decisions = loop {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "the planner never concluded"
        );
        let batch: Vec<_> = (0..4)
            .map(|_| {
                let router = &router;
                async move { streamed(router, 6).await }
            })
            .collect();
        for result in futures_util::future::join_all(batch).await {
            let payloads = result.expect("every request is answered, during moves too");
            assert_eq!(tokens_of(&payloads), 6);
            answered += 1;
        }
        let (status, journal) = admin_get(&router, "/planner").await;
        assert_eq!(status, 200, "{journal}");
        let decisions = journal["decisions"].as_array().unwrap().clone();
        if decisions.iter().any(|d| d["action"] == "cannot_meet") {
            break decisions;
        }
    };
    let actions: Vec<&str> = decisions
        .iter()
        .map(|d| d["action"].as_str().unwrap())
        .collect();
    let moves: Vec<&Value> = decisions
        .iter()
        .filter(|d| d["action"] == "move_to_decode")
        .collect();
    assert_eq!(moves.len(), 1, "{actions:?}");
    assert_eq!(moves[0]["moved"], true, "{}", moves[0]);
    assert!(
        moves[0]["detail"].as_str().unwrap().contains("TPOT p90"),
        "{}",
        moves[0]
    );
    assert!(!actions.contains(&"move_to_prefill"), "{actions:?}");
    let first_move = actions.iter().position(|a| *a == "move_to_decode").unwrap();
    assert!(actions[..first_move].contains(&"confirming"), "{actions:?}");
    let unmet = decisions
        .iter()
        .find(|d| d["action"] == "cannot_meet")
        .unwrap();
    assert!(
        unmet["detail"]
            .as_str()
            .unwrap()
            .contains("the prefill pool has 1 worker(s) to give"),
        "{unmet}"
    );
    assert_eq!(
        (
            unmet["prefill_workers"].as_u64(),
            unmet["decode_workers"].as_u64()
        ),
        (Some(1), Some(2))
    );

    let listed = roles(&router).await;
    let count = |role: &str| listed.iter().filter(|(_, r)| r == role).count();
    assert_eq!((count("prefill"), count("decode")), (1, 2), "{listed:?}");
    let metrics = router.metrics().await;
    let moved = [("role", "decode"), ("outcome", "ok")];
    assert_eq!(
        metric_with(&metrics, "tandem_router_planner_moves_total", &moved),
        Some(1.0)
    );
    let unmet_count = [("action", "cannot_meet")];
    assert!(
        metric_with(
            &metrics,
            "tandem_router_planner_decisions_total",
            &unmet_count
        ) >= Some(1.0)
    );
    let pool = [("role", "decode")];
    assert_eq!(
        metric_with(&metrics, "tandem_router_planner_pool_workers", &pool),
        Some(2.0)
    );
    let log = router.log().join("\n");
    assert!(
        log.contains("planner: move a worker prefill → decode"),
        "{log}"
    );
    assert!(log.contains("planner: the SLO cannot be met"), "{log}");
    assert!(answered >= 8);
}

/// A streamed completion of a ~450-token prompt (one prefill step on a 1-thread worker
/// takes a good part of a second); the tokens it was answered with.
async fn long_prompt(router: &Server) -> Result<usize, String> {
    let prompt = "Requests queue behind a busy prefill worker. ".repeat(50);
    Ok(tokens_of(&streamed_prompt(router, &prompt, 4).await?))
}

/// Four short streamed answers: TTFT and TPOT samples well within any test's limits.
async fn warm_up(router: &Server) {
    for _ in 0..4 {
        let payloads = streamed(router, 6).await.expect("warm-up answered");
        assert_eq!(tokens_of(&payloads), 6);
    }
}

/// Sends a backlog of 12 long prompts at once and watches the planner's journal until
/// `seen` holds for its verdicts (or two minutes pass); checks that every prompt was
/// answered and returns the verdicts as last watched.
async fn backlog_watched(router: &Server, seen: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let backlog: Vec<_> = (0..12).map(|_| long_prompt(router)).collect();
    let watch = async {
        let started = Instant::now();
        loop {
            let decisions = decisions(router).await;
            if seen(&decisions) || started.elapsed() > Duration::from_secs(120) {
                return decisions;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (answers, decisions) = tokio::join!(futures_util::future::join_all(backlog), watch);
    for answer in answers {
        assert_eq!(answer.expect("every queued prompt is answered"), 4);
    }
    decisions
}

/// The journal's verdicts since the router started.
async fn decisions(router: &Server) -> Vec<Value> {
    let (status, journal) = admin_get(router, "/planner").await;
    assert_eq!(status, 200, "{journal}");
    journal["decisions"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prompts_queued_past_the_ttft_limit_move_a_worker_while_they_wait() {
    if !default_model_present() {
        return;
    }
    let (p1, d1, d2) = (worker(), worker(), worker());
    // Every answer's TPOT meets its limit; a backlog of long prompts on the one prefill
    // worker passes the TTFT limit while it waits. The window starts empty of TTFT
    // misses: the short warm-up prompts are answered well within it.
    let (router, _config) = planner_router(
        "ttft_secs = 0.8\ntpot_secs = 1000.0\ninterval_ms = 200\n\
         window_secs = 60\nmin_samples = 4\nconfirm = 2\ncooldown_secs = 1\n",
        &[&p1],
        &[&d1, &d2],
    );
    warm_up(&router).await;
    let decisions = backlog_watched(&router, |decisions| {
        decisions.iter().any(|d| d["action"] == "move_to_prefill")
    })
    .await;
    let actions: Vec<&str> = decisions
        .iter()
        .map(|d| d["action"].as_str().unwrap())
        .collect();
    let moved = decisions
        .iter()
        .find(|d| d["action"] == "move_to_prefill")
        .unwrap_or_else(|| panic!("no move to prefill: {actions:?}"));
    assert!(
        moved["detail"].as_str().unwrap().contains("TTFT p90"),
        "{moved}"
    );
    // Waiting prompts counted: some verdict up to the move saw prompts past the limit
    // that had not been answered yet.
    let waited = decisions
        .iter()
        .filter(|d| d["waiting_past_ttft"].as_u64() > Some(0))
        .count();
    assert!(waited >= 1, "{decisions:?}");
    let listed = roles(&router).await;
    let count = |role: &str| listed.iter().filter(|(_, r)| r == role).count();
    assert_eq!((count("prefill"), count("decode")), (2, 1), "{listed:?}");
}

/// Whether a verdict was held back by the giving pool's KV caches.
fn kv_held(decision: &Value) -> bool {
    decision["detail"]
        .as_str()
        .unwrap()
        .contains("KV caches would be")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_that_would_fill_the_giving_pools_kv_caches_waits() {
    if !default_model_present() {
        return;
    }
    // Decode workers with 64 KV blocks of 16 positions (SmolLM2-135M: 30 layers × 3 KV
    // heads × 64 × K and V × 2 bytes = 23,040 bytes a position).
    let small_cache = [
        "--threads",
        "1",
        "--kv-port",
        "0",
        "--max-model-len",
        "512",
        "--kv-cache-memory",
        "23592960",
    ];
    let (p1, d1, d2) = (
        worker(),
        Server::start(&small_cache),
        Server::start(&small_cache),
    );
    // As the backlog test above, whose layout moves a decode worker to prefill; here the
    // decode caches are held past kv_headroom's share (halved by a move) by long answers.
    let (router, _config) = planner_router(
        "ttft_secs = 0.8\ntpot_secs = 1000.0\ninterval_ms = 200\n\
         window_secs = 60\nmin_samples = 4\nconfirm = 2\ncooldown_secs = 1\n\
         kv_headroom = 0.2\n",
        &[&p1],
        &[&d1, &d2],
    );
    warm_up(&router).await;
    // The router reads both pools' KV usage from the workers: near idle (the last
    // verdict may have seen a warm-up's blocks).
    let idle = decisions(&router).await;
    let last = idle.last().expect("a verdict every 200 ms");
    for pool in ["kv_usage_decode", "kv_usage_prefill"] {
        assert!(last[pool].as_f64().is_some_and(|u| u < 0.05), "{last}");
    }
    // Four long answers (~26 blocks each, two per decode worker: ~80% of their caches
    // at the end) hold the decode caches while a backlog builds on the prefill worker.
    let long_answers: Vec<_> = (0..4)
        .map(|_| {
            let router = &router;
            async move { streamed(router, 400).await.map(|p| tokens_of(&p)) }
        })
        .collect();
    let scenario = async {
        let started = Instant::now();
        // Past 10% full (20% with one worker fewer): the backlog starts.
        loop {
            let filling = decisions(&router).await;
            let usage = filling.last().unwrap()["kv_usage_decode"].as_f64();
            if usage.is_some_and(|u| u > 0.1) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the decode caches never filled: {filling:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        backlog_watched(&router, |decisions| {
            decisions.iter().any(|d| {
                d["action"] == "move_to_prefill" || (d["action"] == "no_room" && kv_held(d))
            })
        })
        .await
    };
    let (answers, decisions) = tokio::join!(futures_util::future::join_all(long_answers), scenario);
    for answer in answers {
        assert_eq!(answer.expect("every long answer is finished"), 400);
    }
    let actions: Vec<&str> = decisions
        .iter()
        .map(|d| d["action"].as_str().unwrap())
        .collect();
    let first_held = decisions
        .iter()
        .position(|d| d["action"] == "no_room" && kv_held(d))
        .unwrap_or_else(|| panic!("no verdict held back by the KV caches: {actions:?}"));
    let held = &decisions[first_held];
    let detail = held["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("prefill misses, but the decode pool's KV caches would be"),
        "{detail}"
    );
    assert!(
        held["kv_usage_decode"].as_f64().unwrap() * 2.0 > 0.2,
        "{held}"
    );
    assert!(
        !actions[..first_held].contains(&"move_to_prefill"),
        "{actions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admin_move_waits_for_the_stream_then_changes_the_pool() {
    if !default_model_present() {
        return;
    }
    let (p1, d1, d2) = (worker(), worker(), worker());
    let router = Server::start_router(&[
        "--admin-token",
        ADMIN,
        "--prefill",
        &p1.url(""),
        "--decode",
        &d1.url(""),
        "--decode",
        &d2.url(""),
    ]);
    let (status, body) = admin_get(&router, "/planner").await;
    assert_error(status, &body, 404);

    // A long stream on one decode worker; that worker is asked to move meanwhile.
    let stream = {
        let router_url = router.url("");
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let body = json!({"prompt": "Count slowly:", "max_tokens": 48, "stream": true,
                "stream_options": {"include_usage": true}, "ignore_eos": true});
            let text = client
                .post(format!("{router_url}/v1/completions"))
                .json(&body)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            (Instant::now(), sse_payloads(&text))
        })
    };
    let busy = loop {
        let (_, listed) = admin_get(&router, "/workers").await;
        let busy = listed["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["role"] == "decode" && w["in_flight"].as_u64().unwrap_or(0) > 0);
        if let Some(busy) = busy {
            break busy["url"].as_str().unwrap().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (status, moved) = admin_move(&router, &busy, &json!({"role": "prefill"})).await;
    let moved_at = Instant::now();
    assert_eq!(status, 200, "{moved}");
    assert_eq!(moved["role"], "prefill");
    let (ended_at, payloads) = stream.await.unwrap();
    assert_eq!(tokens_of(&payloads), 48, "the stream finished whole");
    assert!(ended_at <= moved_at, "the move waited for the stream");
    let listed = roles(&router).await;
    assert!(
        listed.contains(&(busy.clone(), "prefill".into())),
        "{listed:?}"
    );
    // The moved worker now takes prefill legs: requests still complete.
    for _ in 0..3 {
        assert_eq!(tokens_of(&streamed(&router, 4).await.unwrap()), 4);
    }

    // Refusals: no such pool, already there, unknown worker, no token.
    let (status, body) = admin_move(&router, &busy, &json!({"role": "both"})).await;
    assert_error(status, &body, 400);
    let (status, body) = admin_move(&router, &busy, &json!({"role": "prefill"})).await;
    assert_error(status, &body, 409);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is not a decode worker"),
        "{body}"
    );
    let (status, body) =
        admin_move(&router, "http://127.0.0.1:1", &json!({"role": "decode"})).await;
    assert_error(status, &body, 404);
    let (status, body) = admin_move(&router, &busy, &json!({"role": "decode", "now": true})).await;
    assert_error(status, &body, 400);
    let unauthorized = router
        .client
        .post(router.url(&format!("/workers/{}/move", encoded(&busy))))
        .json(&json!({"role": "decode"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
}

/// A worker registered in etcd as prefill: it may become a decode worker.
fn registered(etcd: &common::etcd::Etcd, role: &str) -> Server {
    Server::start(&[
        "--threads",
        "1",
        "--kv-port",
        "0",
        "--max-model-len",
        "512",
        "--discovery",
        &etcd.address(),
        "--discovery-ttl-secs",
        "2",
        "--role",
        role,
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discovered_workers_move_and_leave_from_the_pool_they_were_moved_to() {
    if !default_model_present() || !common::etcd::etcd_present() {
        return;
    }
    let etcd = common::etcd::Etcd::start();
    let router = Server::start_router(&[
        "--discovery",
        &etcd.address(),
        "--discovery-disaggregated",
        "--admin-token",
        ADMIN,
        "--planner",
        "--planner-interval-ms",
        "200",
        "--health-interval-ms",
        "200",
    ]);
    let mut moving = registered(&etcd, "prefill");
    let _prefill = registered(&etcd, "prefill");
    let _decode = registered(&etcd, "decode");
    let started = Instant::now();
    while roles(&router).await.len() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            roles(&router).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = moving.url("");
    let url = url.trim_end_matches('/');
    let (status, moved) = admin_move(&router, url, &json!({"role": "decode"})).await;
    assert_eq!(status, 200, "{moved}");
    let listed = roles(&router).await;
    let count = |role: &str| listed.iter().filter(|(_, r)| r == role).count();
    assert_eq!((count("prefill"), count("decode")), (1, 2), "{listed:?}");
    assert_eq!(tokens_of(&streamed(&router, 4).await.unwrap()), 4);

    // Its key goes (SIGTERM deregisters): it leaves the decode pool it was moved to.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &moving.pid().to_string()])
        .status();
    let _ = moving.child.wait();
    let started = Instant::now();
    loop {
        let listed = roles(&router).await;
        if !listed.iter().any(|(u, _)| u == url) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still listed: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(roles(&router).await.len(), 2);
    assert_eq!(tokens_of(&streamed(&router, 4).await.unwrap()), 4);
}
