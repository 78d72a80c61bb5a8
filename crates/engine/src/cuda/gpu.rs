//! One GPU as the engine uses it: its context and compute stream, device and pinned
//! host allocations that free themselves, the kernel module, cuBLAS, and the errors of
//! all of these.
//!
//! Everything here goes through the CUDA driver API with raw device pointers (cudarc's
//! `result`/`sys` layers), not cudarc's tracked slices: the forward pass is captured
//! into CUDA graphs, and a captured launch must not record events or allocate.

use std::ffi::{CString, c_void};
use std::sync::Arc;

use cudarc::cublas::result::CublasError;
use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{CudaContext, CudaStream, DriverError, result, sys};

use super::ptx;
pub use crate::exec::WeightDtype;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("cuBLAS: {0}")]
    Blas(#[from] CublasError),
    #[error("cuBLASLt: {0}")]
    BlasLt(#[from] cudarc::cublaslt::result::CublasError),
    #[error("no GPU {ordinal}: this machine has {count}")]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error("the GPU engine does not support {0}")]
    Unsupported(String),
    #[error(
        "cannot load {0}: GPUs need the NVIDIA driver (libcuda.so.1) and cuBLAS 13 \
         (libcublas.so.13) on the library path, e.g. \
         LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib (docs/gpu.md)"
    )]
    MissingLibrary(&'static str),
    #[error(
        "not enough GPU memory: {what} needs {needed} bytes, {available} are available \
         (raise --gpu-memory-utilization or lower --kv-cache-memory/--max-num-batched-tokens)"
    )]
    OutOfMemory {
        what: &'static str,
        needed: usize,
        available: usize,
    },
}

/// cuBLAS's name of a weight type.
pub(crate) fn blas_type(dtype: WeightDtype) -> blas_sys::cudaDataType {
    match dtype {
        WeightDtype::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        WeightDtype::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
    }
}

/// Device memory from `cuMemAlloc` (never the stream-ordered pool: such memory can be
/// exported to another process and read by a peer GPU), freed on drop.
pub struct DeviceBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: a device pointer is an address; who touches the memory when is up to the
// stream order of the users (documented where buffers are shared).
unsafe impl Send for DeviceBuffer {}
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    /// `bytes` of zeroed device memory.
    pub fn zeroed(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self, GpuError> {
        ctx.bind_to_thread()?;
        let bytes = bytes.max(16);
        // SAFETY: a plain allocation; zeroed before anyone reads it.
        let ptr = unsafe { result::malloc_sync(bytes) }?;
        let buffer = Self {
            ptr,
            bytes,
            ctx: ctx.clone(),
        };
        // SAFETY: the allocation is `bytes` long.
        unsafe { result::memset_d8_sync(ptr, 0, bytes) }?;
        Ok(buffer)
    }

    /// A buffer holding `values`.
    pub fn from_slice<T: Copy>(ctx: &Arc<CudaContext>, values: &[T]) -> Result<Self, GpuError> {
        let mut buffer = Self::zeroed(ctx, std::mem::size_of_val(values))?;
        buffer.upload(0, values)?;
        Ok(buffer)
    }

    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Copies `values` to byte `offset`, synchronously (`&mut`: no kernel may be
    /// using the buffer meanwhile).
    pub fn upload<T: Copy>(&mut self, offset: usize, values: &[T]) -> Result<(), GpuError> {
        let len = std::mem::size_of_val(values);
        assert!(offset + len <= self.bytes, "upload past the buffer");
        self.ctx.bind_to_thread()?;
        // SAFETY: in bounds (checked); `values` is plain data.
        unsafe { result::memcpy_htod_sync(self.ptr + offset as u64, values) }?;
        Ok(())
    }

    /// Copies from byte `offset` into `out`, synchronously.
    pub fn download<T: Copy>(&self, offset: usize, out: &mut [T]) -> Result<(), GpuError> {
        let len = std::mem::size_of_val(out);
        assert!(offset + len <= self.bytes, "download past the buffer");
        self.ctx.bind_to_thread()?;
        // SAFETY: in bounds (checked); `out` is plain data.
        unsafe { result::memcpy_dtoh_sync(out, self.ptr + offset as u64) }?;
        Ok(())
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by malloc_sync and freed once.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Page-locked host memory (fast, asynchronous copies to and from the GPU), freed on
/// drop.
pub struct PinnedBuffer<T: Copy> {
    ptr: *mut T,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: plain host memory owned by this value.
unsafe impl<T: Copy + Send> Send for PinnedBuffer<T> {}
unsafe impl<T: Copy + Sync> Sync for PinnedBuffer<T> {}

impl<T: Copy + Default> PinnedBuffer<T> {
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, GpuError> {
        ctx.bind_to_thread()?;
        let bytes = (len * std::mem::size_of::<T>()).max(16);
        // SAFETY: a plain pinned allocation, initialised below.
        let ptr = unsafe { result::malloc_host(bytes, 0) }? as *mut T;
        for i in 0..len {
            // SAFETY: in bounds of the fresh allocation.
            unsafe { ptr.add(i).write(T::default()) };
        }
        Ok(Self {
            ptr,
            len,
            ctx: ctx.clone(),
        })
    }
}

impl<T: Copy> PinnedBuffer<T> {
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: `len` initialised values owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T: Copy> Drop for PinnedBuffer<T> {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by malloc_host and freed once.
            let _ = unsafe { result::free_host(self.ptr as *mut c_void) };
        }
    }
}

/// A loaded PTX module and its kernels, by name.
pub struct Module {
    module: sys::CUmodule,
    ctx: Arc<CudaContext>,
}

// SAFETY: module handles are usable from any thread bound to the context.
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

/// A kernel of a [`Module`] (valid while the module lives; the module is kept by
/// [`Gpu`] for the process's life).
#[derive(Clone, Copy)]
pub struct Kernel {
    function: sys::CUfunction,
}

// SAFETY: as for Module.
unsafe impl Send for Kernel {}
unsafe impl Sync for Kernel {}

impl Module {
    fn load(ctx: &Arc<CudaContext>, ptx: &str) -> Result<Self, GpuError> {
        ctx.bind_to_thread()?;
        let text = CString::new(ptx).expect("PTX has no NUL bytes");
        // SAFETY: a NUL-terminated PTX text.
        let module = unsafe { result::module::load_data(text.as_ptr() as *const c_void) }?;
        Ok(Self {
            module,
            ctx: ctx.clone(),
        })
    }

    pub fn kernel(&self, name: &str) -> Result<Kernel, GpuError> {
        self.ctx.bind_to_thread()?;
        let name = CString::new(name).expect("kernel names have no NUL bytes");
        // SAFETY: the module is loaded.
        let function = unsafe { result::module::get_function(self.module, name) }?;
        Ok(Kernel { function })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: loaded once, unloaded once.
            let _ = unsafe { result::module::unload(self.module) };
        }
    }
}

impl Kernel {
    pub fn function(&self) -> sys::CUfunction {
        self.function
    }

    /// Lets the kernel use up to `bytes` of dynamic shared memory (beyond the default
    /// 48 KiB).
    pub fn allow_shared_memory(&self, bytes: usize) -> Result<(), GpuError> {
        // SAFETY: a valid function handle.
        unsafe {
            result::function::set_function_attribute(
                self.function,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }?;
        Ok(())
    }
}

/// The launch parameters of a kernel: pointers to each argument, in order.
macro_rules! kernel_args {
    ($($arg:expr),* $(,)?) => {
        [$((&$arg) as *const _ as *mut ::std::ffi::c_void),*]
    };
}
pub(crate) use kernel_args;

/// Where a matrix product's result goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProductOut {
    /// f32, overwriting Y.
    F32,
    /// f32, added to Y (the residual connection).
    F32Accumulate,
    /// The weight type (f16 or bf16), overwriting Y: half the bytes of f32 for a product
    /// whose result only feeds an element-wise kernel (the gate/up product).
    WeightType,
}

/// The GPU the engine runs on.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    /// Every forward pass runs on this stream, in order.
    pub stream: Arc<CudaStream>,
    pub module: Module,
    pub weight_dtype: WeightDtype,
    blas: blas_sys::cublasHandle_t,
    /// cuBLAS's scratch, set explicitly so that captured products never allocate.
    _blas_workspace: DeviceBuffer,
    pub multiprocessors: usize,
    pub total_memory: usize,
}

// SAFETY: the cuBLAS handle and the compute stream are used only by the one
// `GpuRunner` a `Gpu` serves (one per worker), on one thread at a time; the hand-off
// uses its own stream and no cuBLAS.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

pub(crate) const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Checks that the CUDA driver and cuBLAS can be loaded (cudarc panics on a first call
/// into a library it cannot find).
pub fn check_libraries() -> Result<(), GpuError> {
    // SAFETY: only tries to open the libraries.
    if !unsafe { sys::is_culib_present() } {
        return Err(GpuError::MissingLibrary("the CUDA driver library"));
    }
    // SAFETY: as above.
    if !unsafe { blas_sys::is_culib_present() } {
        return Err(GpuError::MissingLibrary("cuBLAS"));
    }
    Ok(())
}

impl Gpu {
    /// Opens GPU `ordinal` and loads the kernels for `weight_dtype`.
    pub fn open(ordinal: usize, weight_dtype: WeightDtype) -> Result<Self, GpuError> {
        check_libraries()?;
        let count = CudaContext::device_count()? as usize;
        if ordinal >= count {
            return Err(GpuError::NoSuchDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        if major < 8 {
            return Err(GpuError::Unsupported(format!(
                "compute capability {major}.{minor} (8.0 or newer is needed)"
            )));
        }
        // The engine orders its own work on one stream; cudarc's per-allocation event
        // tracking would also break graph capture.
        // SAFETY: no cudarc-tracked memory of this context is shared across streams.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let (_, total_memory) = result::mem_get_info()?;
        let module = Module::load(&ctx, ptx::source(weight_dtype))?;
        let blas = blas::create_handle()?;
        let workspace = DeviceBuffer::zeroed(&ctx, BLAS_WORKSPACE_BYTES)?;
        // SAFETY: a fresh handle, a live stream and workspace.
        unsafe {
            blas::set_stream(blas, stream.cu_stream() as _)?;
            blas_sys::cublasSetWorkspace_v2(
                blas,
                workspace.ptr() as *mut c_void,
                BLAS_WORKSPACE_BYTES,
            )
            .result()?;
        }
        let multiprocessors = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as usize;
        Ok(Self {
            ctx,
            stream,
            module,
            weight_dtype,
            blas,
            _blas_workspace: workspace,
            multiprocessors,
            total_memory,
        })
    }

    /// Binds the context to the calling thread (needed before raw driver calls on a
    /// thread that has not used this GPU yet).
    pub fn bind(&self) -> Result<(), GpuError> {
        Ok(self.ctx.bind_to_thread()?)
    }

    pub fn free_memory(&self) -> Result<(usize, usize), GpuError> {
        self.bind()?;
        Ok(result::mem_get_info()?)
    }

    /// Queues `kernel` on the compute stream.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number, order and type, and every
    /// pointer among them must be valid for what the kernel does with it.
    pub unsafe fn launch(
        &self,
        kernel: Kernel,
        grid: (u32, u32, u32),
        block: u32,
        shared_bytes: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), GpuError> {
        // SAFETY: the caller's promise.
        unsafe {
            result::launch_kernel(
                kernel.function,
                grid,
                (block, 1, 1),
                shared_bytes,
                self.stream.cu_stream(),
                args,
            )
        }?;
        Ok(())
    }

    /// `Y[tokens × rows] (+)= X[tokens × cols] · Wᵀ` for a row-major `W[rows × cols]`:
    /// W and X in the weight type, accumulated in f32; Y as `out` says.
    ///
    /// # Safety
    /// The pointers must hold the matrices' sizes (Y's elements of `out`'s type).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul(
        &self,
        w: sys::CUdeviceptr,
        rows: usize,
        cols: usize,
        x: sys::CUdeviceptr,
        tokens: usize,
        y: sys::CUdeviceptr,
        out: ProductOut,
    ) -> Result<(), GpuError> {
        let alpha = 1.0f32;
        let beta = if out == ProductOut::F32Accumulate {
            1.0f32
        } else {
            0.0f32
        };
        let t = blas_type(self.weight_dtype);
        let y_type = match out {
            ProductOut::F32 | ProductOut::F32Accumulate => blas_sys::cudaDataType::CUDA_R_32F,
            ProductOut::WeightType => t,
        };
        // Column-major view: Yᵀ[rows × tokens] = op(W)ᵀ · Xᵀ, W read transposed.
        // SAFETY: the caller's promise on sizes; host-side scalars.
        unsafe {
            blas::gemm_ex(
                self.blas,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                rows as i32,
                tokens as i32,
                cols as i32,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                t,
                cols as i32,
                x as *const c_void,
                t,
                cols as i32,
                &beta as *const f32 as *const c_void,
                y as *mut c_void,
                y_type,
                rows as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
    }

    /// Waits for everything queued on the compute stream.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: created once in `open`, destroyed once.
            let _ = unsafe { blas::destroy_handle(self.blas) };
        }
    }
}
