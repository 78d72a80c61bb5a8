//! Dynamic membership end to end, with a real etcd (Debian's `etcd-server`), real
//! workers that register themselves (or through `tandem register`), and a real router
//! following the namespace: workers join on registering and leave on SIGTERM, on a
//! crash (within the lease's TTL) and on failing health; an etcd restart loses no
//! worker and no request; a restarted router rebuilds its pool; draining stops new
//! requests and lets running ones finish.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::etcd::{Etcd, etcd_present};
use common::{Server, default_model_present, metric_with, tandem};
use serde_json::{Value, json};

const TOKEN: &str = "admin-secret";
const TTL_SECS: u64 = 2;

fn registered_worker(etcd: &Etcd) -> Server {
    let address = etcd.address();
    let ttl = TTL_SECS.to_string();
    Server::start(&[
        "--threads",
        "1",
        "--discovery",
        &address,
        "--discovery-ttl-secs",
        &ttl,
    ])
}

fn discovering_router(etcd: &Etcd) -> Server {
    let address = etcd.address();
    Server::start_router(&[
        "--discovery",
        &address,
        "--admin-token",
        TOKEN,
        "--health-interval-ms",
        "200",
    ])
}

/// The router's workers: URL → draining.
async fn listed(router: &Server) -> Vec<(String, bool)> {
    let answer: Value = router
        .client
        .get(router.url("/workers"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("the router answers")
        .json()
        .await
        .expect("JSON");
    answer["workers"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|w| {
            let url = w["url"].as_str().unwrap().to_owned();
            (url, w["draining"].as_bool().unwrap())
        })
        .collect()
}

async fn lists(router: &Server, url: &str) -> bool {
    listed(router)
        .await
        .iter()
        .any(|(u, draining)| u == url && !draining)
}

/// Polls `check` every 20 ms until it holds; how long that took. Panics after
/// `limit` (a hang guard; the figures that matter are asserted by the callers).
async fn wait_for<F: AsyncFnMut() -> bool>(what: &str, limit: Duration, mut check: F) -> Duration {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check().await {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within {limit:?}");
}

async fn complete(router: &Server) -> u16 {
    let body = json!({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0});
    router.post("/v1/completions", &body).await.0
}

fn signal(server: &Server, name: &str) {
    let status = Command::new("kill")
        .args([name, &server.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

fn ready() -> bool {
    default_model_present() && etcd_present()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_join_on_registering_and_leave_on_sigterm_or_a_crash() {
    if !ready() {
        return;
    }
    let etcd = Etcd::start();
    let router = discovering_router(&etcd);
    assert_eq!(complete(&router).await, 503, "no worker yet");

    // `Server::start` returns once the worker listens, when it starts registering.
    let a = registered_worker(&etcd);
    let url_a = a.url("");
    let joined = wait_for("A joins", Duration::from_secs(10), async || {
        lists(&router, &url_a).await
    })
    .await;
    eprintln!("A took traffic {joined:?} after it started registering");
    assert!(joined < Duration::from_secs(1), "{joined:?}");
    assert_eq!(complete(&router).await, 200);

    let mut b = registered_worker(&etcd);
    let url_b = b.url("");
    wait_for("B joins", Duration::from_secs(10), async || {
        lists(&router, &url_b).await
    })
    .await;
    assert_eq!(etcd.keys("/tandem/default/workers/").await.len(), 2);

    // SIGTERM: the key is revoked before the worker drains, so it leaves at once.
    signal(&a, "-TERM");
    let left = wait_for("A leaves", Duration::from_secs(10), async || {
        !listed(&router).await.iter().any(|(u, _)| *u == url_a)
    })
    .await;
    eprintln!("A left {left:?} after SIGTERM");
    assert!(left < Duration::from_secs(TTL_SECS), "{left:?}");
    assert_eq!(complete(&router).await, 200, "B serves");

    // SIGKILL: nothing revokes the key; it expires with the lease.
    b.child.kill().unwrap();
    let killed = Instant::now();
    wait_for("B leaves", Duration::from_secs(15), async || {
        etcd.keys("/tandem/default/workers/").await.is_empty()
            && !listed(&router).await.iter().any(|(u, _)| *u == url_b)
    })
    .await;
    let gone = killed.elapsed();
    eprintln!("B left {gone:?} after SIGKILL (lease TTL {TTL_SECS} s)");
    // The lease runs TTL seconds from the last keep-alive (sent every third of it);
    // etcd checks expiries every half second, then the watch tells the router. A
    // loaded machine may add to that: a second of slack beyond it.
    assert!(
        gone <= Duration::from_millis(TTL_SECS * 1000 + 2000),
        "{gone:?}"
    );
    let metrics = router.metrics().await;
    let removed = metric_with(
        &metrics,
        "tandem_router_discovery_changes_total",
        &[("action", "remove")],
    );
    assert_eq!(removed, Some(2.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_restart_loses_no_worker_and_no_request() {
    if !ready() {
        return;
    }
    let mut etcd = Etcd::start();
    let router = discovering_router(&etcd);
    let a = registered_worker(&etcd);
    let url_a = a.url("");
    wait_for("A joins", Duration::from_secs(10), async || {
        lists(&router, &url_a).await
    })
    .await;

    // etcd away for longer than the lease's TTL, then back on the same data.
    etcd.kill();
    let down = Instant::now();
    let mut served = 0;
    while down.elapsed() < Duration::from_secs(TTL_SECS + 1) {
        assert_eq!(complete(&router).await, 200, "while etcd is down");
        assert!(lists(&router, &url_a).await, "A stays while etcd is down");
        served += 1;
    }
    etcd.restart();
    let up = Instant::now();
    while up.elapsed() < Duration::from_secs(TTL_SECS + 2) {
        assert_eq!(complete(&router).await, 200, "after etcd is back");
        assert!(lists(&router, &url_a).await, "A stays after etcd is back");
        served += 1;
    }
    assert!(served > 0);
    let keys = etcd.keys("/tandem/default/workers/").await;
    assert_eq!(keys.len(), 1, "A's key survived or came back: {keys:?}");

    // The router's watch resumed: a worker registering now joins.
    let b = registered_worker(&etcd);
    let url_b = b.url("");
    wait_for(
        "B joins after the restart",
        Duration::from_secs(10),
        async || lists(&router, &url_b).await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_router_rebuilds_its_pool_from_etcd() {
    if !ready() {
        return;
    }
    let etcd = Etcd::start();
    let (a, b) = (registered_worker(&etcd), registered_worker(&etcd));
    let first = discovering_router(&etcd);
    let both = async || listed(&first).await.len() == 2;
    wait_for("the first router lists both", Duration::from_secs(10), both).await;
    drop(first);
    let second = discovering_router(&etcd);
    wait_for(
        "the second router lists both",
        Duration::from_secs(10),
        async || lists(&second, &a.url("")).await && lists(&second, &b.url("")).await,
    )
    .await;
    assert_eq!(complete(&second).await, 200);
}

/// `tandem register` for a worker that does not register itself.
fn sidecar(etcd: &Etcd, url: &str) -> Child {
    let address = etcd.address();
    let ttl = TTL_SECS.to_string();
    tandem()
        .args(["register", "--url", url, "--discovery", &address])
        .args(["--discovery-ttl-secs", &ttl, "--health-interval-ms", "200"])
        .args(["--health-failures", "3"])
        .stderr(Stdio::inherit())
        .spawn()
        .expect("tandem register starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tandem_register_keeps_a_worker_listed_while_it_is_healthy() {
    if !ready() {
        return;
    }
    let etcd = Etcd::start();
    let router = discovering_router(&etcd);
    let mut plain = Server::start(&["--threads", "1"]);
    let url = plain.url("");
    let mut register = sidecar(&etcd, &url);
    wait_for("the worker joins", Duration::from_secs(10), async || {
        lists(&router, &url).await
    })
    .await;
    assert_eq!(complete(&router).await, 200);

    // The worker dies; the sidecar lives on and deregisters it after 3 failed checks.
    plain.child.kill().unwrap();
    let died = Instant::now();
    wait_for("the worker leaves", Duration::from_secs(10), async || {
        etcd.keys("/tandem/default/workers/").await.is_empty()
    })
    .await;
    assert!(
        died.elapsed() < Duration::from_secs(TTL_SECS),
        "deregistered, not expired"
    );
    assert!(
        register.try_wait().unwrap().is_none(),
        "the sidecar keeps running"
    );
    let _ = register.kill();
    let _ = register.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_stops_new_requests_and_lets_running_ones_finish() {
    if !default_model_present() {
        return;
    }
    let (a, b) = (
        Server::start(&["--threads", "1"]),
        Server::start(&["--threads", "1"]),
    );
    let (url_a, url_b) = (a.url(""), b.url(""));
    let router = Server::start_router(&[
        "--worker",
        &url_a,
        "--worker",
        &url_b,
        "--admin-token",
        TOKEN,
    ]);
    // A long stream on one of them; which one, the router's in-flight gauge says.
    let body = json!({"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0,
        "ignore_eos": true, "stream": true});
    let stream = router
        .client
        .post(router.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let metrics = router.metrics().await;
    let in_flight = |url: &str| {
        metric_with(
            &metrics,
            "tandem_router_worker_in_flight",
            &[("worker", url)],
        )
    };
    let (busy, idle) = if in_flight(&url_a) == Some(1.0) {
        (url_a.clone(), url_b.clone())
    } else {
        (url_b.clone(), url_a.clone())
    };
    let encoded: String = busy
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect();
    let drained = router
        .client
        .post(router.url(&format!("/workers/{encoded}/drain")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 202);
    let calls = |metrics: &str, url: &str| {
        let labels = [("worker", url), ("leg", "whole"), ("outcome", "ok")];
        metric_with(metrics, "tandem_router_worker_requests_total", &labels).unwrap_or(0.0)
    };
    let before = calls(&router.metrics().await, &busy);
    for _ in 0..4 {
        assert_eq!(complete(&router).await, 200);
    }
    let metrics = router.metrics().await;
    assert_eq!(
        calls(&metrics, &busy),
        before,
        "no new request to the drained worker"
    );
    assert!(calls(&metrics, &idle) >= 4.0, "{metrics}");
    // The stream that was running finishes whole.
    let text = stream.text().await.unwrap();
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(
        listed(&router).await.contains(&(busy, true)),
        "listed, draining"
    );
}
