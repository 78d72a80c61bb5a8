//! The router's `/dashboard` in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, driven over WebDriver): behind the admin token it asks for the
//! token, then shows the P/D workers of a running router with no page error; its
//! charts move while `tandem bench` loads the router; a killed worker's row turns
//! unhealthy within the health interval. With `TANDEM_DASHBOARD_SCREENSHOT=FILE` it
//! also saves a screenshot of the page under load.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, default_model_present, free_port, metric_value, tandem};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const ADMIN: &str = "dashboard-admin-token";

/// Whether chromedriver is installed; without it the test skips, unless
/// `TANDEM_REQUIRE_CHROMIUM=1` (CI).
fn chromedriver_present() -> bool {
    common::program_present(
        "chromedriver",
        "TANDEM_REQUIRE_CHROMIUM",
        "install Debian's chromium and chromium-driver",
    )
}

/// chromedriver on loopback, stopped on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> Driver {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let started = Instant::now();
        while reqwest::get(format!("{}/status", driver.url))
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "chromedriver never listened"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        driver
    }

    async fn browser(&self) -> Client {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--window-size=1400,1000"]}),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

async fn page_state(browser: &Client) -> Value {
    browser
        .execute(
            "return {
                errors: window.__dashboardErrors,
                snapshots: window.__snapshots,
                status: document.getElementById('status').textContent,
                login: document.getElementById('login').classList.contains('shown'),
                rows: [...document.querySelectorAll('#workers tr')].map(r => ({
                    url: r.dataset.workerUrl, role: r.dataset.role, healthy: r.dataset.healthy })),
                points: Object.fromEntries([...document.querySelectorAll('svg[id^=chart-]')]
                    .map(s => [s.id, Number(s.dataset.points)])),
                rps: document.getElementById('t-rps').textContent,
            };",
            vec![],
        )
        .await
        .unwrap()
}

/// Polls the page until `check` holds, or fails after `limit` with the page's state.
async fn until(
    browser: &Client,
    limit: Duration,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        let state = page_state(browser).await;
        assert_eq!(state["errors"], json!([]), "page errors: {state}");
        if check(&state) {
            return state;
        }
        assert!(
            started.elapsed() < limit,
            "{what} within {limit:?}: {state}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_the_workers_moves_under_load_and_sees_a_worker_die() {
    if !default_model_present() || !chromedriver_present() {
        return;
    }
    let prefill = Server::start(&[
        "--threads",
        "1",
        "--kv-port",
        "0",
        "--kv-cache-memory",
        "128MiB",
    ]);
    let decode = Server::start(&[
        "--threads",
        "1",
        "--kv-port",
        "0",
        "--kv-cache-memory",
        "128MiB",
    ]);
    let (prefill_url, decode_url) = (prefill.url(""), decode.url(""));
    let router = Server::start_router(&[
        "--prefill",
        &prefill_url,
        "--decode",
        &decode_url,
        "--admin-token",
        ADMIN,
        "--health-interval-ms",
        "300",
        "--planner",
    ]);
    let driver = Driver::start().await;
    let browser = driver.browser().await;

    // Without the token the stream is refused and the page asks for it.
    browser.goto(&router.url("/dashboard")).await.unwrap();
    until(&browser, Duration::from_secs(20), "the token form", |s| {
        s["login"] == true
    })
    .await;
    let field = browser.find(Locator::Id("token")).await.unwrap();
    field.send_keys(ADMIN).await.unwrap();
    browser
        .find(Locator::Css("#login-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let state = until(
        &browser,
        Duration::from_secs(20),
        "both workers listed",
        |s| s["rows"].as_array().is_some_and(|rows| rows.len() == 2),
    )
    .await;
    let roles: Vec<(String, String)> = state["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["url"].as_str().unwrap().to_owned(),
                r["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        roles.contains(&(prefill_url.clone(), "prefill".into())),
        "{roles:?}"
    );
    assert!(
        roles.contains(&(decode_url.clone(), "decode".into())),
        "{roles:?}"
    );
    assert_eq!(state["status"], "live");

    // Load from `tandem bench`: the request-rate and latency charts gain points.
    let idle = page_state(&browser).await;
    // A longer load when a screenshot is wanted, so the page is caught under it.
    let screenshot = std::env::var("TANDEM_DASHBOARD_SCREENSHOT").ok();
    let prompts = if screenshot.is_some() { "400" } else { "60" };
    let mut bench = tandem()
        .args([
            "bench",
            "--url",
            &router.url(""),
            "--workload",
            "random",
            "--input-len",
            "64",
            "--output-len",
            "24",
            "--num-prompts",
            prompts,
            "--max-concurrency",
            "4",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let loaded = until(
        &browser,
        Duration::from_secs(60),
        "the charts move under load",
        |s| {
            s["points"]["chart-ttft"].as_u64() > idle["points"]["chart-ttft"].as_u64()
                && s["points"]["chart-tpot"].as_u64().unwrap_or(0) > 0
                && s["rps"].as_str().is_some_and(|r| r != "–" && r != "0.00")
        },
    )
    .await;
    assert!(loaded["snapshots"].as_u64().unwrap() >= 2, "{loaded}");
    // The router times each snapshot it builds (what the live view costs it).
    let built = metric_value(
        &router.metrics().await,
        "tandem_router_dashboard_snapshot_seconds_count",
    );
    assert!(built.is_some_and(|n| n >= 2.0), "{built:?}");
    if let Some(path) = screenshot {
        tokio::time::sleep(Duration::from_secs(25)).await;
        std::fs::write(path, browser.screenshot().await.unwrap()).unwrap();
    }
    let _ = bench.wait();

    // A dead worker's row turns unhealthy within the health checks' interval.
    drop(decode);
    let killed = Instant::now();
    until(
        &browser,
        Duration::from_secs(10),
        "the killed worker's row unhealthy",
        |s| {
            s["rows"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["url"] == decode_url.as_str() && r["healthy"] == "false")
        },
    )
    .await;
    eprintln!(
        "the row turned unhealthy {:?} after the kill",
        killed.elapsed()
    );
    browser.close().await.unwrap();
}
