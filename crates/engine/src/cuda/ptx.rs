//! The kernels' PTX, generated from `kernels.cu` by `scripts/build-ptx.sh` and embedded,
//! so running the GPU engine needs only the driver (it compiles PTX for the GPU at
//! load) and cuBLAS: no CUDA toolkit, no NVRTC. `tests/ptx_fresh.rs` checks that the
//! embedded PTX was generated from the current `kernels.cu`.

use super::gpu::WeightDtype;

const F16: &str = include_str!("ptx/kernels.f16.ptx");
const BF16: &str = include_str!("ptx/kernels.bf16.ptx");

/// The PTX whose matrix-product operands are `dtype`.
pub fn source(dtype: WeightDtype) -> &'static str {
    match dtype {
        WeightDtype::F16 => F16,
        WeightDtype::Bf16 => BF16,
    }
}
