//! The KV cache in GPU memory, in the CPU store's block-major layout (one block = one
//! contiguous run of [`KvLayout::bytes_per_block`] bytes, every layer's keys and values;
//! see `crate::kv`), so blocks hand off between GPU and CPU workers alike.
//!
//! One extra block past the pool's last is the *padding block*: the rows a CUDA graph
//! runs beyond the real batch write their keys and values there, and nothing reads it
//! for a real sequence.
//!
//! The hand-off copies blocks between this memory and the host on its own stream
//! ([`DeviceKv::read_blocks`], [`DeviceKv::write_blocks`]), or straight from another
//! GPU's cache ([`DeviceKv::copy_from_peer`]); the block pool's ownership rules (a
//! leased or pulling block is never touched by the engine loop) keep those copies and
//! the forward pass apart, as on the CPU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaStream, result, sys};

use super::gpu::{DeviceBuffer, Gpu, GpuError, PinnedBuffer, kernel_args};
use crate::kv::{BlockId, KvDtype, KvLayout};

/// Bytes of one pinned staging buffer (several blocks).
const STAGING_BYTES: usize = 16 << 20;
/// Staging buffers kept for reuse (pinning memory costs ~1 ms per 8 MB).
const STAGING_POOL: usize = 8;
/// Blocks copied per kernel launch of a GPU-to-GPU hand-off.
const COPY_BATCH: usize = 4096;
/// Other processes' caches kept mapped at once.
const MAX_MAPPED_PEERS: usize = 16;
/// A mapping unused this long is closed (its exporter may have exited: CUDA leaves
/// freeing exported memory that is still mapped undefined).
const MAPPING_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Another process's KV cache, mapped into this one through CUDA IPC; unmapped when the
/// last holder (the peer table, a copy in progress) lets go.
pub struct MappedPeer {
    base: sys::CUdeviceptr,
    gpu: Arc<Gpu>,
}

impl MappedPeer {
    /// Device address of the peer's block 0, valid while this value lives.
    pub fn base(&self) -> sys::CUdeviceptr {
        self.base
    }
}

impl Drop for MappedPeer {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: opened by cuIpcOpenMemHandle and closed once, by the last holder.
            let _ = unsafe { sys::cuIpcCloseMemHandle(self.base).result() };
        }
    }
}

/// A peer table entry.
struct PeerEntry {
    handle: [u8; 64],
    /// `None`: mapping this handle failed; such peers get bytes without retrying.
    mapped: Option<Arc<MappedPeer>>,
    last_used: std::time::Instant,
}

pub struct DeviceKv {
    memory: DeviceBuffer,
    layout: KvLayout,
    /// Blocks the pool hands out (the padding block is extra).
    num_blocks: usize,
    gpu: Arc<Gpu>,
    /// Hand-off copies, off the compute stream.
    transfer: Arc<CudaStream>,
    /// The `copy_blocks` kernel.
    copy_kernel: super::gpu::Kernel,
    /// Block ids of GPU-to-GPU copies (source ids, then destination ids).
    copy_ids: Mutex<DeviceBuffer>,
    /// Free pinned staging buffers.
    staging: Mutex<Vec<PinnedBuffer<u8>>>,
    /// By the peer's engine id.
    peers: Mutex<HashMap<String, PeerEntry>>,
}

impl DeviceKv {
    /// A cache of `num_blocks` usable blocks (plus the padding block).
    pub fn new(gpu: Arc<Gpu>, layout: KvLayout, num_blocks: usize) -> Result<Self, GpuError> {
        if layout.dtype != KvDtype::F16 {
            return Err(GpuError::Unsupported(format!(
                "a {} KV cache (use --kv-cache-dtype f16)",
                layout.dtype.name()
            )));
        }
        let bytes = (num_blocks + 1) * layout.bytes_per_block();
        let (free, _) = gpu.free_memory()?;
        if bytes > free {
            return Err(GpuError::OutOfMemory {
                what: "the KV cache",
                needed: bytes,
                available: free,
            });
        }
        let memory = DeviceBuffer::zeroed(&gpu.ctx, bytes)?;
        let transfer = gpu.ctx.new_stream()?;
        let gpu_ctx = gpu.ctx.clone();
        let copy_kernel = gpu.module.kernel("copy_blocks")?;
        Ok(Self {
            memory,
            layout,
            num_blocks,
            gpu,
            transfer,
            staging: Mutex::new(Vec::new()),
            copy_kernel,
            copy_ids: Mutex::new(DeviceBuffer::zeroed(&gpu_ctx, 8 * COPY_BATCH)?),
            peers: Mutex::new(HashMap::new()),
        })
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// The block that padding rows write to.
    pub fn padding_block(&self) -> BlockId {
        self.num_blocks as BlockId
    }

    /// Device address of the cache (block 0).
    pub fn base(&self) -> sys::CUdeviceptr {
        self.memory.ptr()
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn check(&self, blocks: &[BlockId]) -> Result<(), GpuError> {
        match blocks.iter().find(|&&b| b as usize >= self.num_blocks) {
            Some(&bad) => Err(GpuError::Unsupported(format!(
                "block {bad}, outside the KV cache ({} blocks)",
                self.num_blocks
            ))),
            None => Ok(()),
        }
    }

    /// A pinned host buffer of whole blocks for staging a hand-off (returned to a pool
    /// when dropped). Copies to and from pinned memory run at PCIe speed.
    pub fn staging(&self) -> Result<Staging<'_>, GpuError> {
        let reused = self.staging.lock().expect("staging lock").pop();
        let buffer = match reused {
            Some(buffer) => buffer,
            None => {
                let per_block = self.layout.bytes_per_block();
                let blocks = (STAGING_BYTES / per_block).max(1);
                PinnedBuffer::new(&self.gpu.ctx, blocks * per_block)?
            }
        };
        Ok(Staging {
            buffer: Some(buffer),
            pool: &self.staging,
        })
    }

    /// Copies `blocks` to `out` (their bytes back to back; fastest when `out` is
    /// [`Self::staging`] memory).
    ///
    /// # Safety
    /// Nobody may write these blocks meanwhile (the caller holds them: a lease).
    pub unsafe fn read_blocks(&self, blocks: &[BlockId], out: &mut [u8]) -> Result<(), GpuError> {
        let per_block = self.layout.bytes_per_block();
        if out.len() != blocks.len() * per_block {
            return Err(GpuError::Unsupported(format!(
                "reading {} blocks into {} bytes",
                blocks.len(),
                out.len()
            )));
        }
        self.check(blocks)?;
        self.gpu.bind()?;
        for (&block, dst) in blocks.iter().zip(out.chunks_mut(per_block)) {
            let src = self.memory.ptr() + (block as usize * per_block) as u64;
            // SAFETY: in bounds (checked); `out` outlives the copy (synchronised below).
            unsafe { result::memcpy_dtoh_async(dst, src, self.transfer.cu_stream()) }?;
        }
        self.transfer.synchronize()?;
        Ok(())
    }

    /// Fills `blocks` from `data` (their bytes back to back; fastest from
    /// [`Self::staging`] memory).
    ///
    /// # Safety
    /// Nobody may read or write these blocks meanwhile (they belong to a sequence that
    /// waits for exactly this data).
    pub unsafe fn write_blocks(&self, blocks: &[BlockId], data: &[u8]) -> Result<(), GpuError> {
        let per_block = self.layout.bytes_per_block();
        if data.len() != blocks.len() * per_block {
            return Err(GpuError::Unsupported(format!(
                "writing {} bytes into {} blocks",
                data.len(),
                blocks.len()
            )));
        }
        self.check(blocks)?;
        self.gpu.bind()?;
        for (&block, src) in blocks.iter().zip(data.chunks(per_block)) {
            let dst = self.memory.ptr() + (block as usize * per_block) as u64;
            // SAFETY: in bounds (checked); `data` outlives the copy (synchronised below).
            unsafe { result::memcpy_htod_async(dst, src, self.transfer.cu_stream()) }?;
        }
        self.transfer.synchronize()?;
        Ok(())
    }

    /// Copies blocks of another cache with this layout, readable from this GPU at
    /// `source_base` (a peer GPU's memory, or another process's opened through CUDA
    /// IPC): local block `local[i]` = remote block `remote[i]`. One kernel launch.
    ///
    /// # Safety
    /// `source_base` must be a live cache with this layout holding every `remote`
    /// block, none written meanwhile; `local` blocks must be this caller's alone.
    pub unsafe fn copy_from_peer(
        &self,
        source_base: sys::CUdeviceptr,
        remote: &[BlockId],
        local: &[BlockId],
    ) -> Result<(), GpuError> {
        if remote.len() != local.len() {
            return Err(GpuError::Unsupported(format!(
                "copying {} blocks into {}",
                remote.len(),
                local.len()
            )));
        }
        if local.is_empty() {
            return Ok(());
        }
        self.check(local)?;
        self.gpu.bind()?;
        let kernel = self.copy_kernel;
        let vectors = (self.layout.bytes_per_block() / 16) as i64;
        let mut ids_buffer = self.copy_ids.lock().expect("copy ids lock");
        for (remote, local) in remote.chunks(COPY_BATCH).zip(local.chunks(COPY_BATCH)) {
            let ids: Vec<i32> = remote.iter().chain(local).map(|&b| b as i32).collect();
            // Synchronous: the previous batch's kernel has finished reading the ids.
            ids_buffer.upload(0, &ids)?;
            let (src, dst) = (source_base, self.memory.ptr());
            let src_ids = ids_buffer.ptr();
            let dst_ids = ids_buffer.ptr() + 4 * remote.len() as u64;
            let mut args = kernel_args![src, src_ids, dst, dst_ids, vectors];
            // SAFETY: the kernel's parameters; the caller's promises on the memory.
            unsafe {
                result::launch_kernel(
                    kernel.function(),
                    (64, local.len() as u32, 1),
                    (256, 1, 1),
                    0,
                    self.transfer.cu_stream(),
                    &mut args,
                )
            }?;
            self.transfer.synchronize()?;
        }
        Ok(())
    }

    /// A CUDA IPC handle of the cache, for readers in other processes on this host.
    pub fn ipc_handle(&self) -> Result<[u8; 64], GpuError> {
        self.gpu.bind()?;
        let mut handle = std::mem::MaybeUninit::<sys::CUipcMemHandle>::uninit();
        // SAFETY: the cache is a live cuMemAlloc allocation.
        unsafe { sys::cuIpcGetMemHandle(handle.as_mut_ptr(), self.memory.ptr()).result() }?;
        // SAFETY: initialised by the call above.
        let handle = unsafe { handle.assume_init() };
        Ok(handle.reserved.map(|b| b as u8))
    }

    /// Bytes of the cache's allocation (what an IPC reader maps).
    pub fn allocation_bytes(&self) -> usize {
        self.memory.bytes()
    }

    /// `engine`'s cache exported as `handle`, mapped into this process, kept for the
    /// next hand-off (a new handle for the same engine replaces the old mapping; idle
    /// mappings close). `None` when it cannot be mapped (another container, no peer
    /// access): remembered, so later pulls go straight to bytes.
    pub fn map_peer(&self, engine: &str, handle: [u8; 64]) -> Option<Arc<MappedPeer>> {
        let now = std::time::Instant::now();
        let mut peers = self.peers.lock().expect("peer map lock");
        peers.retain(|_, p| now.duration_since(p.last_used) < MAPPING_IDLE);
        if let Some(entry) = peers.get_mut(engine)
            && entry.handle == handle
        {
            entry.last_used = now;
            return entry.mapped.clone();
        }
        if peers.len() >= MAX_MAPPED_PEERS
            && let Some(oldest) = peers
                .iter()
                .min_by_key(|(_, p)| p.last_used)
                .map(|(k, _)| k.clone())
        {
            peers.remove(&oldest);
        }
        let mapped = match self.open_mapping(handle) {
            Ok(mapped) => Some(Arc::new(mapped)),
            Err(err) => {
                tracing::warn!(%err, engine, "cannot map the prefill worker's GPU memory; reading bytes");
                None
            }
        };
        peers.insert(
            engine.to_owned(),
            PeerEntry {
                handle,
                mapped: mapped.clone(),
                last_used: now,
            },
        );
        mapped
    }

    fn open_mapping(&self, handle: [u8; 64]) -> Result<MappedPeer, GpuError> {
        self.gpu.bind()?;
        let raw = sys::CUipcMemHandle {
            reserved: handle.map(|b| b as std::ffi::c_char),
        };
        let mut base = 0;
        // SAFETY: a handle another process exported; the driver validates it.
        unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut base,
                raw,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
            .result()
        }?;
        Ok(MappedPeer {
            base,
            gpu: self.gpu.clone(),
        })
    }

    /// Forgets `engine`'s mapping (after a failed copy from it, or when it cannot be
    /// reached); it closes once no copy holds it.
    pub fn unmap_peer(&self, engine: &str) {
        self.peers.lock().expect("peer map lock").remove(engine);
    }
}

/// A pinned staging buffer on loan from a [`DeviceKv`]'s pool.
pub struct Staging<'a> {
    buffer: Option<PinnedBuffer<u8>>,
    pool: &'a Mutex<Vec<PinnedBuffer<u8>>>,
}

impl Staging<'_> {
    /// Whole blocks that fit.
    pub fn blocks(&self, bytes_per_block: usize) -> usize {
        self.len() / bytes_per_block
    }

    pub fn len(&self) -> usize {
        self.buffer.as_ref().map_or(0, PinnedBuffer::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.buffer
            .as_mut()
            .expect("present until drop")
            .as_mut_slice()
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        let mut pool = self.pool.lock().expect("staging lock");
        if pool.len() < STAGING_POOL
            && let Some(buffer) = self.buffer.take()
        {
            pool.push(buffer);
        }
    }
}
