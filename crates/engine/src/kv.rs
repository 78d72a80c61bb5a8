//! The block-addressed KV store the forward pass reads and writes, and the free list
//! that hands out its blocks.
//!
//! A sequence's keys and values live in fixed-size blocks named by a block table
//! (position `p` is slot `p % block_size` of block `table[p / block_size]`), so
//! sequences grow without copying, share prefix blocks, and move between processes a
//! block at a time. Per layer, a block holds `[kv_head][slot][head_dim]` values, so one
//! head's keys in one block are contiguous for the attention kernel.
//!
//! Values are stored as f16, as llama.cpp and vLLM (for f16/bf16 models) do: half the
//! memory of f32, and the rounding llama.cpp's outputs were produced with.

use half::f16;

/// Index of a block in a [`KvStore`].
pub type BlockId = u32;

/// The geometry of a KV store; two stores can exchange blocks only if these match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

impl KvLayout {
    /// Values of K (or of V) that one block holds for one layer.
    pub fn floats_per_layer_block(&self) -> usize {
        self.num_kv_heads * self.block_size * self.head_dim
    }

    /// Bytes one block occupies across all layers, K and V.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.num_layers * self.floats_per_layer_block() * std::mem::size_of::<f16>()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
}

struct LayerKv {
    keys: Vec<f16>,
    values: Vec<f16>,
}

/// KV cache memory for a fixed number of blocks.
pub struct KvStore {
    layout: KvLayout,
    num_blocks: usize,
    layers: Vec<LayerKv>,
}

impl KvStore {
    pub fn new(layout: KvLayout, num_blocks: usize) -> Self {
        let len = num_blocks * layout.floats_per_layer_block();
        let layers = (0..layout.num_layers)
            .map(|_| LayerKv {
                keys: vec![f16::ZERO; len],
                values: vec![f16::ZERO; len],
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

    fn head_range(&self, block: BlockId, head: usize) -> std::ops::Range<usize> {
        let per_head = self.layout.block_size * self.layout.head_dim;
        let start = block as usize * self.layout.floats_per_layer_block() + head * per_head;
        start..start + per_head
    }

    /// Keys of `head` in `block` for `layer`: `[block_size][head_dim]`.
    #[inline]
    pub fn keys(&self, layer: usize, block: BlockId, head: usize) -> &[f16] {
        &self.layers[layer].keys[self.head_range(block, head)]
    }

    /// Values of `head` in `block` for `layer`: `[block_size][head_dim]`.
    #[inline]
    pub fn values(&self, layer: usize, block: BlockId, head: usize) -> &[f16] {
        &self.layers[layer].values[self.head_range(block, head)]
    }

    /// Stores one position's keys and values (`[kv_head][head_dim]` each), rounded to
    /// f16.
    pub fn write(
        &mut self,
        layer: usize,
        block: BlockId,
        slot: usize,
        keys: &[f32],
        values: &[f32],
    ) {
        use half::slice::HalfFloatSliceExt;
        let d = self.layout.head_dim;
        for head in 0..self.layout.num_kv_heads {
            let at = self.head_range(block, head).start + slot * d;
            let src = head * d..(head + 1) * d;
            let kv = &mut self.layers[layer];
            kv.keys[at..at + d].convert_from_f32_slice(&keys[src.clone()]);
            kv.values[at..at + d].convert_from_f32_slice(&values[src]);
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
        }
    }

    #[test]
    fn written_positions_read_back_per_head() {
        let mut store = KvStore::new(layout(), 3);
        let keys: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let values: Vec<f32> = (0..12).map(|i| -(i as f32)).collect();
        store.write(1, 2, 1, &keys, &values);
        // Small integers are exact in f16.
        let widen = |xs: &[f16]| xs.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        assert_eq!(widen(&store.keys(1, 2, 1)[4..8]), &keys[4..8]);
        assert_eq!(widen(&store.values(1, 2, 2)[4..8]), &values[8..12]);
        let all_zero = |xs: &[f16]| xs.iter().all(|x| x.to_f32() == 0.0);
        assert!(all_zero(store.keys(0, 2, 1)), "other layer untouched");
        assert!(all_zero(store.keys(1, 1, 1)), "other block untouched");
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
        assert_eq!(layout().blocks_for(5), 3);
    }
}
