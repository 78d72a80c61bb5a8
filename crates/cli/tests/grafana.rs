//! `deploy/grafana/tandem.json` against the real thing: the dashboard is well formed
//! (panels, grid, data source, unique ids), and on a running topology — `tandem up`
//! with the planner, its `--prometheus-config` loaded by a real Prometheus that
//! scrapes the router and the workers while requests flow — every panel's query is
//! valid PromQL that Prometheus evaluates, and every metric it names is one that a
//! real `/metrics` exposes: the router's or a tandem worker's live, or vLLM 0.26's
//! recorded exposition (its NIXL series, which only vLLM has).

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::up::Up;
use common::{default_model_present, free_port};
use serde_json::{Value, json};

fn repo_file(path: &str) -> String {
    format!("{}/../../{path}", env!("CARGO_MANIFEST_DIR"))
}

fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo_file("deploy/grafana/tandem.json")).unwrap())
        .unwrap()
}

/// Every `expr` of the dashboard's panels.
fn queries(dashboard: &Value) -> Vec<String> {
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect()
}

/// The metric names a query reads (tandem's and vLLM's prefixes).
fn metric_names(query: &str) -> BTreeSet<String> {
    query
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| {
            word.starts_with("tandem_") || word.starts_with("tandem:") || word.starts_with("vllm:")
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_dashboard_is_well_formed() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "tandem-pd");
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(variables.iter().any(|v| v["name"] == "datasource"
        && v["type"] == "datasource"
        && v["query"] == "prometheus"));
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let id = panel["id"].as_u64().unwrap();
        assert!(ids.insert(id), "panel id {id} twice");
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24 && grid["h"].as_u64().unwrap() > 0, "{panel}");
        match panel["type"].as_str().unwrap() {
            "row" => {}
            "timeseries" => {
                assert!(!panel["title"].as_str().unwrap().is_empty());
                assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
                let targets = panel["targets"].as_array().unwrap();
                assert!(!targets.is_empty(), "{panel}");
                let refs: BTreeSet<_> = targets
                    .iter()
                    .map(|t| t["refId"].as_str().unwrap())
                    .collect();
                assert_eq!(refs.len(), targets.len(), "{panel}");
                assert!(
                    targets
                        .iter()
                        .all(|t| !metric_names(t["expr"].as_str().unwrap()).is_empty())
                );
            }
            other => panic!("unexpected panel type {other}"),
        }
    }
}

/// Whether Prometheus is installed; without it the live test skips, unless
/// `TANDEM_REQUIRE_PROMETHEUS=1` (CI).
fn prometheus_present() -> bool {
    common::program_present(
        "prometheus",
        "TANDEM_REQUIRE_PROMETHEUS",
        "install Debian's prometheus",
    )
}

/// A real Prometheus on loopback with its own data folder.
struct Prometheus {
    child: Child,
    url: String,
    _data: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(config: &std::path::Path) -> Prometheus {
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.path().display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _data: data,
        }
    }

    async fn query(&self, client: &reqwest::Client, query: &str) -> Value {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", self.url),
            [("query", query)],
        )
        .unwrap();
        let response = client.get(url).send().await.unwrap();
        response.json().await.unwrap()
    }
}

/// The series names of an exposition.
fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_panel_query_runs_on_prometheus_over_a_real_topology() {
    if !default_model_present() || !prometheus_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (prefill, decode) = (free_port(), free_port());
    let topology = dir.path().join("t.toml");
    std::fs::write(
        &topology,
        format!(
            "[router]\nport = {}\n\n[router.planner]\ninterval_ms = 500\nmin_samples = 2\n\n\
             [[worker]]\nengine = \"builtin\"\nrole = \"prefill\"\nport = {prefill}\nkv_port = {}\n\
             kv_cache_memory = \"128MiB\"\nextra_args = [\"--threads\", \"1\"]\n\n\
             [[worker]]\nengine = \"builtin\"\nrole = \"decode\"\nport = {decode}\nkv_port = {}\n\
             kv_cache_memory = \"128MiB\"\nextra_args = [\"--threads\", \"1\"]\n",
            free_port(),
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let config = dir.path().join("prometheus.yml");
    let config_arg = config.display().to_string();
    let up = Up::start(&topology, &["--prometheus-config", &config_arg]);
    let prometheus = Prometheus::start(&config);
    let client = reqwest::Client::new();

    // Requests through the router (P/D hand-offs, streamed for the planner), while
    // Prometheus scrapes every 5 s: long enough for two scrapes of each target.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(14) {
        let body = json!({"prompt": "Dashboards show what the router sees", "max_tokens": 12,
            "stream": true});
        let response = client
            .post(format!("{}/v1/completions", up.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap();
    }
    let targets = loop {
        let answer: Value = client
            .get(format!("{}/api/v1/targets", prometheus.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let active = answer["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if active.len() == 3 && active.iter().all(|t| t["health"] == "up") {
            break active;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "targets not up: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let roles: BTreeSet<_> = targets
        .iter()
        .filter_map(|t| t["labels"]["role"].as_str())
        .collect();
    assert_eq!(roles, BTreeSet::from(["decode", "prefill"]));

    // What real expositions name: Prometheus's scraped series, and vLLM's recording.
    let scraped = prometheus
        .query(
            &client,
            "count by (__name__) ({__name__=~\"tandem.*|vllm:.*\"})",
        )
        .await;
    let mut exposed: BTreeSet<String> = scraped["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["metric"]["__name__"].as_str().unwrap().to_owned())
        .collect();
    for role in ["p", "d"] {
        let recorded = std::fs::read_to_string(format!(
            "{}/../protocol/tests/fixtures/vllm-0.26/vllm_metrics_{role}.txt",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        exposed.extend(exposed_names(&recorded));
    }
    for query in queries(&dashboard()) {
        let answer = prometheus
            .query(&client, &query.replace("$__rate_interval", "1m"))
            .await;
        assert_eq!(answer["status"], "success", "{query}: {answer}");
        for name in metric_names(&query) {
            assert!(
                exposed.contains(&name),
                "{name} (in {query}) is in no real /metrics"
            );
        }
    }
    // The live scrape alone carries the series both engines share.
    let live = prometheus.query(&client, "vllm:kv_cache_usage_perc").await;
    assert_eq!(
        live["data"]["result"].as_array().unwrap().len(),
        2,
        "{live}"
    );
}
