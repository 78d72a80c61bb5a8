//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// llama.cpp's reference outputs for the default model (copied from
/// `shared/fixtures/smollm2-llamacpp-reference.json`, produced by
/// `make_llamacpp_reference.py`): the independent oracle for correctness.
pub fn llamacpp_fixture() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/smollm2-llamacpp-reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture readable"))
        .expect("fixture is JSON")
}

/// The default model (SmolLM2-135M-Instruct Q4_1) if it has been fetched.
///
/// Returns `None` (and says so on stderr) when it is absent, unless
/// `TANDEM_REQUIRE_MODEL=1`, which CI sets after `tandem model fetch`: there a missing
/// model is a failure, not a skip.
pub fn default_model() -> Option<PathBuf> {
    let path = tandem_engine::fetch::default_model_path();
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("TANDEM_REQUIRE_MODEL").as_deref() == Ok("1") {
        panic!(
            "default model missing at {} (run `tandem model fetch`)",
            path.display()
        );
    }
    eprintln!(
        "skipping: default model not found at {} (run `tandem model fetch`)",
        path.display()
    );
    None
}
