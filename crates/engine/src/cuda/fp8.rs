//! The products of FP8 (E4M3) weight matrices for steps too large for the
//! matrix–vector kernels: each product's activations quantized on the GPU with one
//! scale (`fp8_amax`, `fp8_quantize` in kernels.cu), then cuBLASLt's scaled FP8 GEMM
//! on the tensor cores, accumulating in f32. The scheme is vLLM's `--quantization
//! fp8`: one f32 scale per weight matrix, one per product's activations. The format
//! and the weights' quantization at load: [`crate::e4m3`].

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys as lt_sys;
use cudarc::driver::{result, sys};

use super::gpu::{DeviceBuffer, Gpu, GpuError, Kernel, ProductOut, WeightDtype, kernel_args};

/// Matrix dimensions the FP8 products need to be multiples of (cuBLASLt's FP8 GEMM wants
/// 16-byte aligned leading dimensions; the E4M3 matrix–vector kernels read rows in
/// 16-byte chunks).
pub const FP8_ALIGNMENT: usize = 16;

/// What one cuBLASLt product is planned with: its descriptors and the algorithm the
/// heuristic picked, kept for every later product of the same shape.
struct Plan {
    desc: lt_sys::cublasLtMatmulDesc_t,
    a: lt_sys::cublasLtMatrixLayout_t,
    b: lt_sys::cublasLtMatrixLayout_t,
    d: lt_sys::cublasLtMatrixLayout_t,
    algo: lt_sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created once in `Fp8Products::plan`, destroyed once.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    rows: usize,
    cols: usize,
    tokens: usize,
    out: ProductOut,
}

/// cuBLASLt's scratch, given to every product so that captured ones never allocate.
const LT_WORKSPACE_BYTES: usize = 32 << 20;

/// The FP8 products of steps the matrix–vector kernels don't take.
pub struct Fp8Products {
    handle: lt_sys::cublasLtHandle_t,
    workspace: DeviceBuffer,
    /// `fp8_amax`'s result: the bits of one non-negative f32.
    amax: DeviceBuffer,
    /// The activations' scale of the product in flight (f32).
    x_scale: DeviceBuffer,
    /// The activations' codes: room for `max_tokens × max_cols` bytes.
    x_codes: DeviceBuffer,
    amax_kernel: Kernel,
    quantize_kernel: Kernel,
    plans: Mutex<HashMap<PlanKey, Plan>>,
}

// SAFETY: as `Gpu`: the handle and buffers are used by the one runner a `Gpu` serves,
// on one thread at a time; the plan cache is behind a lock.
unsafe impl Send for Fp8Products {}
unsafe impl Sync for Fp8Products {}

impl Fp8Products {
    /// Products for steps of up to `max_tokens` tokens over matrices of up to `max_cols`
    /// columns.
    pub fn new(gpu: &Gpu, max_tokens: usize, max_cols: usize) -> Result<Self, GpuError> {
        // SAFETY: only tries to open the library.
        if !unsafe { lt_sys::is_culib_present() } {
            return Err(GpuError::MissingLibrary("cuBLASLt"));
        }
        gpu.bind()?;
        Ok(Self {
            handle: lt::create_handle()?,
            workspace: DeviceBuffer::zeroed(&gpu.ctx, LT_WORKSPACE_BYTES)?,
            amax: DeviceBuffer::zeroed(&gpu.ctx, 4)?,
            x_scale: DeviceBuffer::zeroed(&gpu.ctx, 4)?,
            x_codes: DeviceBuffer::zeroed(&gpu.ctx, max_tokens * max_cols)?,
            amax_kernel: gpu.module.kernel("fp8_amax")?,
            quantize_kernel: gpu.module.kernel("fp8_quantize")?,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// Device bytes these products hold.
    pub fn device_bytes(&self) -> usize {
        LT_WORKSPACE_BYTES + self.x_codes.bytes() + 8
    }

    /// `Y[tokens × rows] (+)= X[tokens × cols] · (scale · W)ᵀ` for a row-major E4M3
    /// `W[rows × cols]` and X in the weight type: X quantized, then one FP8 GEMM
    /// accumulating in f32; Y as `out` says.
    ///
    /// # Safety
    /// The pointers must hold the matrices' sizes; `w_scale` one f32; rows and cols
    /// multiples of [`FP8_ALIGNMENT`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul(
        &self,
        gpu: &Gpu,
        w: sys::CUdeviceptr,
        w_scale: sys::CUdeviceptr,
        (rows, cols): (usize, usize),
        x: sys::CUdeviceptr,
        tokens: usize,
        y: sys::CUdeviceptr,
        out: ProductOut,
    ) -> Result<(), GpuError> {
        let elements = tokens * cols;
        if elements > self.x_codes.bytes() {
            return Err(GpuError::Unsupported(format!(
                "an FP8 product of {tokens} × {cols} activations (room for {})",
                self.x_codes.bytes()
            )));
        }
        // SAFETY: the caller's promise on x; the scratch is sized above.
        unsafe { self.quantize_activations(gpu, x, elements)? };
        let mut plans = self.plans.lock().expect("fp8 plan lock");
        let key = PlanKey {
            rows,
            cols,
            tokens,
            out,
        };
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => entry.insert(self.plan(gpu, key)?),
        };
        let alpha = 1.0f32;
        let beta = if out == ProductOut::F32Accumulate {
            1.0f32
        } else {
            0.0f32
        };
        // SAFETY: a live plan; the scale pointers are device f32s that outlive the call
        // (and any graph it is captured into); the caller's promise on W and Y.
        unsafe {
            set_pointer(
                plan.desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                w_scale,
            )?;
            set_pointer(
                plan.desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                self.x_scale.ptr(),
            )?;
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w as *const c_void,
                plan.a,
                self.x_codes.ptr() as *const c_void,
                plan.b,
                y as *const c_void,
                plan.d,
                y as *mut c_void,
                plan.d,
                &plan.algo,
                self.workspace.ptr() as *mut c_void,
                LT_WORKSPACE_BYTES,
                gpu.stream.cu_stream() as lt_sys::cudaStream_t,
            )?;
        }
        Ok(())
    }

    /// Queues the activations' quantization: `elements` values at `x` into the codes
    /// scratch, their scale into `x_scale`.
    ///
    /// # Safety
    /// `x` must hold `elements` values of the weight type, `elements` a multiple of 8
    /// and at most the scratch's capacity.
    unsafe fn quantize_activations(
        &self,
        gpu: &Gpu,
        x: sys::CUdeviceptr,
        elements: usize,
    ) -> Result<(), GpuError> {
        let chunks = (elements / 8) as i64;
        let blocks = (elements / 8)
            .div_ceil(256)
            .clamp(1, 4 * gpu.multiprocessors) as u32;
        let (amax, scale, codes) = (self.amax.ptr(), self.x_scale.ptr(), self.x_codes.ptr());
        // SAFETY: the caller's promise; each kernel's parameters in order.
        unsafe {
            result::memset_d8_async(amax, 0, 4, gpu.stream.cu_stream())?;
            gpu.launch(
                self.amax_kernel,
                (blocks, 1, 1),
                256,
                0,
                &mut kernel_args![x, chunks, amax],
            )?;
            gpu.launch(
                self.quantize_kernel,
                (blocks, 1, 1),
                256,
                0,
                &mut kernel_args![x, chunks, amax, codes, scale],
            )
        }
    }

    /// Descriptors and an algorithm for one product shape. Column-major view, as
    /// `Gpu::matmul`: Yᵀ[rows × tokens] = Wᵀ · Xᵀ with W read transposed ("TN", the
    /// only layout cuBLASLt's FP8 GEMM takes).
    fn plan(&self, gpu: &Gpu, key: PlanKey) -> Result<Plan, GpuError> {
        use lt_sys::cudaDataType::{CUDA_R_8F_E4M3, CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F};
        let PlanKey {
            rows,
            cols,
            tokens,
            out,
        } = key;
        let d_type = match (out, gpu.weight_dtype) {
            (ProductOut::F32 | ProductOut::F32Accumulate, _) => CUDA_R_32F,
            (ProductOut::WeightType, WeightDtype::Bf16) => CUDA_R_16BF,
            (ProductOut::WeightType, WeightDtype::F16) => CUDA_R_16F,
        };
        let desc =
            lt::create_matmul_desc(lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, CUDA_R_32F)?;
        let transpose = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T as i32;
        // SAFETY: a fresh descriptor; the value outlives the call.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &transpose as *const _ as *const c_void,
                std::mem::size_of_val(&transpose),
            )?;
        }
        let (r, c, t) = (rows as u64, cols as u64, tokens as u64);
        let mut plan = Plan {
            desc,
            a: lt::create_matrix_layout(CUDA_R_8F_E4M3, c, r, cols as i64)?,
            b: lt::create_matrix_layout(CUDA_R_8F_E4M3, c, t, cols as i64)?,
            d: lt::create_matrix_layout(d_type, r, t, rows as i64)?,
            // SAFETY: plain data, overwritten below.
            algo: unsafe { std::mem::zeroed() },
        };
        let preference = lt::create_matmul_pref()?;
        let workspace = LT_WORKSPACE_BYTES as u64;
        // SAFETY: live descriptors; the preference is destroyed once.
        let heuristic = unsafe {
            let picked = lt::set_matmul_pref_attribute(
                preference,
                lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &workspace as *const u64 as *const c_void,
                8,
            )
            .and_then(|()| {
                lt::get_matmul_algo_heuristic(
                    self.handle,
                    plan.desc,
                    plan.a,
                    plan.b,
                    plan.d,
                    plan.d,
                    preference,
                )
            });
            let _ = lt::destroy_matmul_pref(preference);
            picked
        };
        plan.algo = heuristic
            .map_err(|e| {
                GpuError::Unsupported(format!(
                    "an FP8 product of {rows} × {cols} weights and {tokens} tokens ({e})"
                ))
            })?
            .algo;
        Ok(plan)
    }
}

impl Drop for Fp8Products {
    fn drop(&mut self) {
        self.plans.lock().expect("fp8 plan lock").clear();
        // SAFETY: created once in `new`, destroyed once, after its plans.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Sets a device-pointer attribute of a matmul descriptor.
///
/// # Safety
/// `desc` must be live.
unsafe fn set_pointer(
    desc: lt_sys::cublasLtMatmulDesc_t,
    attribute: lt_sys::cublasLtMatmulDescAttributes_t,
    pointer: sys::CUdeviceptr,
) -> Result<(), GpuError> {
    let value = pointer as *const c_void;
    // SAFETY: the caller's promise; cuBLASLt copies the value.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc,
            attribute,
            &value as *const *const c_void as *const c_void,
            std::mem::size_of::<*const c_void>(),
        )?;
    }
    Ok(())
}
