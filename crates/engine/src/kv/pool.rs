//! The block pool: which blocks of the KV store are free, which are held by sequences,
//! and which hold a cached prefix that a later request can reuse (automatic prefix
//! caching, with vLLM's semantics).
//!
//! Every block is in exactly one of three states:
//!
//! - **free**: unreferenced, with no cached contents; handed out first by
//!   [`BlockPool::allocate`].
//! - **referenced**: held by at least one sequence (a shared prefix block is held by
//!   several). It may also be the cached copy of a prefix block.
//! - **evictable**: unreferenced, but the cached copy of a prefix block; its contents are
//!   kept so that [`BlockPool::match_prefix`] can hand it out again, until
//!   [`BlockPool::allocate`] runs out of free blocks and evicts it, least recently
//!   released first.
//!
//! A full block is identified by a hash chained over its parent block's hash and its own
//! token ids, so a block matches only after the same whole prefix.
//!
//! The scheduler loop is the only owner (no locks).
//!
//! With [`BlockPool::enable_events`] the pool also records vLLM's KV events for
//! `--kv-events-config` (taken by [`BlockPool::take_events`] after each step):
//! `BlockStored` for each run of blocks one [`BlockPool::commit_full_blocks`] call
//! newly caches (a block already cached is not announced and ends the run),
//! `BlockRemoved` for each evicted block, and on [`BlockPool::reset_prefix_cache`]
//! `AllBlocksCleared` when nothing stays cached, else `BlockRemoved` of what was
//! forgotten.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use tandem_protocol::kv_events::{BlockRemoved, BlockStored, KvEvent};

use super::BlockId;

/// Identity of a full block's contents: a hash of its parent block's hash and its own
/// token ids.
pub type BlockHash = u64;

/// Prefix-cache lookups since the pool was created, in tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Tokens of the prompts looked up.
    pub queries: u64,
    /// Tokens of those prompts found in cached blocks.
    pub hits: u64,
}

/// What the pool knows about one block.
#[derive(Debug, Clone, Copy, Default)]
struct BlockMeta {
    /// Sequences holding this block.
    ref_count: u32,
    /// Set while this block is the cached copy of the full block with this hash (then
    /// `BlockPool::cached` maps the hash to this block).
    cached_hash: Option<BlockHash>,
    /// Set while this block is evictable: its key in `BlockPool::evictable`.
    evictable_since: Option<u64>,
}

/// Hands out the blocks of a KV store and caches full prefix blocks for reuse.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    prefix_caching: bool,
    blocks: Vec<BlockMeta>,
    /// Unreferenced blocks without cached contents, popped from the end.
    free: Vec<BlockId>,
    /// Cached full blocks, referenced or evictable.
    cached: HashMap<BlockHash, BlockId>,
    /// Evictable blocks by release time: the first entry is evicted first.
    evictable: BTreeMap<u64, BlockId>,
    /// Source of `evictable` keys; grows with every release.
    clock: u64,
    num_referenced: usize,
    stats: PrefixCacheStats,
    /// Set once events are enabled: what happened since the last `take_events`.
    events: Option<EventLog>,
}

/// The KV events recorded since they were last taken.
#[derive(Debug)]
struct EventLog {
    /// `medium` of every event: where the blocks live (`"CPU"`, `"GPU"`).
    medium: String,
    events: Vec<KvEvent>,
}

/// vLLM's KV-cache group of every event: tandem has one, full attention.
const GROUP_IDX: u32 = 0;
const SPEC_KIND: &str = "full_attention";

/// Newly cached consecutive blocks of one commit call, announced as one `BlockStored`.
struct StoreRun {
    parent: Option<BlockHash>,
    hashes: Vec<BlockHash>,
    tokens: Vec<u32>,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        assert!(
            num_blocks <= BlockId::MAX as usize,
            "{num_blocks} blocks do not fit a BlockId"
        );
        Self {
            block_size,
            prefix_caching,
            blocks: vec![BlockMeta::default(); num_blocks],
            // Reversed so that blocks are handed out in ascending order.
            free: (0..num_blocks as BlockId).rev().collect(),
            cached: HashMap::new(),
            evictable: BTreeMap::new(),
            clock: 0,
            num_referenced: 0,
            stats: PrefixCacheStats::default(),
            events: None,
        }
    }

    /// Records vLLM's KV events from now on, with `medium` (where the blocks live:
    /// `"CPU"`, `"GPU"`) on each.
    pub fn enable_events(&mut self, medium: &str) {
        self.events = Some(EventLog {
            medium: medium.to_owned(),
            events: Vec::new(),
        });
    }

    /// The events recorded since the last call, oldest first (none unless enabled).
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        self.events
            .as_mut()
            .map(|log| std::mem::take(&mut log.events))
            .unwrap_or_default()
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks that can be allocated now: free ones plus cached ones nobody references.
    pub fn num_available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Fraction of blocks referenced by at least one sequence (vLLM's
    /// `kv_cache_usage_perc`); cached blocks nobody references do not count.
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        self.num_referenced as f64 / self.blocks.len() as f64
    }

    /// The longest run of cached full blocks matching the start of `tokens`, at most
    /// `max_blocks` of them (the caller keeps at least the last prompt token to compute),
    /// each with a reference taken for the caller. Returns the blocks and their hashes
    /// (the last hash is the parent of the caller's next full block).
    ///
    /// Counts a query of `tokens.len()` tokens and a hit of the matched tokens in
    /// [`Self::prefix_cache_stats`]; with prefix caching off it matches and counts
    /// nothing.
    pub fn match_prefix(
        &mut self,
        tokens: &[u32],
        max_blocks: usize,
    ) -> (Vec<BlockId>, Vec<BlockHash>) {
        let mut blocks = Vec::new();
        let mut hashes = Vec::new();
        if !self.prefix_caching {
            return (blocks, hashes);
        }
        let mut parent = None;
        for block_tokens in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let hash = block_hash(parent, block_tokens);
            let Some(&block) = self.cached.get(&hash) else {
                break;
            };
            self.acquire(block);
            blocks.push(block);
            hashes.push(hash);
            parent = Some(hash);
        }
        self.stats.queries += tokens.len() as u64;
        self.stats.hits += (blocks.len() * self.block_size) as u64;
        (blocks, hashes)
    }

    /// `n` fresh blocks, each referenced once, evicting the least recently released
    /// cached blocks when no free ones are left; `None` (allocating nothing) if fewer
    /// than `n` are available.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.num_available() {
            return None;
        }
        let blocks: Vec<BlockId> = (0..n).map(|_| self.take_unreferenced()).collect();
        for &block in &blocks {
            self.blocks[block as usize].ref_count = 1;
        }
        self.num_referenced += n;
        Some(blocks)
    }

    /// Declares that `block` (held by the caller) now holds exactly `tokens`
    /// (`block_size` of them) following the block whose hash is `parent` (`None` for a
    /// sequence's first block), so that later requests with the same prefix can reuse
    /// it. Returns the block's hash, the `parent` of the sequence's next block.
    ///
    /// If an identical block is already cached, that one stays the cached copy and
    /// `block` is freed on release as usual. With prefix caching off only the hash is
    /// computed.
    pub fn commit_full_block(
        &mut self,
        block: BlockId,
        parent: Option<BlockHash>,
        tokens: &[u32],
    ) -> BlockHash {
        debug_assert_eq!(tokens.len(), self.block_size, "only full blocks are cached");
        self.commit_full_blocks(&[block], parent, tokens)
            .pop()
            .unwrap_or_else(|| block_hash(parent, tokens))
    }

    /// [`Self::commit_full_block`] for consecutive blocks of one sequence: `blocks[i]`
    /// holds `tokens[i * block_size..][..block_size]`, the first after `parent`.
    /// Returns their hashes. With events enabled, each run of blocks this call newly
    /// caches is one `BlockStored`.
    pub fn commit_full_blocks(
        &mut self,
        blocks: &[BlockId],
        parent: Option<BlockHash>,
        tokens: &[u32],
    ) -> Vec<BlockHash> {
        debug_assert_eq!(tokens.len(), blocks.len() * self.block_size);
        let mut hashes = Vec::with_capacity(blocks.len());
        let mut run = StoreRun::after(parent);
        let mut parent = parent;
        for (&block, chunk) in blocks.iter().zip(tokens.chunks_exact(self.block_size)) {
            let hash = block_hash(parent, chunk);
            if self.cache_block(block, hash) {
                run.push(hash, chunk, self.events.is_some());
            } else {
                self.record_stored(std::mem::replace(&mut run, StoreRun::after(Some(hash))));
            }
            hashes.push(hash);
            parent = Some(hash);
        }
        self.record_stored(run);
        hashes
    }

    /// Makes `block` the cached copy of `hash` unless one is cached (or prefix caching
    /// is off, or the caller broke the contract); true if it did.
    fn cache_block(&mut self, block: BlockId, hash: BlockHash) -> bool {
        if !self.prefix_caching {
            return false;
        }
        let Some(meta) = self.blocks.get_mut(block as usize) else {
            report_bug(format_args!(
                "commit of block {block}, which does not exist"
            ));
            return false;
        };
        if meta.ref_count == 0 {
            report_bug(format_args!("commit of block {block}, which nobody holds"));
            return false;
        }
        if self.cached.contains_key(&hash) {
            return false;
        }
        if let Some(old) = meta.cached_hash {
            report_bug(format_args!(
                "block {block} committed as {hash:#x}, already cached as {old:#x}"
            ));
            return false;
        }
        meta.cached_hash = Some(hash);
        self.cached.insert(hash, block);
        true
    }

    /// Announces a run of newly cached blocks (if any, and if events are on).
    fn record_stored(&mut self, run: StoreRun) {
        let block_size = self.block_size as u32;
        let Some(log) = self.events.as_mut() else {
            return;
        };
        if run.hashes.is_empty() {
            return;
        }
        let blocks = run.hashes.len();
        log.events.push(KvEvent::BlockStored(BlockStored {
            block_hashes: run.hashes,
            parent_block_hash: run.parent,
            token_ids: run.tokens,
            block_size,
            lora_id: None,
            medium: Some(log.medium.clone()),
            lora_name: None,
            extra_keys: Some(vec![None; blocks]),
            group_idx: Some(GROUP_IDX),
            kv_cache_spec_kind: Some(SPEC_KIND.to_owned()),
            kv_cache_spec_sliding_window: None,
        }));
    }

    /// Announces that cached blocks were forgotten (if events are on).
    fn record_removed(&mut self, block_hashes: Vec<BlockHash>) {
        if let Some(log) = self.events.as_mut() {
            log.events.push(KvEvent::BlockRemoved(BlockRemoved {
                block_hashes,
                medium: Some(log.medium.clone()),
                group_idx: Some(GROUP_IDX),
            }));
        }
    }

    /// Drops one reference on each of `blocks`. Unreferenced blocks without cached
    /// contents become free; unreferenced cached blocks become evictable, keeping their
    /// contents, and the earlier a block comes in `blocks`, the earlier it is evicted:
    /// pass a sequence's blocks last-first (as vLLM does) so that its tail is evicted
    /// before the head that other requests are more likely to share.
    ///
    /// Releasing a block nobody holds is a bug: it asserts in debug builds and is
    /// ignored (and logged) otherwise.
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &block in blocks {
            self.release_one(block);
        }
    }

    /// Tokens looked up and found since the pool was created.
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// Forgets every cached block that nobody references, making it free. Blocks that
    /// sequences hold stay cached. The counters are kept. Announced as
    /// `AllBlocksCleared` when nothing stays cached (as vLLM, whose reset succeeds only
    /// then), else as `BlockRemoved` of the forgotten blocks.
    pub fn reset_prefix_cache(&mut self) {
        let evictable = std::mem::take(&mut self.evictable);
        let mut forgotten = Vec::with_capacity(evictable.len());
        for block in evictable.into_values() {
            forgotten.extend(self.forget_evictable(block));
            self.free.push(block);
        }
        if self.cached.is_empty() {
            if let Some(log) = self.events.as_mut() {
                log.events.push(KvEvent::AllBlocksCleared);
            }
        } else if !forgotten.is_empty() {
            self.record_removed(forgotten);
        }
    }

    /// Takes a reference on a cached block, which stops it being evictable.
    fn acquire(&mut self, block: BlockId) {
        let meta = &mut self.blocks[block as usize];
        if let Some(since) = meta.evictable_since.take() {
            self.evictable.remove(&since);
        }
        if meta.ref_count == 0 {
            self.num_referenced += 1;
        }
        meta.ref_count += 1;
    }

    /// A free block, or else the least recently released evictable one, emptied. The
    /// caller has checked that one is available.
    fn take_unreferenced(&mut self) -> BlockId {
        if let Some(block) = self.free.pop() {
            return block;
        }
        let (_, block) = self
            .evictable
            .pop_first()
            .expect("caller checked num_available");
        if let Some(hash) = self.forget_evictable(block) {
            // One event per evicted block, as vLLM's `_maybe_evict_cached_block`.
            self.record_removed(vec![hash]);
        }
        block
    }

    /// Clears an evictable block's cached identity (returned); it is already out of
    /// `evictable`.
    fn forget_evictable(&mut self, block: BlockId) -> Option<BlockHash> {
        let meta = &mut self.blocks[block as usize];
        meta.evictable_since = None;
        let hash = meta.cached_hash.take()?;
        self.cached.remove(&hash);
        Some(hash)
    }

    fn release_one(&mut self, block: BlockId) {
        let Some(meta) = self.blocks.get_mut(block as usize) else {
            report_bug(format_args!(
                "release of block {block}, which does not exist"
            ));
            return;
        };
        if meta.ref_count == 0 {
            report_bug(format_args!("release of block {block}, which nobody holds"));
            return;
        }
        meta.ref_count -= 1;
        if meta.ref_count > 0 {
            return;
        }
        self.num_referenced -= 1;
        if meta.cached_hash.is_some() {
            let since = self.clock;
            self.clock += 1;
            meta.evictable_since = Some(since);
            self.evictable.insert(since, block);
        } else {
            self.free.push(block);
        }
    }
}

impl StoreRun {
    /// An empty run whose first block follows `parent`.
    fn after(parent: Option<BlockHash>) -> Self {
        Self {
            parent,
            hashes: Vec::new(),
            tokens: Vec::new(),
        }
    }

    /// Adds a block; its tokens only when they will be announced.
    fn push(&mut self, hash: BlockHash, tokens: &[u32], with_tokens: bool) {
        self.hashes.push(hash);
        if with_tokens {
            self.tokens.extend_from_slice(tokens);
        }
    }
}

/// The chained hash of a full block.
///
/// `DefaultHasher::new()` uses fixed keys, so hashes are stable within a process (and
/// across processes running the same build), but the algorithm is unspecified: sharing
/// block identity between workers (KV hand-off, prefix-aware routing) will need a
/// specified hash, as vLLM's sha256 option provides.
fn block_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut hasher = DefaultHasher::new();
    parent.hash(&mut hasher);
    tokens.hash(&mut hasher);
    hasher.finish()
}

/// A caller broke the pool's contract: fail loudly in debug builds, log and carry on
/// (leaving the pool consistent) in release builds.
fn report_bug(what: std::fmt::Arguments<'_>) {
    debug_assert!(false, "block pool misuse: {what}");
    tracing::error!("block pool misuse: {what}");
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 4;

    /// Checks that every block is in exactly one state and that the indexes agree.
    fn check_invariants(pool: &BlockPool) {
        let n = pool.num_blocks();
        let mut seen_free = vec![false; n];
        for &b in &pool.free {
            let meta = pool.blocks[b as usize];
            assert!(!seen_free[b as usize], "block {b} free twice");
            seen_free[b as usize] = true;
            assert_eq!(meta.ref_count, 0, "free block {b} is referenced");
            assert_eq!(meta.cached_hash, None, "free block {b} is cached");
            assert_eq!(meta.evictable_since, None, "free block {b} is evictable");
        }
        for (&since, &b) in &pool.evictable {
            let meta = pool.blocks[b as usize];
            assert!(!seen_free[b as usize], "block {b} both free and evictable");
            assert_eq!(meta.ref_count, 0, "evictable block {b} is referenced");
            assert_eq!(meta.evictable_since, Some(since));
            assert!(
                meta.cached_hash.is_some(),
                "evictable block {b} is not cached"
            );
            assert!(since < pool.clock);
        }
        let referenced = pool.blocks.iter().filter(|m| m.ref_count > 0).count();
        assert_eq!(referenced, pool.num_referenced);
        assert_eq!(pool.free.len() + pool.evictable.len() + referenced, n);
        for (&hash, &b) in &pool.cached {
            assert_eq!(pool.blocks[b as usize].cached_hash, Some(hash));
        }
        let with_hash = pool.blocks.iter().filter(|m| m.cached_hash.is_some());
        assert_eq!(with_hash.count(), pool.cached.len());
        for (b, meta) in pool.blocks.iter().enumerate() {
            if meta.ref_count == 0 && meta.cached_hash.is_none() {
                assert!(seen_free[b], "unreferenced uncached block {b} is not free");
            }
        }
    }

    fn ref_count(pool: &BlockPool, block: BlockId) -> u32 {
        pool.blocks[block as usize].ref_count
    }

    /// Commits `blocks` as holding consecutive full blocks of `tokens`; returns the hashes.
    fn commit_all(pool: &mut BlockPool, blocks: &[BlockId], tokens: &[u32]) -> Vec<BlockHash> {
        let mut parent = None;
        let mut hashes = Vec::new();
        for (&block, chunk) in blocks.iter().zip(tokens.chunks_exact(pool.block_size())) {
            let hash = pool.commit_full_block(block, parent, chunk);
            hashes.push(hash);
            parent = Some(hash);
        }
        hashes
    }

    fn reversed(blocks: &[BlockId]) -> Vec<BlockId> {
        blocks.iter().rev().copied().collect()
    }

    #[test]
    fn allocation_and_release_are_accounted() {
        let mut pool = BlockPool::new(8, BS, true);
        assert_eq!((pool.num_blocks(), pool.block_size()), (8, BS));
        assert_eq!(pool.num_available(), 8);
        assert_eq!(pool.usage(), 0.0);

        let a = pool.allocate(3).unwrap();
        assert_eq!(a, vec![0, 1, 2]);
        let b = pool.allocate(3).unwrap();
        assert_eq!(pool.num_available(), 2);
        assert_eq!(pool.usage(), 0.75);
        check_invariants(&pool);

        pool.release(&a);
        assert_eq!(pool.num_available(), 5);
        assert_eq!(pool.usage(), 0.375);
        pool.release(&b);
        assert_eq!(pool.num_available(), 8);
        assert_eq!(pool.usage(), 0.0);
        check_invariants(&pool);
    }

    #[test]
    fn failed_allocation_allocates_nothing() {
        let mut pool = BlockPool::new(4, BS, true);
        let held = pool.allocate(3).unwrap();
        assert_eq!(pool.allocate(2), None);
        assert_eq!(pool.num_available(), 1);
        check_invariants(&pool);
        // Evictable blocks count as available, but not beyond them.
        let tokens: Vec<u32> = (0..12).collect();
        commit_all(&mut pool, &held, &tokens);
        pool.release(&reversed(&held));
        assert_eq!(pool.allocate(5), None);
        assert_eq!(
            pool.evictable.len(),
            3,
            "nothing evicted by the failed call"
        );
        assert_eq!(pool.num_available(), 4);
        check_invariants(&pool);
    }

    #[test]
    fn released_prefix_is_reused_with_its_contents() {
        let mut pool = BlockPool::new(8, BS, true);
        let tokens: Vec<u32> = (100..110).collect(); // 2 full blocks and 2 tokens
        let first = pool.allocate(3).unwrap();
        let hashes = commit_all(&mut pool, &first[..2], &tokens);
        pool.release(&reversed(&first));
        assert_eq!(pool.usage(), 0.0);
        assert_eq!(pool.num_available(), 8, "cached blocks are still available");
        check_invariants(&pool);

        let (matched, matched_hashes) = pool.match_prefix(&tokens, 2);
        assert_eq!(matched, first[..2]);
        assert_eq!(matched_hashes, hashes);
        assert!(matched.iter().all(|&b| ref_count(&pool, b) == 1));
        assert_eq!(pool.num_available(), 6);
        assert_eq!(
            pool.prefix_cache_stats(),
            PrefixCacheStats {
                queries: 10,
                hits: 8
            }
        );

        // A second sharer takes a second reference.
        let (again, _) = pool.match_prefix(&tokens[..8], 2);
        assert_eq!(again, matched);
        assert!(matched.iter().all(|&b| ref_count(&pool, b) == 2));
        assert_eq!(pool.usage(), 0.25);
        pool.release(&again);
        assert!(matched.iter().all(|&b| ref_count(&pool, b) == 1));
        check_invariants(&pool);

        // A longer prompt matches as far as the cache goes.
        let longer: Vec<u32> = tokens.iter().copied().chain(0..20).collect();
        let (partial, _) = pool.match_prefix(&longer, usize::MAX);
        assert_eq!(partial, matched);
        pool.release(&partial);
        pool.release(&matched);
        check_invariants(&pool);
    }

    #[test]
    fn a_different_first_block_prevents_later_matches() {
        let mut pool = BlockPool::new(8, BS, true);
        let tokens = [1, 2, 3, 4, 5, 6, 7, 8];
        let held = pool.allocate(2).unwrap();
        commit_all(&mut pool, &held, &tokens);
        pool.release(&held);

        let other_head = [9, 9, 9, 9, 5, 6, 7, 8];
        let (matched, _) = pool.match_prefix(&other_head, 2);
        assert!(matched.is_empty());
        // Even asking for the second block by its tokens alone does not match it.
        let (matched, _) = pool.match_prefix(&tokens[4..], 1);
        assert!(matched.is_empty());
        assert_eq!(pool.prefix_cache_stats().hits, 0);
        check_invariants(&pool);
    }

    #[test]
    fn max_blocks_caps_the_match() {
        let mut pool = BlockPool::new(8, BS, true);
        let tokens: Vec<u32> = (0..12).collect();
        let held = pool.allocate(3).unwrap();
        commit_all(&mut pool, &held, &tokens);
        pool.release(&reversed(&held));

        // A prompt of exactly three blocks keeps its last block to compute.
        let (matched, hashes) = pool.match_prefix(&tokens, (tokens.len() - 1) / BS);
        assert_eq!(matched, held[..2]);
        assert_eq!(hashes.len(), 2);
        assert_eq!(ref_count(&pool, held[2]), 0);
        pool.release(&matched);
        let (none, _) = pool.match_prefix(&tokens, 0);
        assert!(none.is_empty());
        check_invariants(&pool);
    }

    #[test]
    fn eviction_takes_the_least_recently_released_block_first() {
        let mut pool = BlockPool::new(4, BS, true);
        let a: Vec<u32> = (0..8).collect();
        let b: Vec<u32> = (100..108).collect();
        let seq_a = pool.allocate(2).unwrap();
        let seq_b = pool.allocate(2).unwrap();
        commit_all(&mut pool, &seq_a, &a);
        commit_all(&mut pool, &seq_b, &b);
        // Released tail first: a's tail, a's head, then b's tail, b's head.
        pool.release(&reversed(&seq_a));
        pool.release(&reversed(&seq_b));
        assert_eq!(pool.num_available(), 4);

        // Using a's head again protects it while referenced and makes it recent.
        let (a_head, _) = pool.match_prefix(&a[..4], 1);
        assert_eq!(a_head, seq_a[..1]);

        // Evicts a's tail, then b's tail, in release order; never the held a head.
        assert_eq!(pool.allocate(1).unwrap(), vec![seq_a[1]]);
        assert_eq!(pool.allocate(1).unwrap(), vec![seq_b[1]]);
        check_invariants(&pool);
        let (b_match, _) = pool.match_prefix(&b, 2);
        assert_eq!(b_match, seq_b[..1], "b's head survived, its tail did not");
        let (a_match, _) = pool.match_prefix(&a, 2);
        assert_eq!(
            a_match,
            seq_a[..1],
            "a's tail was evicted, its hash forgotten"
        );
        assert_eq!(pool.allocate(1), None);

        // Once released again, a's head is the most recent and outlives b's head.
        pool.release(&b_match);
        pool.release(&a_match);
        pool.release(&a_head);
        assert_eq!(pool.allocate(1).unwrap(), vec![seq_b[0]]);
        assert_eq!(pool.match_prefix(&a, 1).0, seq_a[..1]);
        check_invariants(&pool);
    }

    #[test]
    fn free_blocks_are_used_before_cached_ones() {
        let mut pool = BlockPool::new(4, BS, true);
        let held = pool.allocate(1).unwrap();
        pool.commit_full_block(held[0], None, &[1, 2, 3, 4]);
        pool.release(&held);
        let fresh = pool.allocate(3).unwrap();
        assert!(!fresh.contains(&held[0]));
        assert_eq!(pool.match_prefix(&[1, 2, 3, 4, 5], 1).0, held);
        check_invariants(&pool);
    }

    #[test]
    fn prefix_caching_off_never_matches() {
        let mut pool = BlockPool::new(4, BS, false);
        let tokens = [1, 2, 3, 4, 5];
        let held = pool.allocate(2).unwrap();
        let hash = pool.commit_full_block(held[0], None, &tokens[..4]);
        assert_eq!(hash, block_hash(None, &tokens[..4]));
        pool.release(&held);
        assert_eq!(
            pool.free.len(),
            4,
            "released blocks are free, not evictable"
        );
        let (matched, hashes) = pool.match_prefix(&tokens, 1);
        assert!(matched.is_empty() && hashes.is_empty());
        assert_eq!(pool.prefix_cache_stats(), PrefixCacheStats::default());
        check_invariants(&pool);
    }

    #[test]
    fn identical_blocks_committed_twice_keep_the_first_copy() {
        let mut pool = BlockPool::new(4, BS, true);
        let tokens = [7, 7, 7, 7];
        let first = pool.allocate(1).unwrap();
        let second = pool.allocate(1).unwrap();
        let h1 = pool.commit_full_block(first[0], None, &tokens);
        let h2 = pool.commit_full_block(second[0], None, &tokens);
        assert_eq!(h1, h2);
        assert_eq!(pool.cached.get(&h1), Some(&first[0]));
        // Committing the cached copy again is harmless.
        assert_eq!(pool.commit_full_block(first[0], None, &tokens), h1);

        pool.release(&second);
        pool.release(&first);
        assert_eq!(pool.free.len(), 3, "the duplicate is simply freed");
        assert_eq!(pool.evictable.len(), 1);
        assert_eq!(pool.match_prefix(&tokens, 1).0, first);
        check_invariants(&pool);
    }

    #[test]
    fn reset_frees_unreferenced_cached_blocks_only() {
        let mut pool = BlockPool::new(4, BS, true);
        let tokens: Vec<u32> = (0..8).collect();
        let held = pool.allocate(2).unwrap();
        commit_all(&mut pool, &held, &tokens);
        pool.release(&held[1..]);
        pool.reset_prefix_cache();
        assert_eq!(pool.free.len(), 3);
        assert!(pool.evictable.is_empty());
        check_invariants(&pool);
        // The held head is still cached; the released tail is not.
        let (matched, _) = pool.match_prefix(&tokens, 2);
        assert_eq!(matched, held[..1]);
        pool.release(&matched);
        pool.release(&held[..1]);
        check_invariants(&pool);
    }

    #[test]
    #[cfg(not(debug_assertions))]
    fn releasing_too_often_is_ignored_in_release_builds() {
        let mut pool = BlockPool::new(2, BS, true);
        let held = pool.allocate(1).unwrap();
        pool.release(&held);
        pool.release(&held);
        pool.release(&[99]);
        assert_eq!(pool.free.len(), 2);
        check_invariants(&pool);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "nobody holds")]
    fn releasing_too_often_asserts_in_debug_builds() {
        let mut pool = BlockPool::new(2, BS, true);
        let held = pool.allocate(1).unwrap();
        pool.release(&held);
        pool.release(&held);
    }

    fn stored(event: &KvEvent) -> &BlockStored {
        match event {
            KvEvent::BlockStored(stored) => stored,
            other => panic!("not a BlockStored: {other:?}"),
        }
    }

    fn removed(event: &KvEvent) -> Vec<BlockHash> {
        match event {
            KvEvent::BlockRemoved(removed) => {
                assert_eq!(removed.medium.as_deref(), Some("CPU"));
                assert_eq!(removed.group_idx, Some(0));
                removed.block_hashes.clone()
            }
            other => panic!("not a BlockRemoved: {other:?}"),
        }
    }

    #[test]
    fn nothing_is_recorded_unless_enabled() {
        let mut pool = BlockPool::new(4, BS, true);
        let held = pool.allocate(2).unwrap();
        commit_all(&mut pool, &held, &(0..8).collect::<Vec<_>>());
        pool.release(&held);
        pool.reset_prefix_cache();
        assert!(pool.take_events().is_empty());
    }

    #[test]
    fn newly_cached_runs_are_stored_in_vllms_shape() {
        let mut pool = BlockPool::new(8, BS, true);
        pool.enable_events("CPU");
        let tokens: Vec<u32> = (100..112).collect();
        let held = pool.allocate(3).unwrap();
        let hashes = pool.commit_full_blocks(&held, None, &tokens);
        assert_eq!(
            hashes,
            commit_all(&mut BlockPool::new(8, BS, true), &held, &tokens)
        );
        let events = pool.take_events();
        assert_eq!(events.len(), 1, "one run, one event: {events:?}");
        let expected = BlockStored {
            block_hashes: hashes.clone(),
            parent_block_hash: None,
            token_ids: tokens.clone(),
            block_size: BS as u32,
            lora_id: None,
            medium: Some("CPU".into()),
            lora_name: None,
            extra_keys: Some(vec![None; 3]),
            group_idx: Some(0),
            kv_cache_spec_kind: Some("full_attention".into()),
            kv_cache_spec_sliding_window: None,
        };
        assert_eq!(stored(&events[0]), &expected);
        assert!(pool.take_events().is_empty(), "taken once");

        // A later block of the same sequence chains from the last one.
        let more = pool.allocate(1).unwrap();
        let next: Vec<u32> = (112..116).collect();
        let hash = pool.commit_full_blocks(&more, hashes.last().copied(), &next);
        let events = pool.take_events();
        assert_eq!(stored(&events[0]).parent_block_hash, Some(hashes[2]));
        assert_eq!(stored(&events[0]).block_hashes, hash);
        assert_eq!(stored(&events[0]).token_ids, next);
        check_invariants(&pool);
    }

    #[test]
    fn an_already_cached_block_is_not_announced_and_breaks_the_run() {
        let mut pool = BlockPool::new(8, BS, true);
        pool.enable_events("CPU");
        let tokens: Vec<u32> = (0..12).collect();
        // Another sequence cached the middle block's twin: same parent, same tokens.
        let first = pool.allocate(2).unwrap();
        let head = pool.commit_full_blocks(&first, None, &tokens[..8]);
        pool.take_events();
        let other = pool.allocate(3).unwrap();
        let hashes = pool.commit_full_blocks(&other, None, &tokens);
        assert_eq!(hashes[..2], head[..]);
        let events = pool.take_events();
        assert_eq!(events.len(), 1, "{events:?}");
        let tail = stored(&events[0]);
        assert_eq!(tail.block_hashes, vec![hashes[2]]);
        assert_eq!(tail.parent_block_hash, Some(hashes[1]));
        assert_eq!(tail.token_ids, tokens[8..]);

        // Cached, not cached, cached, not cached: two one-block runs.
        let mut pool = BlockPool::new(8, BS, true);
        pool.enable_events("CPU");
        let a = pool.allocate(1).unwrap();
        let h0 = pool.commit_full_blocks(&a, None, &tokens[..4])[0];
        let b = pool.allocate(1).unwrap();
        let h1 = block_hash(Some(h0), &tokens[4..8]);
        let h2 = block_hash(Some(h1), &tokens[8..12]);
        pool.commit_full_blocks(&b, Some(h1), &tokens[8..12]);
        pool.take_events();
        let seq = pool.allocate(4).unwrap();
        let all: Vec<u32> = (0..16).collect();
        let hashes = pool.commit_full_blocks(&seq, None, &all);
        assert_eq!(hashes[..3], [h0, h1, h2]);
        let events = pool.take_events();
        let runs: Vec<_> = events.iter().map(stored).collect();
        assert_eq!(runs.len(), 2, "{events:?}");
        assert_eq!(runs[0].block_hashes, vec![h1]);
        assert_eq!(runs[0].parent_block_hash, Some(h0));
        assert_eq!(runs[1].block_hashes, vec![hashes[3]]);
        assert_eq!(runs[1].parent_block_hash, Some(h2));
        assert_eq!(runs[1].token_ids, all[12..]);
        check_invariants(&pool);
    }

    #[test]
    fn evictions_are_removed_one_block_each() {
        let mut pool = BlockPool::new(2, BS, true);
        pool.enable_events("CPU");
        let held = pool.allocate(2).unwrap();
        let hashes = pool.commit_full_blocks(&held, None, &(0..8).collect::<Vec<_>>());
        pool.release(&reversed(&held));
        pool.take_events();
        pool.allocate(2).unwrap();
        let events = pool.take_events();
        let evicted: Vec<_> = events.iter().map(removed).collect();
        assert_eq!(
            evicted,
            vec![vec![hashes[1]], vec![hashes[0]]],
            "tail first"
        );
        check_invariants(&pool);
    }

    #[test]
    fn a_reset_clears_all_or_removes_what_it_forgot() {
        let mut pool = BlockPool::new(4, BS, true);
        pool.enable_events("CPU");
        let held = pool.allocate(2).unwrap();
        let hashes = pool.commit_full_blocks(&held, None, &(0..8).collect::<Vec<_>>());
        pool.release(&held[1..]);
        pool.take_events();
        // The held head stays cached: only the tail is forgotten.
        pool.reset_prefix_cache();
        let events = pool.take_events();
        assert_eq!(
            events.iter().map(removed).collect::<Vec<_>>(),
            vec![vec![hashes[1]]]
        );
        pool.release(&held[..1]);
        pool.reset_prefix_cache();
        assert_eq!(pool.take_events(), vec![KvEvent::AllBlocksCleared]);
        check_invariants(&pool);
    }

    /// A 64-bit linear congruential generator (Knuth's MMIX constants).
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) % n as u64) as usize
        }
    }

    /// A sequence the randomized test holds blocks for.
    struct Held {
        tokens: Vec<u32>,
        blocks: Vec<BlockId>,
    }

    /// A prompt from a few shared heads and a small alphabet, so prefixes repeat.
    fn random_prompt(rng: &mut Lcg) -> Vec<u32> {
        let head = rng.below(3) as u32;
        let len = 1 + rng.below(6 * BS);
        let mut tokens: Vec<u32> = (0..len).map(|_| rng.below(2) as u32).collect();
        tokens[..len.min(BS)].fill(head);
        tokens
    }

    /// Admits a sequence as the scheduler would: match, allocate the rest, "compute" the
    /// new blocks (recorded in `contents`), commit the full ones.
    fn admit(
        pool: &mut BlockPool,
        contents: &mut [Option<Vec<u32>>],
        tokens: Vec<u32>,
    ) -> Option<Held> {
        let max_cached = (tokens.len() - 1) / BS;
        let (mut blocks, hashes) = pool.match_prefix(&tokens, max_cached);
        for (i, &block) in blocks.iter().enumerate() {
            let expected = &tokens[i * BS..(i + 1) * BS];
            assert_eq!(contents[block as usize].as_deref(), Some(expected));
        }
        let needed = tokens.len().div_ceil(BS) - blocks.len();
        let Some(fresh) = pool.allocate(needed) else {
            pool.release(&reversed(&blocks));
            return None;
        };
        let mut parent = hashes.last().copied();
        for (i, &block) in fresh.iter().enumerate() {
            let start = (blocks.len() + i) * BS;
            let chunk = &tokens[start..(start + BS).min(tokens.len())];
            contents[block as usize] = Some(chunk.to_vec());
            if chunk.len() == BS {
                parent = Some(pool.commit_full_block(block, parent, chunk));
            }
        }
        blocks.extend(fresh);
        Some(Held { tokens, blocks })
    }

    #[test]
    fn random_operations_keep_the_pool_consistent() {
        let mut rng = Lcg(0x5eed);
        let mut pool = BlockPool::new(24, BS, true);
        let mut contents: Vec<Option<Vec<u32>>> = vec![None; pool.num_blocks()];
        let mut running: Vec<Held> = Vec::new();
        let (mut admitted, mut rejected, mut evicting_admits) = (0, 0, 0);
        for _ in 0..5000 {
            match rng.below(10) {
                0..=5 => {
                    let prompt = random_prompt(&mut rng);
                    let cached_before = pool.cached.len();
                    let admission = admit(&mut pool, &mut contents, prompt);
                    // Admitting only adds cache entries, unless it evicts.
                    if pool.cached.len() < cached_before {
                        evicting_admits += 1;
                    }
                    match admission {
                        Some(held) => {
                            admitted += 1;
                            running.push(held);
                        }
                        None => rejected += 1,
                    }
                }
                6..=8 if !running.is_empty() => {
                    let held = running.swap_remove(rng.below(running.len()));
                    assert!(held.tokens.len().div_ceil(BS) == held.blocks.len());
                    pool.release(&reversed(&held.blocks));
                }
                9 if rng.below(20) == 0 => pool.reset_prefix_cache(),
                _ => {}
            }
            check_invariants(&pool);
            for (b, meta) in pool.blocks.iter().enumerate() {
                let holders = running
                    .iter()
                    .flat_map(|h| &h.blocks)
                    .filter(|&&x| x as usize == b)
                    .count();
                assert_eq!(meta.ref_count as usize, holders, "block {b}");
            }
            let expected_usage = pool.num_referenced as f64 / pool.num_blocks() as f64;
            assert_eq!(pool.usage(), expected_usage);
        }
        let stats = pool.prefix_cache_stats();
        assert!(
            admitted > 500 && rejected > 50,
            "{admitted} in, {rejected} out"
        );
        assert!(evicting_admits > 50, "{evicting_admits} admissions evicted");
        assert!(stats.hits > 0 && stats.hits < stats.queries, "{stats:?}");
        for held in running.drain(..) {
            pool.release(&reversed(&held.blocks));
        }
        assert_eq!(pool.num_available(), pool.num_blocks());
        assert_eq!(pool.usage(), 0.0);
        check_invariants(&pool);
    }
}
