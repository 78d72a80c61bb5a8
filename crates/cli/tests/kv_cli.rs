//! `tandem kv`: the arithmetic against published figures (Llama-3.1-8B in bf16 is 128
//! KiB per token) and against the engine's own KV block size for the default model.

mod common;

use common::{default_model_present, tandem};
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
