//! `tandem gpu …` in a build without the `cuda` feature: a clear error that says how
//! to get one, not a crash. (With the feature they need a GPU: docs/gpu.md.) Also GPU
//! options given to a CPU worker, refused by name.
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

/// `--quantization` changes how a GPU model stores its matrices: a CPU worker refuses
/// it by name instead of ignoring it, and an unknown scheme is refused with the ones
/// there are.
#[test]
fn serve_refuses_a_quantization_it_cannot_honour() {
    let cases = [
        (
            vec!["serve", "--quantization", "fp8"],
            "--quantization is for GPU workers",
        ),
        (
            vec!["serve", "--quantization", "int4"],
            "not a GPU quantization: use fp8 or none",
        ),
    ];
    for (args, expected) in cases {
        let output = tandem().args(&args).output().unwrap();
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
