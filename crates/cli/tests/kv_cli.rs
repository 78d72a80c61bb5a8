//! `tandem kv`: the arithmetic against published figures (Llama-3.1-8B in bf16 is 128
//! KiB per token) and against the engine's own KV block size for the default model;
//! `--measure` against a real `tandem serve --kv-port`: the bytes read equal the
//! arithmetic exactly, the worker sent them, and its lease is released.

mod common;

use common::{Server, default_model_present, metric_value, metric_with, tandem};
use serde_json::Value;

fn kv_json(args: &[&str]) -> Value {
    let output = tandem()
        .arg("kv")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn presets_match_their_published_shapes() {
    let report = kv_json(&["llama-3.1-8b", "--memory", "80GiB"]);
    assert_eq!(report["bytes_per_token"], 131_072);
    assert_eq!(report["bytes_per_request"], 131_072 * 2048);
    assert_eq!(report["tokens_in_memory"], 655_360);
    let seconds = report["transfers"][0]["seconds"].as_f64().unwrap();
    assert!(
        (seconds - 0.2147).abs() < 1e-3,
        "256 MiB over 10 GbE: {seconds}"
    );
    assert_eq!(kv_json(&["llama-3.1-70b"])["bytes_per_token"], 327_680);
}

#[test]
fn the_default_model_matches_the_engines_block_size() {
    if !default_model_present() {
        return;
    }
    let path = tandem().args(["model", "path"]).output().unwrap();
    let path = String::from_utf8(path.stdout).unwrap();
    let report = kv_json(&[path.trim(), "--kv-dtype", "f16"]);
    // The hand-off moves 368,640-byte blocks of 16 positions for this model.
    assert_eq!(report["bytes_per_token"], 368_640 / 16);
}

#[test]
fn unknown_models_are_clear_errors() {
    let output = tandem().args(["kv", "no-such-model"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no-such-model") && stderr.contains("llama-3.1-8b"),
        "{stderr}"
    );
}

fn default_model_path() -> String {
    let path = tandem().args(["model", "path"]).output().unwrap();
    String::from_utf8(path.stdout).unwrap().trim().to_owned()
}

#[test]
fn measure_reads_a_real_hand_off_exactly_and_releases_it() {
    if !default_model_present() {
        return;
    }
    let model = default_model_path();
    let worker = Server::start(&[
        "--kv-port",
        "0",
        "--threads",
        "1",
        "--kv-cache-memory",
        "128MiB",
    ]);
    let url = worker.url("");
    let report = kv_json(&[&model, "--measure", &url, "--prompt-len", "512"]);
    let measured = &report["measured"];
    let count = |key: &str| measured[key].as_u64().unwrap_or_else(|| panic!("{report}"));
    // 512 positions in blocks of 16; 368,640 bytes per block for this model in f16.
    assert_eq!(report["kv_dtype"], "f16");
    assert_eq!(count("blocks"), 32, "{report}");
    assert_eq!(count("block_bytes"), 368_640);
    assert_eq!(count("bytes"), 32 * 368_640);
    assert_eq!(measured["bytes"], report["bytes_per_request"], "{report}");
    assert_eq!(measured["bytes"], measured["expected_bytes"], "{report}");
    let rate = measured["bytes_per_second"].as_f64().unwrap();
    assert!(
        rate > 0.0 && measured["seconds"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert_eq!(measured["released"], true, "{report}");

    let metrics = worker.metrics_blocking();
    let sent = metric_with(
        &metrics,
        "tandem:kv_transfer_bytes_total",
        &[("direction", "sent")],
    );
    assert_eq!(sent, Some((32 * 368_640) as f64), "{metrics}");
    assert_eq!(
        metric_value(&metrics, "tandem:kv_blocks_held_for_remote"),
        Some(0.0),
        "the lease is released: {metrics}"
    );
}

#[test]
fn measure_needs_a_model_file_and_a_worker_with_a_kv_port() {
    let preset = tandem()
        .args(["kv", "smollm2-135m", "--measure", "127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!preset.status.success());
    let stderr = String::from_utf8_lossy(&preset.stderr);
    assert!(
        stderr.contains("--measure needs the worker's model file"),
        "{stderr}"
    );
    if !default_model_present() {
        return;
    }
    let worker = Server::start(&["--threads", "1", "--kv-cache-memory", "64MiB"]);
    let output = tandem()
        .args(["kv", &default_model_path(), "--prompt-len", "32"])
        .args(["--measure", &worker.url("")])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--kv-port"), "{stderr}");
}
