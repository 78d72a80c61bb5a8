//! `tandem serve --load-format dummy`: a preset's shapes with random weights. It serves
//! like any model (its text is meaningless), two workers with the same preset hold the
//! same weights (a P→D hand-off gives the single worker's greedy tokens), and unknown
//! presets are clear errors.

mod common;

use common::{Server, default_model_present, tandem};
use serde_json::{Value, json};

fn dummy(extra: &[&str]) -> Server {
    let mut args = vec![
        "--load-format",
        "dummy",
        "--model",
        "smollm2-135m",
        "--threads",
        "1",
        "--kv-cache-memory",
        "64MiB",
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn token_ids(answer: &Value) -> String {
    answer["choices"][0]["text"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_dummy_preset_serves_and_hands_off_between_identical_workers() {
    // The dummy borrows the default model's tokenizer.
    if !default_model_present() {
        return;
    }
    let single = dummy(&[]);
    let models: Value = reqwest::get(single.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2-135m", "{models}");
    assert_eq!(models["data"][0]["root"], "dummy:smollm2-135m");

    let body = json!({"prompt": "The quick brown fox jumps over the lazy dog because",
                      "max_tokens": 12, "ignore_eos": true, "temperature": 0});
    let (status, alone) = single.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{alone}");
    assert_eq!(alone["usage"]["completion_tokens"], 12);

    // The same preset in two more workers: P prefills, D decodes from P's KV.
    let p = dummy(&["--kv-port", "0"]);
    let d = dummy(&[]);
    let mut leg = body.clone();
    leg["max_tokens"] = json!(1);
    leg["kv_transfer_params"] = json!({"do_remote_decode": true});
    let (status, prefilled) = p.post("/v1/completions", &leg).await;
    assert_eq!(status, 200, "{prefilled}");
    let mut decode = body.clone();
    decode["kv_transfer_params"] = prefilled["kv_transfer_params"].clone();
    let (status, handed_off) = d.post("/v1/completions", &decode).await;
    assert_eq!(status, 200, "{handed_off}");
    assert_eq!(token_ids(&handed_off), token_ids(&alone));
    let metrics = d.metrics().await;
    let pulled = common::metric_with(
        &metrics,
        "tandem:kv_transfer_blocks_total",
        &[("direction", "received")],
    )
    .unwrap_or(0.0);
    assert!(
        pulled >= 1.0,
        "the decode worker pulled P's blocks:\n{metrics}"
    );
}

#[test]
fn unknown_presets_and_a_missing_preset_are_explained() {
    let output = tandem()
        .args([
            "serve",
            "--load-format",
            "dummy",
            "--model",
            "gpt-9",
            "--port",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no model preset `gpt-9`") && stderr.contains("llama-3.1-8b"),
        "{stderr}"
    );
    let output = tandem()
        .args(["serve", "--load-format", "dummy", "--port", "0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("needs --model PRESET"));
}

/// Without the `cuda` feature (CI's build), asking for a GPU is a clear error.
#[test]
fn a_gpu_device_without_gpu_support_is_explained() {
    if cfg!(feature = "cuda") {
        return;
    }
    let output = tandem()
        .args(["serve", "--device", "cuda:1", "--port", "0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cuda:1") && stderr.contains("--features tandem-cli/cuda"),
        "{stderr}"
    );
    let output = tandem()
        .args(["serve", "--device", "tpu", "--port", "0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cpu, cuda or cuda:N"));
}
