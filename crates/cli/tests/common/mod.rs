//! Helpers shared by the CLI's end-to-end tests.
#![allow(dead_code)]

use std::process::Command;

/// The `tandem` binary under test.
pub fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

/// Whether the default model is cached. Without it the caller skips (with a notice),
/// unless `TANDEM_REQUIRE_MODEL=1` (CI), where a missing model fails the test.
pub fn default_model_present() -> bool {
    let output = tandem()
        .args(["model", "path"])
        .output()
        .expect("tandem runs");
    let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if std::path::Path::new(&path).is_file() {
        return true;
    }
    assert!(
        std::env::var("TANDEM_REQUIRE_MODEL").as_deref() != Ok("1"),
        "default model missing at {path}"
    );
    eprintln!("skipping: default model not found at {path}");
    false
}
