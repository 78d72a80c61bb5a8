//! `tandem kv`: the arithmetic against published figures (Llama-3.1-8B in bf16 is 128
//! KiB per token) and against the engine's own KV block size for the default model;
//! `--measure` against a real `tandem serve --kv-port`: the bytes read equal the
//! arithmetic exactly, the worker sent them, and its lease is released; with another
//! cluster's secret nothing is read.

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

    // Another cluster's secret (from a file, which wins over the environment): the
    // worker cannot prove it holds this one, and nothing is read.
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("kv-secret");
    std::fs::write(&secret_file, "another cluster's secret\n").unwrap();
    let output = tandem()
        .args(["kv", &model, "--measure", &url, "--prompt-len", "32"])
        .args(["--kv-secret-file", secret_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("does not hold this cluster's secret"),
        "{stderr}"
    );
    assert!(stderr.contains("--kv-secret-file"), "{stderr}");
    let metrics = worker.metrics_blocking();
    assert_eq!(sent_bytes(&metrics), Some((32 * 368_640) as f64));
}

fn sent_bytes(metrics: &str) -> Option<f64> {
    metric_with(
        metrics,
        "tandem:kv_transfer_bytes_total",
        &[("direction", "sent")],
    )
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

/// Qwen3-0.6B's published config (the KV-relevant keys and a few others).
const QWEN3_CONFIG: &str = r#"{
  "architectures": ["Qwen3ForCausalLM"],
  "model_type": "qwen3",
  "hidden_size": 1024,
  "intermediate_size": 3072,
  "num_attention_heads": 16,
  "num_key_value_heads": 8,
  "head_dim": 128,
  "num_hidden_layers": 28,
  "vocab_size": 151936,
  "torch_dtype": "bfloat16"
}"#;

#[test]
fn a_qwen_config_gives_its_shape_as_a_folder_or_as_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("Qwen3-0.6B");
    std::fs::create_dir(&folder).unwrap();
    let config = folder.join("config.json");
    std::fs::write(&config, QWEN3_CONFIG).unwrap();
    // 2 (K and V) × 28 layers × 8 KV heads × 128 × 2 bytes (bf16).
    let expected = 2 * 28 * 8 * 128 * 2;
    for model in [&folder, &config] {
        let report = kv_json(&[model.to_str().unwrap(), "--memory", "1GiB"]);
        assert_eq!(report["bytes_per_token"], expected, "{report}");
        assert_eq!(report["layers"], 28);
        assert_eq!(report["head_dim"], 128);
        assert_eq!(report["model"], "Qwen3-0.6B");
        assert_eq!(report["tokens_in_memory"], (1u64 << 30) / expected);
    }
    // The same as the preset.
    assert_eq!(kv_json(&["qwen3-0.6b"])["bytes_per_token"], expected);
}

#[test]
fn a_config_with_no_kv_size_is_refused_not_divided_by() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        r#"{"num_hidden_layers": 0, "num_key_value_heads": 8, "head_dim": 128}"#,
    )
    .unwrap();
    let output = tandem()
        .args(["kv", config.to_str().unwrap(), "--memory", "1GiB"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`num_hidden_layers` is 0") && !stderr.contains("panicked"),
        "{stderr}"
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let output = tandem()
        .args(["kv", empty.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("config.json"), "{stderr}");
}
