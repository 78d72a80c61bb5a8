//! The practical ceilings of the GPUs here, measured with CUDA events: device-to-device
//! copy bandwidth (the memory roofline of a decode step, which streams every weight
//! once), pinned host↔device bandwidth (the staging path of a cross-host hand-off),
//! GPU-to-GPU peer copies (the same-host hand-off), and cuBLAS bf16 GEMM FLOP/s (the
//! compute roofline of prefill). Each figure is the best of several timed repetitions
//! after a warm-up; the GEMM rate also as sustained for a second after a second's
//! warm-up, since a GPU that reaches its power limit clocks down (an H100 at 700 W
//! runs its GEMMs at ~1.6 GHz instead of its 1.98 GHz boost).

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys as blas_sys};
use cudarc::driver::{CudaContext, CudaStream, DriverError, sys};
use half::bf16;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("cuBLAS: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    #[error("no GPU {ordinal}: this machine has {count}")]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error(transparent)]
    Gpu(#[from] super::GpuError),
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct Probe {
    pub ordinal: usize,
    /// Bytes per copy.
    pub copy_bytes: usize,
    /// M = N = K of the GEMM.
    pub gemm_size: usize,
    /// Timed repetitions (the best counts).
    pub repeats: usize,
}

/// One GPU's ceilings.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub memory_bytes: usize,
    pub copy_bytes: usize,
    /// Bytes copied per second, device to device (each byte is read and written).
    pub dtod_bytes_per_second: f64,
    /// Pinned host memory to the device, and back.
    pub htod_bytes_per_second: f64,
    pub dtoh_bytes_per_second: f64,
    /// To the next GPU (`ordinal + 1`), when there is one.
    pub peer: Option<PeerCopy>,
    pub gemm_size: usize,
    /// Random operands, f32 accumulation (cuBLAS's default for bf16): the best of a few
    /// single GEMMs (the boost clock).
    pub bf16_gemm_flops: f64,
    /// The same GEMM back to back for [`SUSTAIN_SECONDS`], timed after as long again
    /// of warm-up: the rate work that lasts longer than a burst can count on.
    pub bf16_gemm_sustained_flops: f64,
}

/// How long the sustained GEMM rate is timed for (after as long of warm-up).
pub const SUSTAIN_SECONDS: f64 = 1.0;

#[derive(Debug, Clone, Serialize)]
pub struct PeerCopy {
    pub to: usize,
    /// Whether the driver allowed direct peer access (else copies go through the host).
    pub peer_access: bool,
    pub bytes_per_second: f64,
}

/// How many GPUs the driver sees.
pub fn device_count() -> Result<usize, LimitsError> {
    super::gpu::check_libraries()?;
    Ok(CudaContext::device_count()? as usize)
}

/// Measures GPU `probe.ordinal`.
pub fn measure(probe: &Probe) -> Result<Limits, LimitsError> {
    let count = device_count()?;
    if probe.ordinal >= count {
        return Err(LimitsError::NoSuchDevice {
            ordinal: probe.ordinal,
            count,
        });
    }
    let ctx = CudaContext::new(probe.ordinal)?;
    let stream = ctx.default_stream();
    let gemm = bf16_gemm(&stream, probe)?;
    let peer = if probe.ordinal + 1 < count {
        Some(peer_copy(&ctx, probe.ordinal + 1, probe)?)
    } else {
        None
    };
    Ok(Limits {
        ordinal: probe.ordinal,
        name: ctx.name()?,
        compute_capability: ctx.compute_capability()?,
        memory_bytes: ctx.total_mem()?,
        copy_bytes: probe.copy_bytes,
        dtod_bytes_per_second: dtod(&stream, probe)?,
        htod_bytes_per_second: host_copy(&ctx, &stream, probe, Direction::ToDevice)?,
        dtoh_bytes_per_second: host_copy(&ctx, &stream, probe, Direction::ToHost)?,
        peer,
        gemm_size: probe.gemm_size,
        bf16_gemm_flops: gemm.burst_flops,
        bf16_gemm_sustained_flops: gemm.sustained_flops,
    })
}

/// `count` values uniform in [-1, 1] (after bf16 rounding) from a small LCG (reproducible, no dependency).
pub(crate) fn random_bf16(count: usize, seed: u64) -> Vec<bf16> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
            bf16::from_f32(2.0 * unit - 1.0)
        })
        .collect()
}

/// Best seconds of `repeats` runs of `work` on `stream`, after one untimed run.
pub(crate) fn best_seconds(
    stream: &Arc<CudaStream>,
    repeats: usize,
    mut work: impl FnMut() -> Result<(), LimitsError>,
) -> Result<f64, LimitsError> {
    work()?;
    stream.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let start = stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        work()?;
        let end = stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        best = best.min(f64::from(start.elapsed_ms(&end)?) / 1e3);
    }
    Ok(best)
}

/// Device-to-device copy rate (bytes copied per second) of GPU `probe.ordinal`.
pub fn dtod_on(probe: &Probe) -> Result<f64, LimitsError> {
    super::gpu::check_libraries()?;
    let ctx = CudaContext::new(probe.ordinal)?;
    dtod(&ctx.default_stream(), probe)
}

fn dtod(stream: &Arc<CudaStream>, probe: &Probe) -> Result<f64, LimitsError> {
    let src = stream.alloc_zeros::<u8>(probe.copy_bytes)?;
    let mut dst = stream.alloc_zeros::<u8>(probe.copy_bytes)?;
    let seconds = best_seconds(stream, probe.repeats, || {
        Ok(stream.memcpy_dtod(&src, &mut dst)?)
    })?;
    Ok(probe.copy_bytes as f64 / seconds)
}

enum Direction {
    ToDevice,
    ToHost,
}

fn host_copy(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    probe: &Probe,
    direction: Direction,
) -> Result<f64, LimitsError> {
    // SAFETY: the pinned buffer is only copied from and into, never read as values.
    let mut host = unsafe { ctx.alloc_pinned_with_flags::<u8>(probe.copy_bytes, 0)? };
    let mut device = stream.alloc_zeros::<u8>(probe.copy_bytes)?;
    let seconds = best_seconds(stream, probe.repeats, || {
        match direction {
            Direction::ToDevice => stream.memcpy_htod(&host, &mut device)?,
            Direction::ToHost => stream.memcpy_dtoh(&device, &mut host)?,
        }
        Ok(())
    })?;
    Ok(probe.copy_bytes as f64 / seconds)
}

fn peer_copy(ctx: &Arc<CudaContext>, to: usize, probe: &Probe) -> Result<PeerCopy, LimitsError> {
    let other = CudaContext::new(to)?;
    let peer_access = enable_peer_access(ctx, &other)? && enable_peer_access(&other, ctx)?;
    // Plain cuMemAlloc buffers: stream-ordered (pool) allocations are not reachable by
    // peers without cuMemPoolSetAccess, and copies between them would be staged
    // through the host.
    let dst = RawBuffer::new(&other, probe.copy_bytes)?;
    let src = RawBuffer::new(ctx, probe.copy_bytes)?;
    ctx.bind_to_thread()?;
    let stream = ctx.new_stream()?;
    let seconds = best_seconds(&stream, probe.repeats, || {
        // SAFETY: both buffers are live for the whole measurement and of copy_bytes.
        unsafe {
            cudarc::driver::result::memcpy_peer_async(
                other.cu_ctx(),
                dst.ptr,
                ctx.cu_ctx(),
                src.ptr,
                probe.copy_bytes,
                stream.cu_stream(),
            )?;
        }
        Ok(())
    })?;
    Ok(PeerCopy {
        to,
        peer_access,
        bytes_per_second: probe.copy_bytes as f64 / seconds,
    })
}

/// Lets `from` address `to`'s memory directly; whether the driver allows it.
fn enable_peer_access(from: &Arc<CudaContext>, to: &Arc<CudaContext>) -> Result<bool, LimitsError> {
    from.bind_to_thread()?;
    let mut can = 0;
    // SAFETY: plain driver queries and settings on two live contexts.
    unsafe {
        sys::cuDeviceCanAccessPeer(&mut can, from.cu_device(), to.cu_device()).result()?;
        if can != 1 {
            return Ok(false);
        }
        match sys::cuCtxEnablePeerAccess(to.cu_ctx(), 0) {
            sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {
                Ok(true)
            }
            other => Err(DriverError(other).into()),
        }
    }
}

/// Device memory from cuMemAlloc, freed on drop.
struct RawBuffer {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
}

impl RawBuffer {
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self, LimitsError> {
        ctx.bind_to_thread()?;
        let mut ptr = 0;
        // SAFETY: allocates `bytes` in the bound context; freed once, on drop.
        unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes).result()? };
        Ok(Self {
            ctx: ctx.clone(),
            ptr,
        })
    }
}

impl Drop for RawBuffer {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from cuMemAlloc in this context and is freed only here.
            unsafe {
                let _ = sys::cuMemFree_v2(self.ptr);
            }
        }
    }
}

/// The bf16 GEMM rate in a burst and sustained.
struct GemmRates {
    burst_flops: f64,
    sustained_flops: f64,
}

fn bf16_gemm(stream: &Arc<CudaStream>, probe: &Probe) -> Result<GemmRates, LimitsError> {
    let n = probe.gemm_size;
    // Random operands: zeros let the chip run cooler and clock higher than real data.
    let a = stream.clone_htod(&random_bf16(n * n, 1))?;
    let b = stream.clone_htod(&random_bf16(n * n, 2))?;
    let mut c = stream.alloc_zeros::<bf16>(n * n)?;
    let blas = CudaBlas::new(stream.clone())?;
    let side = n as i32;
    let config = GemmConfig {
        transa: blas_sys::cublasOperation_t::CUBLAS_OP_N,
        transb: blas_sys::cublasOperation_t::CUBLAS_OP_N,
        m: side,
        n: side,
        k: side,
        alpha: bf16::ONE,
        lda: side,
        ldb: side,
        beta: bf16::ZERO,
        ldc: side,
    };
    let mut gemm = || {
        // SAFETY: a, b and c are n×n bf16 matrices, as the config says.
        unsafe { blas.gemm(config, &a, &b, &mut c)? };
        Ok(())
    };
    let flops = 2.0 * (n as f64).powi(3);
    let burst = best_seconds(stream, probe.repeats, &mut gemm)?;
    let count = ((SUSTAIN_SECONDS / burst).ceil() as usize).max(1);
    // best_seconds runs the whole series once untimed first: that is the warm-up.
    let sustained = best_seconds(stream, 1, || {
        for _ in 0..count {
            gemm()?;
        }
        Ok(())
    })?;
    Ok(GemmRates {
        burst_flops: flops / burst,
        sustained_flops: flops * count as f64 / sustained,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs a GPU: `cargo test -p tandem-engine --features cuda -- --ignored`.
    #[test]
    #[ignore]
    fn limits_are_measured_and_plausible() {
        let probe = Probe {
            ordinal: 0,
            copy_bytes: 64 << 20,
            gemm_size: 1024,
            repeats: 3,
        };
        let limits = measure(&probe).unwrap();
        assert!(limits.dtod_bytes_per_second > 1e9, "{limits:?}");
        assert!(limits.htod_bytes_per_second > 1e8, "{limits:?}");
        assert!(limits.bf16_gemm_flops > 1e11, "{limits:?}");
        assert!(limits.bf16_gemm_sustained_flops > 1e11, "{limits:?}");
        let too_far = Probe {
            ordinal: device_count().unwrap(),
            ..probe
        };
        assert!(matches!(
            measure(&too_far),
            Err(LimitsError::NoSuchDevice { .. })
        ));
    }

    #[test]
    fn random_operands_are_spread_over_the_unit_interval() {
        let values = random_bf16(10_000, 1);
        let mean = values.iter().map(|v| v.to_f32()).sum::<f32>() / 10_000.0;
        assert!(mean.abs() < 0.05, "{mean}");
        assert!(values.iter().all(|v| (-1.0..=1.0).contains(&v.to_f32())));
        assert_ne!(random_bf16(4, 1), random_bf16(4, 2));
    }
}
