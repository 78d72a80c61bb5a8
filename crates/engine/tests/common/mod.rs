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

/// A lead (in logits) of llama.cpp's top-1 over its second that no implementation
/// noise should overturn.
pub const CLEAR_MARGIN: f64 = 0.5;

/// One generation case of the llama.cpp fixture.
pub struct Case {
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    /// llama.cpp's most likely next token after each position of prompt + greedy.
    pub top1: Vec<u32>,
    /// How far llama.cpp's top-1 logit leads its second at each position.
    pub margin: Vec<f64>,
}

impl Case {
    /// The prompt followed by llama.cpp's greedy continuation: what a teacher-forced
    /// pass feeds, one reference row per position.
    pub fn sequence(&self) -> Vec<u32> {
        self.prompt_ids
            .iter()
            .chain(&self.greedy_ids)
            .copied()
            .collect()
    }
}

/// The fixture's generation cases, parsed.
pub fn llamacpp_cases() -> Vec<Case> {
    let fixture = llamacpp_fixture();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    fixture["generation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| Case {
            prompt_ids: ids(&case["prompt_ids"]),
            greedy_ids: ids(&case["greedy_ids"]),
            top1: case["top5_logits_per_position"]
                .as_array()
                .unwrap()
                .iter()
                .map(|top5| top5[0][0].as_u64().unwrap() as u32)
                .collect(),
            margin: case["top5_logits_per_position"]
                .as_array()
                .unwrap()
                .iter()
                .map(|top5| top5[0][1].as_f64().unwrap() - top5[1][1].as_f64().unwrap())
                .collect(),
        })
        .collect()
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
