//! `kv_index`: which worker holds which prompt prefix, learnt from the workers' own
//! KV-cache events (vLLM's format, [`tandem_protocol::kv_events`]). Pure: no sockets,
//! no runtime, no clock; the caller feeds it decoded batches and asks it questions.
//! Modelled on Dynamo's `kv-router` indexer (routing core without runtime types).
//!
//! It owns:
//!
//! - **router-side block keys** ([`BlockKey`], [`prompt_keys`]): vLLM's block hashes
//!   are seeded per process, so two workers hash the same tokens differently. The index
//!   keys a block by its own chained hash of token ids instead:
//!   `key(i) = hash(key(i - 1), tokens of block i)`, from a fixed root. A key therefore
//!   stands for the whole prefix up to and including its block;
//! - **per-worker state**: a map engine hash → router key (to place a `BlockStored`
//!   after its parent and to resolve `BlockRemoved`), the last sequence number applied
//!   and whether the state may be stale after a gap;
//! - **the lookup map** router key → workers holding it, which [`KvIndex::overlap`]
//!   walks once per prompt;
//! - **a bound on memory**: at most `max_blocks` (worker, engine hash) entries in all;
//! - **counters** ([`KvIndexCounters`]) of what was applied, dropped and why.
//!
//! # Keys and collisions
//!
//! A key is FNV-1a 64 over the parent key and the block's token ids (little-endian
//! `u32`s), finished with a 64-bit mixer (splitmix64's). It is not cryptographic: a
//! peer that chooses prompts could build collisions, which only costs a wrong routing
//! hint. By chance, with `n` distinct blocks indexed, the odds that any two collide are
//! about `n² / 2^65`: 1 in 370 000 for a million blocks, 1 in 3 700 for ten million.
//! A collision makes `overlap` count a block a worker does not hold: a hint, never a
//! correctness issue. Keys ignore `lora_name` and `extra_keys` (multimodal ids, cache
//! salt): blocks with the same tokens under different adapters share a key.
//!
//! # Sequence numbers
//!
//! Each worker's publisher numbers its messages from 0. [`KvIndex::apply`] takes the
//! message's `seq`: the first message after [`KvIndex::reset`] (or for a new worker)
//! is accepted whatever its number, a number at or below the last one applied is a
//! [`ApplyOutcome::Duplicate`] and ignored, and a number past the next one expected is
//! a [`ApplyOutcome::Gap`]. A gapped batch **is applied** (what it stores is real) and
//! the worker is marked stale ([`KvIndex::is_stale`]), as Dynamo does: messages were
//! lost, so blocks may linger that were evicted, and stored blocks whose parent was
//! lost are dropped as unknown. The caller replays from `expected` (vLLM's replay
//! socket) or resyncs with [`KvIndex::reset`]; only `reset` clears the mark.
//!
//! # Memory
//!
//! The index holds at most `max_blocks` (worker, engine hash) entries. A `BlockStored`
//! that would go past the cap stores the blocks that fit (a prefix of its run, so no
//! hole) and refuses the rest, counted in [`KvIndexCounters::blocks_refused_over_cap`];
//! later blocks of that chain then have no parent and are dropped as unknown. Room comes
//! back as workers evict (`BlockRemoved`), clear, reset or leave. The index never
//! evicts on its own: it mirrors the engines and does not guess.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use tandem_protocol::kv_events::{BlockRemoved, BlockStored, KvEvent, KvEventBatch};

#[cfg(test)]
mod tests;

/// The router's key for a block: a chained hash of the tokens of the block and of
/// every block before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey(pub u64);

/// A worker, as the caller numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u32);

/// The parent of a prompt's first block.
const ROOT: BlockKey = BlockKey(0);

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The key of the block of `tokens` that follows the block keyed `parent`.
pub fn block_key(parent: BlockKey, tokens: &[u32]) -> BlockKey {
    let mut hash = FNV_OFFSET;
    let bytes = parent
        .0
        .to_le_bytes()
        .into_iter()
        .chain(tokens.iter().flat_map(|token| token.to_le_bytes()));
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    BlockKey(mix(hash))
}

/// splitmix64's finalizer: spreads FNV's weak high bits.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The keys of a prompt's full blocks of `block_size` tokens (a partial last block has
/// none: engines cache full blocks only). Empty when `block_size` is 0.
pub fn prompt_keys(tokens: &[u32], block_size: usize) -> Vec<BlockKey> {
    if block_size == 0 {
        return Vec::new();
    }
    chain_keys(ROOT, tokens.chunks_exact(block_size))
}

fn chain_keys<'a>(parent: BlockKey, blocks: impl Iterator<Item = &'a [u32]>) -> Vec<BlockKey> {
    let mut parent = parent;
    blocks
        .map(|block| {
            parent = block_key(parent, block);
            parent
        })
        .collect()
}

/// What [`KvIndex::apply`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The next batch in sequence (or the first one seen): applied.
    Applied,
    /// `seq` at or below the last one applied: ignored.
    Duplicate,
    /// Messages `expected..got` were lost. The batch was applied and the worker marked
    /// stale; replay from `expected` or [`KvIndex::reset`].
    Gap { expected: u64, got: u64 },
}

/// What the index did, for the caller's metrics. Every field only grows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvIndexCounters {
    pub batches_applied: u64,
    pub batches_duplicate: u64,
    /// Batches applied after a gap in sequence numbers.
    pub gaps: u64,
    /// `BlockStored` dropped: its parent is not in the worker's index.
    pub stored_unknown_parent: u64,
    /// `BlockStored` refused: `token_ids` is not `block_hashes.len() × block_size`.
    pub stored_token_mismatch: u64,
    /// `BlockStored` refused: `block_size` is 0.
    pub stored_zero_block_size: u64,
    /// Blocks not stored because the index was full.
    pub blocks_refused_over_cap: u64,
    /// `BlockRemoved` hashes the worker's index did not hold.
    pub removed_unknown: u64,
}

/// One worker's view.
#[derive(Debug, Default)]
struct WorkerState {
    last_seq: Option<u64>,
    stale: bool,
    /// Engine hash → router key.
    by_engine: HashMap<u64, BlockKey>,
    /// Router key → how many engine hashes map to it (KV-cache groups, adapters).
    refs: HashMap<BlockKey, u32>,
}

/// The KV index: see the module doc.
#[derive(Debug)]
pub struct KvIndex {
    max_blocks: usize,
    /// Router key → the workers holding it.
    blocks: HashMap<BlockKey, Vec<WorkerId>>,
    workers: HashMap<WorkerId, WorkerState>,
    /// (worker, engine hash) entries in all, at most `max_blocks`.
    entries: usize,
    counters: KvIndexCounters,
}

impl KvIndex {
    /// An empty index holding at most `max_blocks` (worker, engine hash) entries.
    pub fn new(max_blocks: usize) -> Self {
        KvIndex {
            max_blocks,
            blocks: HashMap::new(),
            workers: HashMap::new(),
            entries: 0,
            counters: KvIndexCounters::default(),
        }
    }

    pub fn counters(&self) -> &KvIndexCounters {
        &self.counters
    }

    /// (worker, engine hash) entries held, across workers.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Distinct router keys held by any worker.
    pub fn distinct_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Engine blocks `worker` holds in the index.
    pub fn worker_blocks(&self, worker: WorkerId) -> usize {
        self.workers.get(&worker).map_or(0, |w| w.by_engine.len())
    }

    /// Whether `worker` missed messages since its last reset.
    pub fn is_stale(&self, worker: WorkerId) -> bool {
        self.workers.get(&worker).is_some_and(|w| w.stale)
    }

    /// The last sequence number applied for `worker`, if any since its last reset.
    pub fn last_seq(&self, worker: WorkerId) -> Option<u64> {
        self.workers.get(&worker).and_then(|w| w.last_seq)
    }

    /// Applies message `seq` of `worker`'s stream; see the module doc for sequencing.
    pub fn apply(&mut self, worker: WorkerId, seq: u64, batch: &KvEventBatch) -> ApplyOutcome {
        let outcome = self.sequence(worker, seq);
        match outcome {
            ApplyOutcome::Duplicate => {
                self.counters.batches_duplicate += 1;
                return outcome;
            }
            ApplyOutcome::Gap { .. } => self.counters.gaps += 1,
            ApplyOutcome::Applied => {}
        }
        self.counters.batches_applied += 1;
        for event in &batch.events {
            self.apply_event(worker, event);
        }
        outcome
    }

    /// Records `seq` as `worker`'s last and says how it follows the one before.
    fn sequence(&mut self, worker: WorkerId, seq: u64) -> ApplyOutcome {
        let state = self.workers.entry(worker).or_default();
        let outcome = match state.last_seq {
            None => ApplyOutcome::Applied,
            Some(last) if seq <= last => return ApplyOutcome::Duplicate,
            Some(last) if seq == last + 1 => ApplyOutcome::Applied,
            Some(last) => ApplyOutcome::Gap {
                expected: last + 1,
                got: seq,
            },
        };
        if matches!(outcome, ApplyOutcome::Gap { .. }) {
            state.stale = true;
        }
        state.last_seq = Some(seq);
        outcome
    }

    fn apply_event(&mut self, worker: WorkerId, event: &KvEvent) {
        match event {
            KvEvent::BlockStored(stored) => self.store(worker, stored),
            KvEvent::BlockRemoved(removed) => self.remove(worker, removed),
            KvEvent::AllBlocksCleared => self.clear(worker),
        }
    }

    fn store(&mut self, worker: WorkerId, stored: &BlockStored) {
        let Some(blocks) = self.split_blocks(stored) else {
            return;
        };
        let Some(parent) = self.parent_key(worker, stored.parent_block_hash) else {
            self.counters.stored_unknown_parent += 1;
            return;
        };
        let keys = chain_keys(parent, blocks);
        for (index, (&engine, key)) in stored.block_hashes.iter().zip(keys).enumerate() {
            if !self.insert(worker, engine, key) {
                let refused = stored.block_hashes.len() - index;
                self.counters.blocks_refused_over_cap += refused as u64;
                return;
            }
        }
    }

    /// `token_ids` cut into `block_hashes.len()` blocks of `block_size`, or `None`
    /// (counted) when the sizes disagree.
    fn split_blocks<'a>(
        &mut self,
        stored: &'a BlockStored,
    ) -> Option<std::slice::ChunksExact<'a, u32>> {
        let Ok(block_size) = usize::try_from(stored.block_size) else {
            self.counters.stored_token_mismatch += 1;
            return None;
        };
        if block_size == 0 {
            self.counters.stored_zero_block_size += 1;
            return None;
        }
        let expected = stored.block_hashes.len().checked_mul(block_size);
        if expected != Some(stored.token_ids.len()) {
            self.counters.stored_token_mismatch += 1;
            return None;
        }
        Some(stored.token_ids.chunks_exact(block_size))
    }

    /// The router key the run continues from: the root, or the parent's key in
    /// `worker`'s index (`None` when unknown).
    fn parent_key(&self, worker: WorkerId, parent: Option<u64>) -> Option<BlockKey> {
        match parent {
            None => Some(ROOT),
            Some(hash) => self.workers.get(&worker)?.by_engine.get(&hash).copied(),
        }
    }

    /// Records `engine` → `key` for `worker`; false when the index is full.
    fn insert(&mut self, worker: WorkerId, engine: u64, key: BlockKey) -> bool {
        let state = self.workers.entry(worker).or_default();
        match state.by_engine.get(&engine).copied() {
            Some(old) if old == key => return true,
            Some(old) => {
                // The engine reused a hash for other tokens (or a collision):
                // the newer mapping wins.
                state.by_engine.remove(&engine);
                self.entries -= 1;
                self.release(worker, old);
            }
            None => {}
        }
        if self.entries >= self.max_blocks {
            return false;
        }
        let state = self.workers.entry(worker).or_default();
        state.by_engine.insert(engine, key);
        self.entries += 1;
        let refs = state.refs.entry(key).or_insert(0);
        *refs += 1;
        if *refs == 1 {
            self.blocks.entry(key).or_default().push(worker);
        }
        true
    }

    /// Drops one reference of `worker` to `key`, and the worker from the key's holders
    /// when it was the last.
    fn release(&mut self, worker: WorkerId, key: BlockKey) {
        let Some(state) = self.workers.get_mut(&worker) else {
            return;
        };
        let Entry::Occupied(mut refs) = state.refs.entry(key) else {
            return;
        };
        *refs.get_mut() -= 1;
        if *refs.get() > 0 {
            return;
        }
        refs.remove();
        self.unlist(worker, key);
    }

    /// Removes `worker` from `key`'s holders.
    fn unlist(&mut self, worker: WorkerId, key: BlockKey) {
        if let Entry::Occupied(mut holders) = self.blocks.entry(key) {
            holders.get_mut().retain(|&w| w != worker);
            if holders.get().is_empty() {
                holders.remove();
            }
        }
    }

    fn remove(&mut self, worker: WorkerId, removed: &BlockRemoved) {
        for hash in &removed.block_hashes {
            let key = self
                .workers
                .get_mut(&worker)
                .and_then(|state| state.by_engine.remove(hash));
            match key {
                Some(key) => {
                    self.entries -= 1;
                    self.release(worker, key);
                }
                None => self.counters.removed_unknown += 1,
            }
        }
    }

    /// Forgets every block of `worker` (`AllBlocksCleared`), keeping its sequence.
    fn clear(&mut self, worker: WorkerId) {
        let Some(state) = self.workers.get_mut(&worker) else {
            return;
        };
        let keys: Vec<BlockKey> = state.refs.drain().map(|(key, _)| key).collect();
        self.entries -= state.by_engine.len();
        state.by_engine.clear();
        for key in keys {
            self.unlist(worker, key);
        }
    }

    /// Starts `worker` afresh: no blocks, no sequence, not stale. For a restart, a new
    /// engine id, a reconnect or a resync.
    pub fn reset(&mut self, worker: WorkerId) {
        self.clear(worker);
        if let Some(state) = self.workers.get_mut(&worker) {
            state.last_seq = None;
            state.stale = false;
        }
    }

    /// Forgets `worker` entirely.
    pub fn remove_worker(&mut self, worker: WorkerId) {
        self.clear(worker);
        self.workers.remove(&worker);
    }

    /// For each worker holding the prompt's first block, how many of its leading blocks
    /// (`prompt_keys`) it holds, stopping at its first missing one. Workers holding none
    /// are absent. Walks the keys once, following only workers still matching.
    pub fn overlap(&self, prompt_keys: &[BlockKey]) -> HashMap<WorkerId, usize> {
        let mut counts = HashMap::new();
        let Some((first, rest)) = prompt_keys.split_first() else {
            return counts;
        };
        let mut active: Vec<WorkerId> = self.blocks.get(first).cloned().unwrap_or_default();
        let mut depth = 1;
        for key in rest {
            if active.is_empty() {
                break;
            }
            let holders = self.blocks.get(key).map_or(&[][..], Vec::as_slice);
            active.retain(|worker| {
                let holds = holders.contains(worker);
                if !holds {
                    counts.insert(*worker, depth);
                }
                holds
            });
            depth += 1;
        }
        counts.extend(active.into_iter().map(|worker| (worker, depth)));
        counts
    }
}
