//! The online planner's slot budget under `tandem up`, with real workers: a standby
//! worker is started and joins the pool that misses its limit when no move can help,
//! after which the planner says the budget is spent; a worker the load leaves idle is
//! retired from the router and its process stopped, with every request answered
//! throughout.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::up::Up;
use common::{alive, default_model_present, free_port, metric_with, sse_payloads};
use serde_json::{Value, json};

const ADMIN: &str = "slots-admin-token";

/// Two `tandem up`s of three or four workers each would crowd a small machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A P/D topology of one-thread built-in workers, `(role, standby)` each, with the
/// planner on `planner` (TOML lines of `[router.planner]`); the workers' ports.
fn topology(
    dir: &std::path::Path,
    workers: &[(&str, bool)],
    planner: &str,
) -> (std::path::PathBuf, Vec<u16>) {
    let mut text = format!(
        "[router]\nport = {}\nextra_args = [\"--admin-token\", \"{ADMIN}\"]\n\n[router.planner]\n{planner}\n",
        free_port()
    );
    let mut ports = Vec::new();
    for (role, standby) in workers {
        let port = free_port();
        ports.push(port);
        text.push_str(&format!(
            "\n[[worker]]\nengine = \"builtin\"\nrole = \"{role}\"\nport = {port}\nkv_port = {}\n\
             kv_cache_memory = \"128MiB\"\nstandby = {standby}\n\
             extra_args = [\"--threads\", \"1\", \"--max-model-len\", \"512\"]\n",
            free_port()
        ));
    }
    let path = dir.join("slots.toml");
    std::fs::write(&path, text).unwrap();
    (path, ports)
}

async fn admin_get(client: &reqwest::Client, up: &Up, path: &str) -> Value {
    let response = client
        .get(format!("{}{path}", up.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// `(url, role)` of each worker the router lists.
async fn workers(client: &reqwest::Client, up: &Up) -> Vec<(String, String)> {
    common::listed_roles(&admin_get(client, up, "/workers").await)
}

/// Streams completions through the router from `clients` tasks until `stop`; the
/// number answered and every failure.
fn load(
    up: &Up,
    clients: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    let url = format!("{}/v1/completions", up.url);
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
                tokio::spawn(async move {
                    let (mut answered, mut failures) = (0, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let body = json!({"prompt": "Slots are where the planner starts workers",
                            "max_tokens": 20, "stream": true, "ignore_eos": true});
                        match client.post(&url).json(&body).send().await {
                            Ok(response) if response.status().is_success() => {
                                let text = response.text().await.unwrap_or_default();
                                let payloads = sse_payloads(&text);
                                if payloads.last().map(String::as_str) == Some("[DONE]") {
                                    answered += 1;
                                } else {
                                    failures.push(format!("cut short: {payloads:?}"));
                                }
                            }
                            Ok(response) => failures.push(format!(
                                "{}: {}",
                                response.status(),
                                response.text().await.unwrap_or_default()
                            )),
                            Err(err) => failures.push(err.to_string()),
                        }
                    }
                    (answered, failures)
                })
            })
            .collect();
        let mut total = (0, Vec::new());
        for task in tasks {
            let (answered, failures) = task.await.unwrap();
            total.0 += answered;
            total.1.extend(failures);
        }
        total
    })
}

/// Polls `check` every 250 ms until it gives a value, or fails after `limit`.
async fn wait_for<T, F: std::future::Future<Output = Option<T>>>(
    limit: Duration,
    what: &str,
    log: impl Fn() -> String,
    mut check: impl FnMut() -> F,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "{what} within {limit:?}; log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_worker_starts_for_the_pool_that_misses_then_the_budget_is_spent() {
    if !default_model_present() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // A TPOT limit no worker meets: the decode pool always misses, and the prefill
    // pool's one worker cannot be given.
    let (file, ports) = topology(
        dir.path(),
        &[("prefill", false), ("decode", false), ("decode", true)],
        "ttft = 1000.0\ntpot = 0.0001\ninterval_ms = 300\nwindow_secs = 10\nmin_samples = 4\n\
         confirm = 2\ncooldown_secs = 1",
    );
    let up = Up::start(&file, &[]);
    let client = reqwest::Client::new();
    let standby = format!("http://127.0.0.1:{}", ports[2]);
    assert_eq!(
        workers(&client, &up).await.len(),
        2,
        "the standby worker waits"
    );
    assert!(
        up.pid_of(ports[2]).is_none(),
        "the standby worker was started early"
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = load(&up, 2, stop.clone());

    let joined = wait_for(
        Duration::from_secs(120),
        "the standby worker joins",
        || up.log(),
        || {
            let (client, up, standby) = (&client, &up, &standby);
            async move {
                let listed = workers(client, up).await;
                listed
                    .iter()
                    .any(|(url, role)| *url == *standby && role == "decode")
                    .then_some(listed)
            }
        },
    )
    .await;
    assert_eq!(joined.len(), 3, "{joined:?}");
    let planner = wait_for(
        Duration::from_secs(60),
        "the planner says the budget is spent",
        || up.log(),
        || {
            let (client, up) = (&client, &up);
            async move {
                let planner = admin_get(client, up, "/planner").await;
                let spent = planner["decisions"].as_array().unwrap().iter().any(|d| {
                    d["action"] == "cannot_meet"
                        && d["detail"]
                            .as_str()
                            .unwrap()
                            .contains("3 of 3 slots are in use")
                });
                spent.then_some(planner)
            }
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, failures) = traffic.await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(answered >= 8, "{answered}");

    assert_eq!(planner["max_workers"], 3);
    assert!(planner["wanted"].is_null(), "{planner}");
    let starts: Vec<_> = planner["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["action"] == "start_decode")
        .collect();
    assert_eq!(starts.len(), 1, "one start, no flapping: {starts:?}");
    assert_eq!(starts[0]["worker"], standby.as_str());
    assert_eq!(starts[0]["moved"], true);
    assert!(up.pid_of(ports[2]).is_some_and(alive));
    assert!(
        up.log()
            .contains("joined the decode pool: the planner asked for it"),
        "{}",
        up.log()
    );
    let metrics = client
        .get(format!("{}/metrics", up.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric_with(
            &metrics,
            "tandem_router_planner_scale_total",
            &[("role", "decode"), ("action", "start"), ("outcome", "ok")]
        ),
        Some(1.0),
        "{metrics}"
    );
    // The joined worker serves decodes: its own metrics count generated tokens.
    let own = client
        .get(format!("{standby}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        common::metric_value(&own, "vllm:generation_tokens_total").is_some_and(|v| v > 0.0),
        "{own}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_worker_is_retired_and_its_process_stopped() {
    if !default_model_present() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // Limits far above anything measured: two prefill workers are one too many.
    let (file, ports) = topology(
        dir.path(),
        &[
            ("prefill", false),
            ("prefill", false),
            ("decode", false),
            ("decode", true),
        ],
        "ttft = 1000.0\ntpot = 1000.0\ninterval_ms = 300\nwindow_secs = 10\nmin_samples = 4\n\
         confirm = 2\ncooldown_secs = 1",
    );
    let up = Up::start(&file, &[]);
    let client = reqwest::Client::new();
    assert_eq!(workers(&client, &up).await.len(), 3);
    let pids: Vec<u32> = ports[..2]
        .iter()
        .map(|&p| up.pid_of(p).expect("started"))
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = load(&up, 2, stop.clone());

    let left = wait_for(
        Duration::from_secs(120),
        "a prefill worker retires",
        || up.log(),
        || {
            let (client, up) = (&client, &up);
            async move {
                let listed = workers(client, up).await;
                (listed.iter().filter(|(_, role)| role == "prefill").count() == 1).then_some(listed)
            }
        },
    )
    .await;
    let retired = ports[..2]
        .iter()
        .position(|p| !left.iter().any(|(url, _)| url.ends_with(&format!(":{p}"))))
        .expect("one of the two prefill workers left");
    // Its process goes a few seconds after its last request; requests keep flowing.
    wait_for(
        Duration::from_secs(60),
        "the retired worker's process stops",
        || up.log(),
        || {
            let pid = pids[retired];
            async move { (!alive(pid)).then_some(()) }
        },
    )
    .await;
    assert!(alive(pids[1 - retired]));
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, failures) = traffic.await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(answered >= 8, "{answered}");

    assert!(
        up.log().contains("stopped: the planner retired it"),
        "{}",
        up.log()
    );
    let planner = admin_get(&client, &up, "/planner").await;
    let stops: Vec<_> = planner["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["action"].as_str().unwrap().starts_with("stop_"))
        .collect();
    // One worker per pool is the floor: one stop, then nothing more to give back.
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert_eq!(stops[0]["action"], "stop_prefill");
    assert_eq!(stops[0]["moved"], true);
    assert_eq!(workers(&client, &up).await.len(), 2);
}
