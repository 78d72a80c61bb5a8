//! The matrix products of a forward pass, and who runs them. A decode step of a few
//! sequences reads every weight once and does a handful of multiply-adds with it, so
//! it runs at the pace of memory; cuBLAS's GEMM kernels leave part of that bandwidth
//! unused at one token (`tandem gpu decode-gemms` measures both). Up to
//! [`GEMV_MAX_TOKENS`] tokens our own matrix–vector kernels run the products
//! (`gemv_t*` in kernels.cu), the gate/up product with SiLU·up folded in; larger
//! steps go to cuBLAS. `TANDEM_GPU_GEMV=off` keeps cuBLAS for every step, for
//! comparing the two and for bug reports. FP8 matrices take the E4M3 matrix–vector
//! kernels in the same steps and [`super::fp8`]'s cuBLASLt products in the rest.

use cudarc::driver::sys;

use super::fp8::Fp8Products;
use super::gpu::{Gpu, GpuError, Kernel, ProductOut, kernel_args};

/// A weight matrix as the products take it.
#[derive(Clone, Copy, Debug)]
pub struct MatrixRef {
    /// Row-major elements in the weight type, or E4M3 codes.
    pub ptr: sys::CUdeviceptr,
    /// For E4M3 codes: the device f32 that turns them back into weights.
    pub fp8_scale: Option<sys::CUdeviceptr>,
}

impl MatrixRef {
    /// A matrix in the weight type.
    pub fn plain(ptr: sys::CUdeviceptr) -> Self {
        Self {
            ptr,
            fp8_scale: None,
        }
    }
}

/// The most tokens a step may have for the matrix–vector kernels. Above 4 the x
/// operands' loads and conversions outweigh the weights' (an H100 at Llama-3.1-8B's
/// shapes, `tandem gpu decode-gemms`: 1.08× cuBLAS at 1 token, level at 2 to 4, 0.79× at
/// 8), and cuBLAS's GEMMs take over.
pub const GEMV_MAX_TOKENS: usize = 4;

/// Warps (so rows, or row pairs) per thread block of the matrix–vector kernels.
const WARPS_PER_BLOCK: usize = 8;

/// The compiled matrix–vector kernels, by tokens − 1: for weights in the weight type,
/// and for E4M3 weights.
struct GemvKernels {
    plain: Vec<Kernel>,
    silu: Vec<Kernel>,
    fp8_plain: Vec<Kernel>,
    fp8_silu: Vec<Kernel>,
}

/// Runs a forward pass's matrix products: the matrix–vector kernels for small steps
/// (when on), cuBLAS (cuBLASLt for FP8 matrices) otherwise.
pub struct Products {
    gemv: Option<GemvKernels>,
    fp8: Option<Fp8Products>,
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
                fp8_plain: load("gemv_f8_t")?,
                fp8_silu: load("gemv_silu_f8_t")?,
            })
        } else {
            None
        };
        Ok(Self {
            gemv: kernels,
            fp8: None,
        })
    }

    /// Adds the FP8 products, for steps of up to `max_tokens` tokens over matrices of
    /// up to `max_cols` columns.
    pub fn with_fp8(
        mut self,
        gpu: &Gpu,
        max_tokens: usize,
        max_cols: usize,
    ) -> Result<Self, GpuError> {
        self.fp8 = Some(Fp8Products::new(gpu, max_tokens, max_cols)?);
        Ok(self)
    }

    /// Device bytes the products hold beyond cuBLAS's own workspace.
    pub fn device_bytes(&self) -> usize {
        self.fp8.as_ref().map_or(0, Fp8Products::device_bytes)
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
    /// W in the weight type (or E4M3 with its scale) and X in the weight type,
    /// accumulated in f32; Y as `out` says (the matrix–vector kernels write f32 only: a
    /// weight-type result goes to cuBLAS).
    ///
    /// # Safety
    /// The pointers must hold the matrices' sizes (Y's elements of `out`'s type); an
    /// E4M3 matrix's rows and cols must be multiples of [`super::fp8::FP8_ALIGNMENT`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul(
        &self,
        gpu: &Gpu,
        w: MatrixRef,
        rows: usize,
        cols: usize,
        x: sys::CUdeviceptr,
        tokens: usize,
        y: sys::CUdeviceptr,
        out: ProductOut,
    ) -> Result<(), GpuError> {
        let fp8 = w.fp8_scale.is_some();
        let gemv = match out {
            ProductOut::WeightType => None,
            ProductOut::F32 | ProductOut::F32Accumulate => {
                self.gemv_kernel(tokens, cols, &[w.ptr, x], false, fp8)
            }
        };
        let accumulate = i32::from(out == ProductOut::F32Accumulate);
        let (w_ptr, rows_i, cols_i) = (w.ptr, rows as i32, cols as i32);
        // Mirrors GemvRows in kernels.cu.
        let warps = rows.div_ceil(if tokens >= 4 { 2 } else { 1 });
        // SAFETY (every arm): the caller's promise; each kernel's parameters in order.
        match (gemv, w.fp8_scale) {
            (Some(kernel), None) => unsafe {
                let mut args = kernel_args![w_ptr, rows_i, cols_i, x, y, accumulate];
                launch(gpu, kernel, warps, &mut args)
            },
            (Some(kernel), Some(scale)) => unsafe {
                let mut args = kernel_args![w_ptr, scale, rows_i, cols_i, x, y, accumulate];
                launch(gpu, kernel, warps, &mut args)
            },
            (None, None) => unsafe { gpu.matmul(w.ptr, rows, cols, x, tokens, y, out) },
            (None, Some(scale)) => unsafe {
                self.fp8()?
                    .matmul(gpu, w.ptr, scale, (rows, cols), x, tokens, y, out)
            },
        }
    }

    fn fp8(&self) -> Result<&Fp8Products, GpuError> {
        self.fp8.as_ref().ok_or_else(|| {
            GpuError::Unsupported("an FP8 matrix in products set up without FP8".into())
        })
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
        w: MatrixRef,
        inter: usize,
        cols: usize,
        x: sys::CUdeviceptr,
        tokens: usize,
        act: sys::CUdeviceptr,
    ) -> Result<bool, GpuError> {
        let fp8 = w.fp8_scale.is_some();
        let Some(kernel) = self.gemv_kernel(tokens, cols, &[w.ptr, x, act], true, fp8) else {
            return Ok(false);
        };
        let (w_ptr, inter_i, cols_i) = (w.ptr, inter as i32, cols as i32);
        // SAFETY (both arms): the caller's promise; the kernel's parameters in order.
        match w.fp8_scale {
            None => unsafe {
                let mut args = kernel_args![w_ptr, inter_i, cols_i, x, act];
                launch(gpu, kernel, inter, &mut args)?
            },
            Some(scale) => unsafe {
                let mut args = kernel_args![w_ptr, scale, inter_i, cols_i, x, act];
                launch(gpu, kernel, inter, &mut args)?
            },
        }
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
        fp8: bool,
    ) -> Option<Kernel> {
        let kernels = self.gemv.as_ref()?;
        let chunk = if fp8 { 16 } else { 8 };
        let aligned = cols.is_multiple_of(chunk) && pointers.iter().all(|p| p.is_multiple_of(16));
        if !self.uses_gemv(tokens) || !aligned {
            return None;
        }
        let set = match (silu, fp8) {
            (false, false) => &kernels.plain,
            (true, false) => &kernels.silu,
            (false, true) => &kernels.fp8_plain,
            (true, true) => &kernels.fp8_silu,
        };
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
