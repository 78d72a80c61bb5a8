//! The block-addressed KV store the forward pass reads and writes, and the free list
//! that hands out its blocks.
//!
//! A sequence's keys and values live in fixed-size blocks named by a block table
//! (position `p` is slot `p % block_size` of block `table[p / block_size]`), so
//! sequences grow without copying, share prefix blocks, and move between processes a
//! block at a time. Per layer, a block holds `[kv_head][slot][head_dim]` values, so one
//! head's keys in one block are contiguous for the attention kernel.
//!
//! Values are stored as f16 by default, as llama.cpp and vLLM (for f16/bf16 models) do:
//! half the memory of f32. f32 storage is available for exactness checks.

pub mod pool;

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

/// One layer's keys or values for every block.
enum Plane {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl Plane {
    fn new(dtype: KvDtype, len: usize) -> Self {
        match dtype {
            KvDtype::F16 => Plane::F16(vec![f16::ZERO; len]),
            KvDtype::F32 => Plane::F32(vec![0.0; len]),
        }
    }

    fn read(&self, range: std::ops::Range<usize>, dst: &mut [f32]) {
        match self {
            Plane::F16(v) => v[range].convert_to_f32_slice(dst),
            Plane::F32(v) => dst.copy_from_slice(&v[range]),
        }
    }

    fn write(&mut self, at: usize, src: &[f32]) {
        let range = at..at + src.len();
        match self {
            Plane::F16(v) => v[range].convert_from_f32_slice(src),
            Plane::F32(v) => v[range].copy_from_slice(src),
        }
    }
}

struct LayerKv {
    keys: Plane,
    values: Plane,
}

/// KV cache memory for a fixed number of blocks.
pub struct KvStore {
    layout: KvLayout,
    num_blocks: usize,
    layers: Vec<LayerKv>,
}

impl KvStore {
    pub fn new(layout: KvLayout, num_blocks: usize) -> Self {
        let len = num_blocks * layout.values_per_layer_block();
        let layers = (0..layout.num_layers)
            .map(|_| LayerKv {
                keys: Plane::new(layout.dtype, len),
                values: Plane::new(layout.dtype, len),
            })
            .collect();
        Self {
            layout,
            num_blocks,
            layers,
        }
    }

    /// A store using at most `bytes` of memory (at least one block).
    pub fn with_memory(layout: KvLayout, bytes: usize) -> Self {
        Self::new(layout, (bytes / layout.bytes_per_block()).max(1))
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Where `head`'s first `slots` positions of `block` live in a layer's plane.
    fn head_range(&self, block: BlockId, head: usize, slots: usize) -> std::ops::Range<usize> {
        let per_head = self.layout.block_size * self.layout.head_dim;
        let start = block as usize * self.layout.values_per_layer_block() + head * per_head;
        start..start + slots * self.layout.head_dim
    }

    /// Copies the keys of the first `dst.len() / head_dim` slots of `head` in `block`
    /// (`[slot][head_dim]`) into `dst` as f32.
    #[inline]
    pub fn read_keys(&self, layer: usize, block: BlockId, head: usize, dst: &mut [f32]) {
        let range = self.head_range(block, head, dst.len() / self.layout.head_dim);
        self.layers[layer].keys.read(range, dst);
    }

    /// Like [`Self::read_keys`], for values.
    #[inline]
    pub fn read_values(&self, layer: usize, block: BlockId, head: usize, dst: &mut [f32]) {
        let range = self.head_range(block, head, dst.len() / self.layout.head_dim);
        self.layers[layer].values.read(range, dst);
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
        let d = self.layout.head_dim;
        for head in 0..self.layout.num_kv_heads {
            let at = self.head_range(block, head, 0).start + slot * d;
            let src = head * d..(head + 1) * d;
            let kv = &mut self.layers[layer];
            kv.keys.write(at, &keys[src.clone()]);
            kv.values.write(at, &values[src]);
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
