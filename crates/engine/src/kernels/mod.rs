//! CPU compute kernels for the forward pass.
//!
//! - [`pool`]: a fixed-size thread pool with cheap (spinning) dispatch, used for every
//!   parallel kernel of one forward pass.
//! - [`qmatrix`]: weight matrices stored in GGML block formats ([`QMatrix`]); Q4_0,
//!   Q4_1 and Q8_0 interleaved in panels of 8 rows (`packed`) for the SIMD kernels.
//! - [`matmul`](mod@matmul): `y = x · Wᵀ` for a batch of activation rows ([`Linear`],
//!   [`matmul()`], [`matmul_many`]): int8 dot products against quantized activations
//!   (`quant_dot`) at every batch size for Q4_0/Q4_1/Q8_0, f32 GEMM over a dense copy
//!   (`gemm`) for large batches of the other formats.
//! - [`ops`]: element-wise and row-wise operations (RMS norm, SiLU·mul, softmax, RoPE…).
//! - [`dispatch`]: the kernel family ([`CpuKernels`]: `avx2`, `vnni`, `avx512` or
//!   `amx`), chosen once at run time from the CPU's features, or by
//!   `TANDEM_CPU_KERNELS`.
//! - `tiles`: AMX tile state (the OS permission, per-thread tile configuration) and the
//!   tile instructions, for the `amx` family's kernels.
//!
//! x86-64 builds use AVX2/FMA/F16C when they are enabled at compile time (the workspace
//! builds with `-C target-cpu=x86-64-v3`); every such kernel has a portable scalar twin.
//! Kernels needing more (VNNI, AVX-512, AMX) are `#[target_feature]` functions (AMX:
//! `asm!`) reached only through the family [`dispatch`] selected for this CPU.

mod aligned;
pub mod attn;
pub mod dispatch;
mod gemm;
pub mod matmul;
pub mod ops;
mod packed;
pub mod pool;
pub mod qmatrix;
mod quant_dot;
mod simd;
mod tiles;

pub use candle_core::quantized::GgmlDType;
pub use dispatch::{CpuKernels, CpuKernelsError};
pub use matmul::{
    GEMM_MIN_TOKENS, Linear, MatmulPath, gemm_pays, matmul, matmul_many, matmul_many_with,
};
pub use pool::ThreadPool;
pub use qmatrix::QMatrix;

/// Invalid input to a kernel: a shape, length or format the kernel cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("{what}: expected length {expected}, got {actual}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("{dtype:?} matrix [{rows}, {cols}]: expected {expected} bytes, got {actual}")]
    ByteLength {
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        expected: usize,
        actual: usize,
    },
    #[error("{dtype:?} matrix: {cols} columns is not a multiple of the block size {block_size}")]
    RaggedBlocks {
        dtype: GgmlDType,
        cols: usize,
        block_size: usize,
    },
    #[error("{what}: {detail}")]
    InvalidShape { what: &'static str, detail: String },
    #[error("row {row} out of range for a matrix with {rows} rows")]
    RowOutOfRange { row: usize, rows: usize },
    #[error("a thread pool needs at least one thread")]
    ZeroThreads,
    #[error("spawning a pool worker thread: {0}")]
    Spawn(String),
    #[error(transparent)]
    CpuKernels(#[from] CpuKernelsError),
}

/// Checks that a slice has the length a kernel expects.
pub(crate) fn check_len(
    what: &'static str,
    expected: usize,
    actual: usize,
) -> Result<(), KernelError> {
    if expected == actual {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch {
            what,
            expected,
            actual,
        })
    }
}
