//! `tandem bench` against a real `tandem serve`: every request accounted for, token
//! counts exact, JSON with vllm bench serve's keys; failures counted, never dropped.

mod common;

use common::{Server, default_model_present, metric_value, tandem};
use serde_json::Value;

fn bench(args: &[&str]) -> (std::process::Output, Value) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.json");
    let output = tandem()
        .arg("bench")
        .args(args)
        .args(["--json", file.to_str().unwrap(), "--save-detailed"])
        .output()
        .unwrap();
    let json = std::fs::read_to_string(&file)
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap_or(Value::Null);
    (output, json)
}

#[test]
fn a_random_workload_is_measured_whole() {
    if !default_model_present() {
        return;
    }
    let server = Server::start(&["--threads", "2", "--kv-cache-memory", "128MiB"]);
    let url = server.url("");
    let args = [
        "--url",
        &url,
        "--workload",
        "random",
        "--num-prompts",
        "6",
        "--input-len",
        "20",
        "--output-len",
        "5",
        "--max-concurrency",
        "3",
        "--request-rate",
        "50",
    ];
    let (output, report) = bench(&args);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(report["completed"], 6, "{report}");
    assert_eq!(report["failed"], 0);
    assert_eq!(
        report["total_output_tokens"], 30,
        "ignore_eos: exactly 5 each"
    );
    assert_eq!(report["itls"].as_array().unwrap().len(), 6);
    assert!(report["mean_ttft_ms"].as_f64().unwrap() > 0.0);
    assert!(report["p99_tpot_ms"].as_f64().unwrap() > 0.0);
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains("Successful requests:") && table.contains("P99 ITL (ms)"),
        "{table}"
    );
}

#[test]
fn failed_requests_are_counted() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let (output, report) = bench(&["--url", &url, "--workload", "seed-batch"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(report["completed"], 0);
    assert_eq!(report["failed"], 8);
    assert_eq!(report["errors"].as_array().unwrap().len(), 8);
}

#[test]
fn a_concurrency_sweep_reports_every_point() {
    if !default_model_present() {
        return;
    }
    let server = Server::start(&["--threads", "2", "--kv-cache-memory", "128MiB"]);
    let url = server.url("");
    let dir = tempfile::tempdir().unwrap();
    let markdown = dir.path().join("report.md");
    let args = [
        "--url",
        &url,
        "--workload",
        "shared-prefix",
        "--num-prompts",
        "4",
        "--prefix-len",
        "40",
        "--input-len",
        "8",
        "--output-len",
        "3",
        "--sweep-concurrency",
        "1,4",
        "--markdown",
        markdown.to_str().unwrap(),
    ];
    let (output, report) = bench(&args);
    assert!(output.status.success(), "{output:?}");
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        assert_eq!(run["completed"], 4, "{run}");
        assert_eq!(run["total_output_tokens"], 12);
    }
    assert_eq!(runs[0]["max_concurrency"], 1);
    let text = std::fs::read_to_string(markdown).unwrap();
    assert!(text.contains("| concurrency | req/s |"), "{text}");
    // The shared prefix was served from the prefix cache after the first request.
    let text = ureq::get(&server.url("/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let hits = metric_value(&text, "vllm:prefix_cache_hits_total").unwrap_or(0.0);
    assert!(
        hits >= 32.0,
        "two 16-token blocks of the prefix, at least: {hits}"
    );
}
