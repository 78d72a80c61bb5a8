//! The block-addressed KV store the forward pass reads and writes, and the free list
//! that hands out its blocks.
//!
//! A sequence's keys and values live in fixed-size blocks named by a block table
//! (position `p` is slot `p % block_size` of block `table[p / block_size]`), so
//! sequences grow without copying, share prefix blocks, and move between processes a
//! block at a time. The store is block-major: one block's keys and values for every
//! layer are one contiguous run of [`KvLayout::bytes_per_block`] bytes (what the KV
//! hand-off sends), laid out `[layer][keys, values][kv_head][slot][head_dim]`, so one
//! head's keys in one block are contiguous for the attention kernel.
//!
//! Values are stored as f16 by default, as llama.cpp and vLLM (for f16/bf16 models) do:
//! half the memory of f32. f32 storage is available for exactness checks.
//!
//! The memory is shared ([`KvMemory`]) between the engine loop, which writes only the
//! blocks its running sequences own, and the hand-off, which reads blocks leased to a
//! remote reader and fills blocks a sequence is waiting to receive. The block pool
//! guarantees those sets never overlap, so nobody ever touches a block that another
//! thread writes.
//!
//! [`sizing`] is a model's KV arithmetic before any store exists (`tandem kv`).

pub mod pool;
pub mod sizing;

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

use half::f16;
use half::slice::HalfFloatSliceExt;

pub use pool::{BlockHash, BlockPool, PrefixCacheStats};

/// Index of a block in a [`KvStore`].
pub type BlockId = u32;

/// Element type of the stored keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F16,
    F32,
}

impl KvDtype {
    pub fn size_bytes(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }

    /// The name used on the command line and in the hand-off fingerprint.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F16 => "f16",
            KvDtype::F32 => "f32",
        }
    }
}

/// The choices a user makes about a KV store; the model supplies the rest of the
/// [`KvLayout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvOptions {
    /// Positions per block.
    pub block_size: usize,
    pub dtype: KvDtype,
}

impl Default for KvOptions {
    fn default() -> Self {
        Self {
            block_size: 16,
            dtype: KvDtype::F16,
        }
    }
}

/// The geometry of a KV store; two stores can exchange blocks only if these match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub dtype: KvDtype,
}

impl KvLayout {
    /// The layout a model of shape `config` needs with the user's choices.
    pub fn for_model(config: &crate::model::ModelConfig, options: KvOptions) -> Self {
        Self {
            num_layers: config.num_layers,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            block_size: options.block_size.max(1),
            dtype: options.dtype,
        }
    }

    /// Values of K (or of V) that one block holds for one layer.
    pub fn values_per_layer_block(&self) -> usize {
        self.num_kv_heads * self.block_size * self.head_dim
    }

    /// Bytes one block occupies across all layers, K and V.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.num_layers * self.values_per_layer_block() * self.dtype.size_bytes()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
}

/// Keys or values.
#[derive(Debug, Clone, Copy)]
pub enum Plane {
    Keys = 0,
    Values = 1,
}

/// The bytes of every block of a KV store, 64-byte aligned and zeroed at start.
pub struct KvMemory {
    ptr: NonNull<u8>,
    alloc: Layout,
    layout: KvLayout,
    num_blocks: usize,
}

// SAFETY: KvMemory is a plain byte buffer; who may touch which block when is the
// contract of its unsafe accessors.
unsafe impl Send for KvMemory {}
// SAFETY: as above.
unsafe impl Sync for KvMemory {}

impl KvMemory {
    fn new(layout: KvLayout, num_blocks: usize) -> Self {
        let bytes = (num_blocks * layout.bytes_per_block()).max(1);
        let alloc = Layout::from_size_align(bytes, 64).expect("KV store size overflows");
        // SAFETY: `alloc` has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(alloc) };
        let Some(ptr) = NonNull::new(ptr) else {
            alloc::handle_alloc_error(alloc)
        };
        Self {
            ptr,
            alloc,
            layout,
            num_blocks,
        }
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Start of `block` in bytes; panics on an out-of-range block.
    fn block_start(&self, block: BlockId) -> usize {
        assert!(
            (block as usize) < self.num_blocks,
            "block {block} is outside the KV store ({} blocks)",
            self.num_blocks
        );
        block as usize * self.layout.bytes_per_block()
    }

    /// One block's bytes (every layer, keys and values).
    ///
    /// # Safety
    /// Nobody may write `block` while the returned slice lives: the caller holds a
    /// reference on it (a lease, or the engine loop's own sequence).
    pub unsafe fn block(&self, block: BlockId) -> &[u8] {
        let start = self.block_start(block);
        // SAFETY: in bounds (checked above); no concurrent writer (the caller's promise).
        unsafe {
            std::slice::from_raw_parts(self.ptr.as_ptr().add(start), self.layout.bytes_per_block())
        }
    }

    /// One block's bytes, to fill.
    ///
    /// # Safety
    /// Nobody else may read or write `block` while the returned slice lives: it belongs
    /// to a sequence that is waiting for exactly this data.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn block_mut(&self, block: BlockId) -> &mut [u8] {
        let start = self.block_start(block);
        // SAFETY: in bounds (checked above); exclusive (the caller's promise).
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ptr.as_ptr().add(start),
                self.layout.bytes_per_block(),
            )
        }
    }

    /// Element offset of `head`'s slot 0 in (`layer`, `block`, `plane`).
    fn head_offset(&self, layer: usize, block: BlockId, plane: Plane, head: usize) -> usize {
        let l = &self.layout;
        let per_head = l.block_size * l.head_dim;
        let plane_index = (block as usize * l.num_layers + layer) * 2 + plane as usize;
        plane_index * l.values_per_layer_block() + head * per_head
    }

    /// The `len` stored elements starting at element `offset`, as stored.
    ///
    /// # Safety
    /// Nobody writes those elements while the returned slice lives.
    unsafe fn slots(&self, offset: usize, len: usize) -> KvSlots<'_> {
        let end = (offset + len) * self.layout.dtype.size_bytes();
        assert!(end <= self.alloc.size(), "KV read out of bounds");
        // SAFETY: in bounds and aligned for the element type (the allocation is 64-byte
        // aligned and offsets are whole elements); no concurrent writer (the caller's
        // promise).
        unsafe {
            match self.layout.dtype {
                KvDtype::F16 => KvSlots::F16(std::slice::from_raw_parts(
                    self.ptr.as_ptr().cast::<f16>().add(offset),
                    len,
                )),
                KvDtype::F32 => KvSlots::F32(std::slice::from_raw_parts(
                    self.ptr.as_ptr().cast::<f32>().add(offset),
                    len,
                )),
            }
        }
    }

    /// Writes `src` at element `offset`.
    ///
    /// # Safety
    /// Nobody else reads or writes those elements meanwhile.
    unsafe fn write(&self, offset: usize, src: &[f32]) {
        let end = (offset + src.len()) * self.layout.dtype.size_bytes();
        assert!(end <= self.alloc.size(), "KV write out of bounds");
        // SAFETY: as in `read`, and exclusive.
        unsafe {
            match self.layout.dtype {
                KvDtype::F16 => {
                    let dst = self.ptr.as_ptr().cast::<f16>().add(offset);
                    std::slice::from_raw_parts_mut(dst, src.len()).convert_from_f32_slice(src)
                }
                KvDtype::F32 => {
                    let dst = self.ptr.as_ptr().cast::<f32>().add(offset);
                    std::slice::from_raw_parts_mut(dst, src.len()).copy_from_slice(src)
                }
            }
        }
    }
}

impl Drop for KvMemory {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.alloc) }
    }
}

/// Where a worker's KV blocks live, as the hand-off sees them: host memory (the CPU
/// engine) or a GPU's memory (copied through pinned host memory, or between GPUs).
#[derive(Clone)]
pub enum KvBlocks {
    Host(Arc<KvMemory>),
    #[cfg(feature = "cuda")]
    Device(Arc<crate::cuda::DeviceKv>),
}

impl KvBlocks {
    pub fn layout(&self) -> KvLayout {
        match self {
            KvBlocks::Host(memory) => memory.layout(),
            #[cfg(feature = "cuda")]
            KvBlocks::Device(kv) => kv.layout(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        match self {
            KvBlocks::Host(memory) => memory.num_blocks(),
            #[cfg(feature = "cuda")]
            KvBlocks::Device(kv) => kv.num_blocks(),
        }
    }
}

/// One block's slots of one head, borrowed as the store holds them.
#[derive(Clone, Copy, Debug)]
pub enum KvSlots<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl KvSlots<'_> {
    /// Stored elements (slots × head_dim).
    pub fn len(&self) -> usize {
        match self {
            KvSlots::F16(values) => values.len(),
            KvSlots::F32(values) => values.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// KV cache memory for a fixed number of blocks, as the engine loop sees it: it reads
/// and writes only blocks held by its own sequences (see the module doc).
pub struct KvStore {
    memory: Arc<KvMemory>,
}

impl KvStore {
    pub fn new(layout: KvLayout, num_blocks: usize) -> Self {
        Self {
            memory: Arc::new(KvMemory::new(layout, num_blocks)),
        }
    }

    /// A store using at most `bytes` of memory (at least one block).
    pub fn with_memory(layout: KvLayout, bytes: usize) -> Self {
        Self::new(layout, (bytes / layout.bytes_per_block()).max(1))
    }

    pub fn layout(&self) -> KvLayout {
        self.memory.layout
    }

    pub fn num_blocks(&self) -> usize {
        self.memory.num_blocks
    }

    /// The shared memory, for the KV hand-off.
    pub fn memory(&self) -> Arc<KvMemory> {
        self.memory.clone()
    }

    /// Copies the keys of the first `dst.len() / head_dim` slots of `head` in `block`
    /// (`[slot][head_dim]`) into `dst` as f32.
    #[inline]
    pub fn read_keys(&self, layer: usize, block: BlockId, head: usize, dst: &mut [f32]) {
        self.read(layer, block, Plane::Keys, head, dst);
    }

    /// Like [`Self::read_keys`], for values.
    #[inline]
    pub fn read_values(&self, layer: usize, block: BlockId, head: usize, dst: &mut [f32]) {
        self.read(layer, block, Plane::Values, head, dst);
    }

    /// The keys of the first `slots` slots of `head` in `block` (`[slot][head_dim]`) as
    /// stored, for kernels that read them in place instead of copying them out.
    #[inline]
    pub fn key_slots(
        &self,
        layer: usize,
        block: BlockId,
        head: usize,
        slots: usize,
    ) -> KvSlots<'_> {
        self.plane_slots(layer, block, Plane::Keys, head, slots)
    }

    /// Like [`Self::key_slots`], for values.
    #[inline]
    pub fn value_slots(
        &self,
        layer: usize,
        block: BlockId,
        head: usize,
        slots: usize,
    ) -> KvSlots<'_> {
        self.plane_slots(layer, block, Plane::Values, head, slots)
    }

    /// [`Self::key_slots`] or [`Self::value_slots`], as `plane` says.
    #[inline]
    pub fn plane_slots(
        &self,
        layer: usize,
        block: BlockId,
        plane: Plane,
        head: usize,
        slots: usize,
    ) -> KvSlots<'_> {
        let head_dim = self.layout().head_dim;
        self.elements(layer, block, plane, head, slots * head_dim)
    }

    /// The first `len` stored elements of `head` in (`layer`, `block`, `plane`).
    #[inline]
    fn elements(
        &self,
        layer: usize,
        block: BlockId,
        plane: Plane,
        head: usize,
        len: usize,
    ) -> KvSlots<'_> {
        let l = self.layout();
        assert!(len <= l.block_size * l.head_dim, "read past the block");
        self.memory.block_start(block);
        let offset = self.memory.head_offset(layer, block, plane, head);
        // SAFETY: the engine loop reads blocks of its own sequences, which no hand-off
        // writes (module doc), and it writes none while a forward pass reads them.
        unsafe { self.memory.slots(offset, len) }
    }

    #[inline]
    fn read(&self, layer: usize, block: BlockId, plane: Plane, head: usize, dst: &mut [f32]) {
        match self.elements(layer, block, plane, head, dst.len()) {
            KvSlots::F16(src) => src.convert_to_f32_slice(dst),
            KvSlots::F32(src) => dst.copy_from_slice(src),
        }
    }

    /// Stores one position's keys and values (`[kv_head][head_dim]` each).
    pub fn write(
        &mut self,
        layer: usize,
        block: BlockId,
        slot: usize,
        keys: &[f32],
        values: &[f32],
    ) {
        let d = self.layout().head_dim;
        assert!(slot < self.layout().block_size, "slot past the block");
        self.memory.block_start(block);
        for head in 0..self.layout().num_kv_heads {
            let src = head * d..(head + 1) * d;
            let at = |plane| self.memory.head_offset(layer, block, plane, head) + slot * d;
            // SAFETY: the engine loop writes only blocks its running sequences own,
            // which no hand-off reads or writes (module doc).
            unsafe {
                self.memory.write(at(Plane::Keys), &keys[src.clone()]);
                self.memory.write(at(Plane::Values), &values[src]);
            }
        }
    }
}

/// Hands out free blocks of a [`KvStore`].
pub struct BlockAllocator {
    free: Vec<BlockId>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        // Reversed so that blocks are handed out in ascending order.
        let free = (0..num_blocks as BlockId).rev().collect();
        Self { free }
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// `n` blocks, or `None` (allocating nothing) if fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free.len() {
            return None;
        }
        Some(self.free.split_off(self.free.len() - n))
    }

    pub fn release(&mut self, blocks: &[BlockId]) {
        self.free.extend_from_slice(blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            num_layers: 2,
            num_kv_heads: 3,
            head_dim: 4,
            block_size: 2,
            dtype: KvDtype::F16,
        }
    }

    #[test]
    fn written_positions_read_back_per_head() {
        for dtype in [KvDtype::F16, KvDtype::F32] {
            let mut store = KvStore::new(KvLayout { dtype, ..layout() }, 3);
            // Small integers are exact in f16 too.
            let keys: Vec<f32> = (0..12).map(|i| i as f32).collect();
            let values: Vec<f32> = (0..12).map(|i| -(i as f32)).collect();
            store.write(1, 2, 1, &keys, &values);
            let mut two_slots = [0f32; 8];
            store.read_keys(1, 2, 1, &mut two_slots);
            assert_eq!(&two_slots[4..], &keys[4..8]);
            store.read_values(1, 2, 2, &mut two_slots);
            assert_eq!(&two_slots[4..], &values[8..12]);
            store.read_keys(0, 2, 1, &mut two_slots);
            assert!(two_slots.iter().all(|&x| x == 0.0), "other layer untouched");
            store.read_keys(1, 1, 1, &mut two_slots);
            assert!(two_slots.iter().all(|&x| x == 0.0), "other block untouched");
        }
    }

    #[test]
    fn allocator_never_hands_out_a_block_twice() {
        let mut alloc = BlockAllocator::new(4);
        let a = alloc.allocate(3).unwrap();
        assert!(alloc.allocate(2).is_none());
        assert_eq!(alloc.num_free(), 1);
        let b = alloc.allocate(1).unwrap();
        let mut all: Vec<_> = a.iter().chain(&b).copied().collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3]);
        alloc.release(&a);
        assert_eq!(alloc.num_free(), 3);
    }

    #[test]
    fn bytes_per_block_counts_keys_and_values_of_every_layer() {
        assert_eq!(layout().bytes_per_block(), 2 * 2 * 3 * 2 * 4 * 2);
        let f32_layout = KvLayout {
            dtype: KvDtype::F32,
            ..layout()
        };
        assert_eq!(f32_layout.bytes_per_block(), 2 * layout().bytes_per_block());
        assert_eq!(layout().blocks_for(5), 3);
    }
}
