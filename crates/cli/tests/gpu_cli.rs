//! `tandem gpu …` in a build without the `cuda` feature: a clear error that says how
//! to get one, not a crash. (With the feature they need a GPU: docs/gpu.md.)
#![cfg(not(feature = "cuda"))]

mod common;

use common::tandem;

#[test]
fn without_the_cuda_feature_gpu_commands_say_how_to_build_it() {
    for command in ["limits", "decode-gemms"] {
        let output = tandem().args(["gpu", command]).output().unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("built without GPU support")
                && stderr.contains("--features tandem-cli/cuda"),
            "{command}: {stderr}"
        );
    }
}
