//! The GPU kernels' embedded PTX (crates/engine/src/cuda/ptx/) must come from the
//! current kernels.cu: `scripts/build-ptx.sh` writes the source's SHA-256 into each PTX
//! file, and this test (which runs everywhere, GPU or not) compares it.

use sha2::{Digest, Sha256};

#[test]
fn embedded_ptx_was_generated_from_the_current_kernels() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/cuda");
    let source = std::fs::read(format!("{dir}/kernels.cu")).expect("kernels.cu");
    let hash: String = Sha256::digest(&source)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for variant in ["f16", "bf16"] {
        let path = format!("{dir}/ptx/kernels.{variant}.ptx");
        let ptx = std::fs::read_to_string(&path).expect("PTX file");
        let recorded = ptx
            .lines()
            .find_map(|l| l.strip_prefix("// kernels.cu sha256: "))
            .unwrap_or_else(|| panic!("{path} has no source hash line"));
        assert_eq!(
            recorded, hash,
            "{path} is stale: run scripts/build-ptx.sh after editing kernels.cu"
        );
        assert!(
            ptx.contains(".entry attention_mma_d128_w4("),
            "{path}: kernels missing"
        );
    }
}
