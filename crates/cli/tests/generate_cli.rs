//! `tandem generate` as a user runs it: the real binary on the default model, checked
//! against llama.cpp's greedy text for the same prompts (the engine's fixture), and
//! with bad arguments.

mod common;

use common::{default_model_present, tandem};

#[test]
fn greedy_generation_prints_llamacpps_text_and_speeds() {
    if !default_model_present() {
        return;
    }
    let output = tandem()
        .args(["generate", "--prompt", "The capital of France is"])
        .args(["--temperature", "0", "--max-tokens", "3", "--threads", "2"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // llama.cpp's greedy continuation starts " Paris", ".", "\n"; the CLI ends the
    // text with a newline of its own.
    assert_eq!(String::from_utf8_lossy(&output.stdout), " Paris.\n\n");
    let stats = String::from_utf8_lossy(&output.stderr);
    for field in ["prompt tokens: 5", "prefill:", "decode:", "tok/s"] {
        assert!(stats.contains(field), "missing `{field}` in {stats}");
    }
}

#[test]
fn chat_mode_uses_the_models_template() {
    if !default_model_present() {
        return;
    }
    let output = tandem()
        .args(["generate", "--chat", "--prompt", "What is a REST API?"])
        .args(["--temperature", "0", "--max-tokens", "6", "--json"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The fixture's chat case renders this conversation through the same template.
    assert!(
        String::from_utf8_lossy(&output.stdout).starts_with("A REST API (Simple Request"),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let stats = String::from_utf8_lossy(&output.stderr);
    let json: serde_json::Value = serde_json::from_str(stats.lines().last().unwrap()).unwrap();
    assert_eq!(json["generated_tokens"], 6);
    assert!(json["decode_tok_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_arguments_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    let cases: [(&[&str], &str); 4] = [
        (&["--model", missing.to_str().unwrap()], "missing.gguf"),
        (&["--temperature=-1"], "--temperature"),
        (&["--top-p", "1.5"], "--top-p"),
        (&["--max-tokens", "0"], "--max-tokens"),
    ];
    for (args, expected) in cases {
        let output = tandem()
            .args(["generate", "--prompt", "hi"])
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
