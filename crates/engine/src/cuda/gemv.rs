//! The matrix products of a forward pass, and who runs them. A decode step of a few
//! sequences reads every weight once and does a handful of multiply-adds with it, so
//! it runs at the pace of memory; cuBLAS's GEMM kernels leave part of that bandwidth
//! unused at one token (`tandem gpu decode-gemms` measures both). Up to
//! [`GEMV_MAX_TOKENS`] tokens our own matrix–vector kernels run the products
//! (`gemv_t*` in kernels.cu), the gate/up product with SiLU·up folded in; larger
//! steps go to cuBLAS. `TANDEM_GPU_GEMV=off` keeps cuBLAS for every step, for
//! comparing the two and for bug reports.

use cudarc::driver::sys;

use super::gpu::{Gpu, GpuError, Kernel, ProductOut, kernel_args};

/// The most tokens a step may have for the matrix–vector kernels. Above 4 the x
/// operands' loads and conversions outweigh the weights' (an H100 at Llama-3.1-8B's
/// shapes, `tandem gpu decode-gemms`: 1.08× cuBLAS at 1 token, level at 2 to 4, 0.79× at
/// 8), and cuBLAS's GEMMs take over.
pub const GEMV_MAX_TOKENS: usize = 4;

/// Warps (so rows, or row pairs) per thread block of the matrix–vector kernels.
const WARPS_PER_BLOCK: usize = 8;

/// The compiled matrix–vector kernels, by tokens − 1.
struct GemvKernels {
    plain: Vec<Kernel>,
    silu: Vec<Kernel>,
}

/// Runs a forward pass's matrix products: the matrix–vector kernels for small steps
/// (when on), cuBLAS otherwise.
pub struct Products {
    gemv: Option<GemvKernels>,
}

/// `TANDEM_GPU_GEMV`: `on` (the default) or `off`.
pub fn gemv_from_env() -> Result<bool, GpuError> {
    match std::env::var("TANDEM_GPU_GEMV").as_deref() {
        Err(_) | Ok("on") => Ok(true),
        Ok("off") => Ok(false),
        Ok(other) => Err(GpuError::Unsupported(format!(
            "TANDEM_GPU_GEMV={other}: use on or off"
        ))),
    }
}

impl Products {
    /// The products for `gpu`; with `gemv` off every product goes to cuBLAS.
    pub fn new(gpu: &Gpu, gemv: bool) -> Result<Self, GpuError> {
        let kernels = if gemv {
            let load = |prefix: &str| -> Result<Vec<Kernel>, GpuError> {
                (1..=GEMV_MAX_TOKENS)
                    .map(|t| gpu.module.kernel(&format!("{prefix}{t}")))
                    .collect()
            };
            Some(GemvKernels {
                plain: load("gemv_t")?,
                silu: load("gemv_silu_t")?,
            })
        } else {
            None
        };
        Ok(Self { gemv: kernels })
    }

    /// Whether the matrix–vector kernels are on (`TANDEM_GPU_GEMV`).
    pub fn gemv_enabled(&self) -> bool {
        self.gemv.is_some()
    }

    /// Whether a step of `tokens` tokens uses the matrix–vector kernels.
    pub fn uses_gemv(&self, tokens: usize) -> bool {
        self.gemv_enabled() && (1..=GEMV_MAX_TOKENS).contains(&tokens)
    }

    /// `Y[tokens × rows] (+)= X[tokens × cols] · Wᵀ` for a row-major `W[rows × cols]`:
    /// W and X in the weight type, accumulated in f32; Y as `out` says (the
    /// matrix–vector kernels write f32 only: a weight-type result goes to cuBLAS).
    ///
    /// # Safety
    /// The pointers must hold the matrices' sizes (Y's elements of `out`'s type).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul(
        &self,
        gpu: &Gpu,
        w: sys::CUdeviceptr,
        rows: usize,
        cols: usize,
        x: sys::CUdeviceptr,
        tokens: usize,
        y: sys::CUdeviceptr,
        out: ProductOut,
    ) -> Result<(), GpuError> {
        let gemv = match out {
            ProductOut::WeightType => None,
            ProductOut::F32 | ProductOut::F32Accumulate => {
                self.gemv_kernel(tokens, cols, &[w, x], false)
            }
        };
        let Some(kernel) = gemv else {
            // SAFETY: the caller's promise.
            return unsafe { gpu.matmul(w, rows, cols, x, tokens, y, out) };
        };
        let accumulate = i32::from(out == ProductOut::F32Accumulate);
        let (rows_i, cols_i, accumulate_i) = (rows as i32, cols as i32, accumulate);
        let mut args = kernel_args![w, rows_i, cols_i, x, y, accumulate_i];
        // Mirrors GemvRows in kernels.cu.
        let rows_per_warp = if tokens >= 4 { 2 } else { 1 };
        // SAFETY: the caller's promise; the kernel's parameters in order.
        unsafe { launch(gpu, kernel, rows.div_ceil(rows_per_warp), &mut args) }
    }

    /// `act[tokens × inter] = SiLU(X · gateᵀ) · (X · upᵀ)` for the fused row-major
    /// `[gate | up]` matrix of `2 · inter` rows, in one pass, when this step uses the
    /// matrix–vector kernels. Returns false (nothing queued) otherwise: the caller runs
    /// the product and SiLU·up itself.
    ///
    /// # Safety
    /// The pointers must hold the matrices' sizes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gate_up_silu(
        &self,
        gpu: &Gpu,
        w: sys::CUdeviceptr,
        inter: usize,
        cols: usize,
        x: sys::CUdeviceptr,
        tokens: usize,
        act: sys::CUdeviceptr,
    ) -> Result<bool, GpuError> {
        let Some(kernel) = self.gemv_kernel(tokens, cols, &[w, x, act], true) else {
            return Ok(false);
        };
        let (inter_i, cols_i) = (inter as i32, cols as i32);
        let mut args = kernel_args![w, inter_i, cols_i, x, act];
        // SAFETY: the caller's promise; the kernel's parameters in order.
        unsafe { launch(gpu, kernel, inter, &mut args)? };
        Ok(true)
    }

    /// The kernel for this product, if the step is small enough and the rows are whole
    /// 16-byte chunks at 16-byte aligned addresses (what its loads need).
    fn gemv_kernel(
        &self,
        tokens: usize,
        cols: usize,
        pointers: &[sys::CUdeviceptr],
        silu: bool,
    ) -> Option<Kernel> {
        let kernels = self.gemv.as_ref()?;
        let aligned = cols.is_multiple_of(8) && pointers.iter().all(|p| p.is_multiple_of(16));
        if !self.uses_gemv(tokens) || !aligned {
            return None;
        }
        let set = if silu { &kernels.silu } else { &kernels.plain };
        Some(set[tokens - 1])
    }
}

/// Launches a matrix–vector kernel with `warps` warps in all.
///
/// # Safety
/// As [`Gpu::launch`].
unsafe fn launch(
    gpu: &Gpu,
    kernel: Kernel,
    warps: usize,
    args: &mut [*mut std::ffi::c_void],
) -> Result<(), GpuError> {
    let blocks = warps.div_ceil(WARPS_PER_BLOCK) as u32;
    // SAFETY: the caller's promise.
    unsafe { gpu.launch(kernel, (blocks, 1, 1), 32 * WARPS_PER_BLOCK as u32, 0, args) }
}
