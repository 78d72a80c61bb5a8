//! Causal attention over the paged KV store for a ragged batch.
//!
//! One algorithm serves decode and prefill alike, so that a token's result does not
//! depend on how the scheduler batched or chunked it (a greedy request gives the same
//! tokens alone or among fifteen others): for each query, scores are dot products
//! with the visible keys in position order, a softmax, and a weighted sum of values in
//! the same order.
//!
//! Work is split into tasks of (sequence, KV head, chunk of up to 64 queries), or for
//! decode-sized sequences with a short context in a small batch on several threads
//! (sequence, query head). A task of several queries or query heads copies its KV
//! head's keys and values (f16 or f32 in the store) into contiguous f32 buffers, up to
//! the last position its chunk can see, and serves them all from that copy, in tiles of
//! a few (token, query head) rows that share each key and value load. A task of
//! one query (decode) reads them in place, block by block, where the kernels can
//! (`attn::reads_in_place`), for one query head or for all of its KV head's group at
//! once, each key and value converted once for the group: a copy would be written and
//! read once, and that cost more than the arithmetic. Both give the same bits (see
//! `kernels::attn`).

use std::cell::RefCell;

use crate::kernels::ThreadPool;
use crate::kernels::attn::{
    MAX_GROUP, group_scores_in_place, group_weighted_sum_add_in_place, prefetch, reads_in_place,
    scores as score_keys, scores_in_place, weighted_sum, weighted_sum_add_in_place,
};
use crate::kernels::ops::softmax;
use crate::kv::{BlockId, KvSlots, KvStore, Plane};

/// Blocks of keys or values asked for ahead of the one being computed.
const PREFETCH_AHEAD: usize = 4;

/// Queries handled by one task.
const QUERY_CHUNK: usize = 64;
/// Query rows (tokens × query heads) a prompt tile scores and sums together, each key
/// and value loaded once for all of them. Four keep the group kernels on their
/// two-keys-at-a-time loop, whose loads per multiply-add are the fewest.
const TILE_ROWS: usize = 4;
/// Sequences with at most this many new tokens get one task per query head (more,
/// smaller tasks keep both cores busy in decode); longer ones one per KV head (one
/// pass over its keys and values serves the whole group). The arithmetic per query is
/// the same either way.
const PER_HEAD_MAX_TOKENS: usize = 4;
/// ...and at most this many keys visible: past it, reading the keys and values once per
/// query head instead of once per group costs more than the spread gains.
const PER_HEAD_MAX_KEYS: usize = 256;
/// ...but only while per-KV-head tasks would be too few to share among the threads:
/// with enough sequences in the batch, one pass per KV head (instead of one per query
/// head) saves converting the same keys and values again for each head.
const KV_HEAD_TASKS_PER_THREAD: usize = 4;

/// One sequence's share of a batch, as attention sees it.
pub struct AttnSeq<'a> {
    /// First row of this sequence in the batch's activation buffers.
    pub row: usize,
    pub n_tokens: usize,
    /// Position of the first new token (= tokens already in the KV store).
    pub start_pos: usize,
    pub block_table: &'a [BlockId],
}

/// Shapes shared by every task of one layer's attention.
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Row stride of the query buffer (queries are the first `num_heads * head_dim`
    /// values of each row).
    pub q_stride: usize,
}

#[derive(Clone, Copy)]
struct Task {
    seq: usize,
    kv_head: usize,
    /// Query heads served (all of `kv_head`'s group, or one of them).
    heads: (usize, usize),
    /// First query (relative to the sequence) and query count.
    first: usize,
    count: usize,
}

/// Raw output pointer shared by tasks that write disjoint regions.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of (row, head) cells; see `attend`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Writes `softmax(q kᵀ / √d) v` for every new token and query head into `out`
/// (`[rows][num_heads * head_dim]`), reading keys and values of `layer` from `kv`.
pub fn attend(
    pool: &ThreadPool,
    shape: &AttnShape,
    seqs: &[AttnSeq],
    layer: usize,
    queries: &[f32],
    kv: &KvStore,
    out: &mut [f32],
) {
    let tasks = plan(shape, seqs, pool.n_threads());
    let out_stride = shape.num_heads * shape.head_dim;
    let rows = seqs.iter().map(|s| s.row + s.n_tokens).max().unwrap_or(0);
    assert!(out.len() >= rows * out_stride, "attention output too small");
    let out_ptr = OutPtr(out.as_mut_ptr());
    pool.run(tasks.len(), |i| {
        let task = tasks[i];
        let ctx = TaskCtx {
            shape,
            seq: &seqs[task.seq],
            layer,
            queries,
            kv,
            out: out_ptr,
            out_stride,
        };
        SCRATCH.with(|scratch| ctx.run(task, &mut scratch.borrow_mut()));
    });
}

fn plan(shape: &AttnShape, seqs: &[AttnSeq], threads: usize) -> Vec<Task> {
    let group = shape.num_heads / shape.num_kv_heads;
    let kv_head_tasks_suffice =
        seqs.len() * shape.num_kv_heads >= KV_HEAD_TASKS_PER_THREAD * threads;
    let mut tasks = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        // One thread gains nothing from smaller tasks, and pays the extra passes.
        let per_head = threads > 1
            && seq.n_tokens <= PER_HEAD_MAX_TOKENS
            && seq.start_pos + seq.n_tokens <= PER_HEAD_MAX_KEYS
            && !kv_head_tasks_suffice;
        // Later chunks see more keys; queue them first so the pool ends balanced.
        let chunks = seq.n_tokens.div_ceil(QUERY_CHUNK);
        for c in (0..chunks).rev() {
            let first = c * QUERY_CHUNK;
            let count = QUERY_CHUNK.min(seq.n_tokens - first);
            for kv_head in 0..shape.num_kv_heads {
                let group_heads = kv_head * group..(kv_head + 1) * group;
                let head_ranges: Vec<(usize, usize)> = if per_head {
                    group_heads.map(|h| (h, h + 1)).collect()
                } else {
                    vec![(group_heads.start, group_heads.end)]
                };
                for heads in head_ranges {
                    tasks.push(Task {
                        seq: s,
                        kv_head,
                        heads,
                        first,
                        count,
                    });
                }
            }
        }
    }
    tasks
}

/// Query rows a prompt tile serves: each of `tokens` (relative to the sequence) for
/// each of `heads`.
struct Tile {
    tokens: std::ops::Range<usize>,
    heads: std::ops::Range<usize>,
}

struct TaskCtx<'a> {
    shape: &'a AttnShape,
    seq: &'a AttnSeq<'a>,
    layer: usize,
    queries: &'a [f32],
    kv: &'a KvStore,
    out: OutPtr,
    out_stride: usize,
}

impl TaskCtx<'_> {
    fn run(&self, task: Task, scratch: &mut Vec<f32>) {
        let heads = task.heads.1 - task.heads.0;
        if task.count == 1 && reads_in_place(self.shape.head_dim) {
            if heads == 1 {
                self.run_in_place(task, scratch);
                return;
            }
            if heads <= MAX_GROUP {
                self.run_group_in_place(task, scratch);
                return;
            }
        }
        if reads_in_place(self.shape.head_dim) {
            self.run_tiles(task, scratch);
            return;
        }
        let d = self.shape.head_dim;
        // Keys visible to the chunk's last query.
        let n_keys = self.seq.start_pos + task.first + task.count;
        let need = 2 * n_keys * d + n_keys;
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let (keys, rest) = scratch.split_at_mut(n_keys * d);
        let (values, rest) = rest.split_at_mut(n_keys * d);
        let scores = &mut rest[..n_keys];
        self.gather(task.kv_head, keys, values);
        let scale = 1.0 / (d as f32).sqrt();
        for token in task.first..task.first + task.count {
            let visible = self.seq.start_pos + token + 1;
            for head in task.heads.0..task.heads.1 {
                let q = self.query(token, head);
                let scores = &mut scores[..visible];
                score_keys(q, keys, scale, scores);
                softmax(scores);
                // SAFETY: this task is the only writer of its KV head's query heads for
                // its chunk's tokens, and the cell is inside `out` (checked in `attend`).
                let out = unsafe { std::slice::from_raw_parts_mut(self.out_head(token, head), d) };
                weighted_sum(scores, values, out);
            }
        }
    }

    /// A chunk of prompt queries in tiles of up to [`TILE_ROWS`] rows (consecutive
    /// tokens × the task's query heads) against the chunk's keys and values, copied out
    /// once: the keys every row of a tile sees go through the group kernels, each key
    /// and value loaded once for the tile; the few that only its later tokens see, row
    /// by row. Every row gets the bits it gets as a lone query: the kernels run each
    /// (query, key) pair's own sequence, and a weighted sum continued onto its partial
    /// result equals the sum in one go.
    fn run_tiles(&self, task: Task, scratch: &mut Vec<f32>) {
        let d = self.shape.head_dim;
        let heads = task.heads.1 - task.heads.0;
        let (tile_tokens, tile_heads) = if heads >= TILE_ROWS {
            (1, TILE_ROWS)
        } else {
            (TILE_ROWS / heads, heads)
        };
        let rows = tile_tokens * tile_heads;
        let n_keys = self.seq.start_pos + task.first + task.count;
        let need = 2 * n_keys * d + rows * n_keys + 2 * rows * d;
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let (keys, rest) = scratch.split_at_mut(n_keys * d);
        let (values, rest) = rest.split_at_mut(n_keys * d);
        let (scores, rest) = rest.split_at_mut(rows * n_keys);
        let (qs, outs) = rest[..2 * rows * d].split_at_mut(rows * d);
        self.gather(task.kv_head, keys, values);
        let end = task.first + task.count;
        for t0 in (task.first..end).step_by(tile_tokens) {
            let tokens = t0..(t0 + tile_tokens).min(end);
            for h0 in (task.heads.0..task.heads.1).step_by(tile_heads) {
                let tile = Tile {
                    tokens: tokens.clone(),
                    heads: h0..(h0 + tile_heads).min(task.heads.1),
                };
                self.run_tile(&tile, keys, values, scores, qs, outs);
            }
        }
    }

    /// One tile of [`run_tiles`](Self::run_tiles): score rows are `n_keys` apart in
    /// `scores` (the chunk's widest), `qs` and `outs` hold one row of `head_dim` each.
    fn run_tile(
        &self,
        tile: &Tile,
        keys: &[f32],
        values: &[f32],
        scores: &mut [f32],
        qs: &mut [f32],
        outs: &mut [f32],
    ) {
        let d = self.shape.head_dim;
        let stride = keys.len() / d;
        let rows = tile.tokens.len() * tile.heads.len();
        let row_cells = || {
            tile.tokens
                .clone()
                .flat_map(move |token| tile.heads.clone().map(move |head| (token, head)))
        };
        // Keys visible to the tile's first token, and so to all of its rows.
        let common = self.seq.start_pos + tile.tokens.start + 1;
        let visible = |token: usize| self.seq.start_pos + token + 1;
        for ((token, head), q) in row_cells().zip(qs.chunks_exact_mut(d)) {
            q.copy_from_slice(self.query(token, head));
        }
        let (qs, outs) = (&qs[..rows * d], &mut outs[..rows * d]);
        let scale = 1.0 / (d as f32).sqrt();
        let common_keys = KvSlots::F32(&keys[..common * d]);
        group_scores_in_place(qs, rows, common_keys, scale, scores, stride, 0);
        for (r, (token, _)) in row_cells().enumerate() {
            let row = &mut scores[r * stride..r * stride + visible(token)];
            let late_keys = KvSlots::F32(&keys[common * d..visible(token) * d]);
            scores_in_place(
                &qs[r * d..(r + 1) * d],
                late_keys,
                scale,
                &mut row[common..],
            );
            softmax(row);
        }
        outs.fill(0.0);
        let common_values = KvSlots::F32(&values[..common * d]);
        group_weighted_sum_add_in_place(scores, stride, 0, common_values, outs, rows);
        for (r, ((token, head), out)) in row_cells().zip(outs.chunks_exact_mut(d)).enumerate() {
            let probs = &scores[r * stride + common..r * stride + visible(token)];
            let late_values = KvSlots::F32(&values[common * d..visible(token) * d]);
            weighted_sum_add_in_place(probs, late_values, out);
            // SAFETY: as in `run`.
            let dst = unsafe { std::slice::from_raw_parts_mut(self.out_head(token, head), d) };
            dst.copy_from_slice(out);
        }
    }

    /// One query per head, scored against the keys and summing the values where the
    /// store holds them, one block at a time.
    fn run_in_place(&self, task: Task, scratch: &mut Vec<f32>) {
        let (d, block_size) = (self.shape.head_dim, self.shape.block_size);
        let token = task.first;
        let visible = self.seq.start_pos + token + 1;
        if scratch.len() < visible {
            scratch.resize(visible, 0.0);
        }
        let scores = &mut scratch[..visible];
        let scale = 1.0 / (d as f32).sqrt();
        for head in task.heads.0..task.heads.1 {
            let q = self.query(token, head);
            self.prefetch_first(Plane::Keys, task.kv_head, visible);
            for (b, chunk) in scores.chunks_mut(block_size).enumerate() {
                self.prefetch_block(Plane::Keys, task.kv_head, visible, b + PREFETCH_AHEAD);
                let block = self.seq.block_table[b];
                let keys = self
                    .kv
                    .key_slots(self.layer, block, task.kv_head, chunk.len());
                scores_in_place(q, keys, scale, chunk);
            }
            softmax(scores);
            // SAFETY: as in `run`.
            let out = unsafe { std::slice::from_raw_parts_mut(self.out_head(token, head), d) };
            out.fill(0.0);
            self.prefetch_first(Plane::Values, task.kv_head, visible);
            for (b, probs) in scores.chunks(block_size).enumerate() {
                self.prefetch_block(Plane::Values, task.kv_head, visible, b + PREFETCH_AHEAD);
                let block = self.seq.block_table[b];
                let values = self
                    .kv
                    .value_slots(self.layer, block, task.kv_head, probs.len());
                weighted_sum_add_in_place(probs, values, out);
            }
        }
    }

    /// One query of each of a KV head's query heads, scored and summed together where
    /// the store holds the keys and values: each is read and converted once for the
    /// whole group, and nothing is copied out.
    fn run_group_in_place(&self, task: Task, scratch: &mut Vec<f32>) {
        let (d, block_size) = (self.shape.head_dim, self.shape.block_size);
        let heads = task.heads.1 - task.heads.0;
        let token = task.first;
        let visible = self.seq.start_pos + token + 1;
        if scratch.len() < heads * visible {
            scratch.resize(heads * visible, 0.0);
        }
        let rows = &mut scratch[..heads * visible];
        let scale = 1.0 / (d as f32).sqrt();
        let at = (self.seq.row + token) * self.shape.q_stride + task.heads.0 * d;
        let qs = &self.queries[at..at + heads * d];
        self.prefetch_first(Plane::Keys, task.kv_head, visible);
        for (b, first) in (0..visible).step_by(block_size).enumerate() {
            self.prefetch_block(Plane::Keys, task.kv_head, visible, b + PREFETCH_AHEAD);
            let slots = block_size.min(visible - first);
            let keys = self
                .kv
                .key_slots(self.layer, self.seq.block_table[b], task.kv_head, slots);
            group_scores_in_place(qs, heads, keys, scale, rows, visible, first);
        }
        for row in rows.chunks_mut(visible) {
            softmax(row);
        }
        // SAFETY: as in `run`; the group's heads are adjacent in the output row.
        let out = unsafe {
            std::slice::from_raw_parts_mut(self.out_head(token, task.heads.0), heads * d)
        };
        out.fill(0.0);
        self.prefetch_first(Plane::Values, task.kv_head, visible);
        for (b, first) in (0..visible).step_by(block_size).enumerate() {
            self.prefetch_block(Plane::Values, task.kv_head, visible, b + PREFETCH_AHEAD);
            let slots = block_size.min(visible - first);
            let values =
                self.kv
                    .value_slots(self.layer, self.seq.block_table[b], task.kv_head, slots);
            group_weighted_sum_add_in_place(rows, visible, first, values, out, heads);
        }
    }

    /// Asks for the first [`PREFETCH_AHEAD`] blocks of `kv_head`'s keys or values
    /// before a walk over its first `visible` positions starts. (Asking for all of them
    /// up front, as before, stalled on the line fill buffers with nothing to overlap:
    /// decode at 1.5k tokens of context ran ~30% slower, `docs/benchmarks.md`.)
    fn prefetch_first(&self, plane: Plane, kv_head: usize, visible: usize) {
        for b in 0..PREFETCH_AHEAD {
            self.prefetch_block(plane, kv_head, visible, b);
        }
    }

    /// Asks for block `b` of `kv_head`'s keys or values (nothing past `visible`); the
    /// walks ask for the block [`PREFETCH_AHEAD`] after the one they compute: the keys
    /// and values come from memory (a step's weights have gone through the caches since)
    /// in blocks of a few KB scattered over the store, which the hardware prefetchers
    /// do not follow from one block to the next.
    fn prefetch_block(&self, plane: Plane, kv_head: usize, visible: usize, b: usize) {
        let block_size = self.shape.block_size;
        let first = b * block_size;
        if first >= visible {
            return;
        }
        let (block, slots) = (self.seq.block_table[b], block_size.min(visible - first));
        prefetch(
            self.kv
                .plane_slots(self.layer, block, plane, kv_head, slots),
        );
    }

    fn query(&self, token: usize, head: usize) -> &[f32] {
        let d = self.shape.head_dim;
        let at = (self.seq.row + token) * self.shape.q_stride + head * d;
        &self.queries[at..at + d]
    }

    /// Start of the output for `(token, head)`; in bounds (checked in `attend`).
    fn out_head(&self, token: usize, head: usize) -> *mut f32 {
        let at = (self.seq.row + token) * self.out_stride + head * self.shape.head_dim;
        // SAFETY: `at` is inside the output buffer, see `attend`.
        unsafe { self.out.0.add(at) }
    }

    /// Copies the first `keys.len() / head_dim` positions of `kv_head` into contiguous
    /// `[position][head_dim]` buffers.
    fn gather(&self, kv_head: usize, keys: &mut [f32], values: &mut [f32]) {
        let per_block = self.shape.block_size * self.shape.head_dim;
        for (b, (k_dst, v_dst)) in keys
            .chunks_mut(per_block)
            .zip(values.chunks_mut(per_block))
            .enumerate()
        {
            let block = self.seq.block_table[b];
            self.kv.read_keys(self.layer, block, kv_head, k_dst);
            self.kv.read_values(self.layer, block, kv_head, v_dst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M's attention: 9 query heads over 3 KV heads of 64.
    fn shape() -> AttnShape {
        AttnShape {
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            block_size: 16,
            q_stride: 9 * 64,
        }
    }

    /// Sequences of (new tokens, tokens already stored), rows back to back.
    fn seqs(spec: &[(usize, usize)]) -> Vec<AttnSeq<'static>> {
        let mut row = 0;
        spec.iter()
            .map(|&(n_tokens, start_pos)| {
                let seq = AttnSeq {
                    row,
                    n_tokens,
                    start_pos,
                    block_table: &[],
                };
                row += n_tokens;
                seq
            })
            .collect()
    }

    /// How many tasks serve each (sequence, token, query head); every one must be 1.
    fn coverage(shape: &AttnShape, seqs: &[AttnSeq], tasks: &[Task]) -> Vec<usize> {
        let offsets: Vec<usize> = seqs.iter().map(|s| s.row * shape.num_heads).collect();
        let rows: usize = seqs.iter().map(|s| s.n_tokens).sum();
        let mut served = vec![0; rows * shape.num_heads];
        for task in tasks {
            let group = shape.num_heads / shape.num_kv_heads;
            assert!(
                task.heads.0 >= task.kv_head * group && task.heads.1 <= (task.kv_head + 1) * group
            );
            for token in task.first..task.first + task.count {
                for head in task.heads.0..task.heads.1 {
                    served[offsets[task.seq] + token * shape.num_heads + head] += 1;
                }
            }
        }
        served
    }

    fn per_head_tasks(tasks: &[Task]) -> usize {
        tasks.iter().filter(|t| t.heads.1 - t.heads.0 == 1).count()
    }

    #[test]
    fn every_query_head_is_served_once() {
        let shape = shape();
        for spec in [
            vec![(1, 0)],
            vec![(1, 2000)],
            vec![(200, 0), (1, 40), (3, 300)],
            vec![(1, 10); 8],
        ] {
            let seqs = seqs(&spec);
            for threads in [1, 2, 16] {
                let tasks = plan(&shape, &seqs, threads);
                let served = coverage(&shape, &seqs, &tasks);
                assert!(
                    served.iter().all(|&n| n == 1),
                    "{spec:?} on {threads} threads"
                );
            }
        }
    }

    /// Deterministic values in [-1, 1), a different run for each seed.
    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 4096) as f32)
            .map(|v| v / 2048.0 - 1.0)
            .collect()
    }

    /// A prompt chunk's queries (served in tiles) get the very bits each gets as a lone
    /// decode token (served by the in-place kernels, one query head at a time or the
    /// whole group): for groups of 1 and 2 heads (tiles of several tokens, whose later
    /// rows see keys the first does not), 3 (a tile of one token), 4 and 8 (a tile of
    /// part of the group), keys stored in f16 and f32, a chunk that starts after stored
    /// context and spans two query chunks.
    #[test]
    fn a_prompt_chunk_gives_each_token_the_bits_it_gets_alone() {
        use crate::kv::{KvDtype, KvLayout};
        let pools = [ThreadPool::new(1).unwrap(), ThreadPool::new(2).unwrap()];
        let (d, block_size, start_pos, n_tokens): (usize, usize, usize, usize) = (64, 16, 21, 83);
        let total = start_pos + n_tokens;
        let n_blocks = total.div_ceil(block_size);
        // Blocks out of order, as a pool hands them out after some churn.
        let table: Vec<BlockId> = (0..n_blocks as BlockId).rev().collect();
        for (num_heads, num_kv_heads) in [(9, 3), (8, 2), (16, 2), (6, 3), (2, 2)] {
            for dtype in [KvDtype::F16, KvDtype::F32] {
                let layout = KvLayout {
                    num_layers: 1,
                    num_kv_heads,
                    head_dim: d,
                    block_size,
                    dtype,
                };
                let mut kv = KvStore::new(layout, n_blocks);
                let width = num_kv_heads * d;
                let (keys, values) = (data(total * width, 1), data(total * width, 2));
                for pos in 0..total {
                    let at = pos * width..(pos + 1) * width;
                    let block = table[pos / block_size];
                    kv.write(0, block, pos % block_size, &keys[at.clone()], &values[at]);
                }
                let shape = AttnShape {
                    num_heads,
                    num_kv_heads,
                    head_dim: d,
                    block_size,
                    q_stride: num_heads * d,
                };
                let row = num_heads * d;
                let queries = data(n_tokens * row, 3);
                let chunk = AttnSeq {
                    row: 0,
                    n_tokens,
                    start_pos,
                    block_table: &table,
                };
                let mut together = vec![0.0; n_tokens * row];
                attend(&pools[1], &shape, &[chunk], 0, &queries, &kv, &mut together);
                for (t, expected) in together.chunks_exact(row).enumerate() {
                    let alone = || AttnSeq {
                        row: 0,
                        n_tokens: 1,
                        start_pos: start_pos + t,
                        block_table: &table,
                    };
                    for pool in &pools {
                        let mut out = vec![0.0; row];
                        let q = &queries[t * row..(t + 1) * row];
                        attend(pool, &shape, &[alone()], 0, q, &kv, &mut out);
                        let same = out
                            .iter()
                            .zip(expected)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{num_heads}/{num_kv_heads} heads, {dtype:?}, token {t}, {} thread(s)",
                            pool.n_threads()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn query_heads_get_their_own_tasks_only_where_that_spreads_short_work() {
        let shape = shape();
        // One decode token, short context, two threads: nine tasks share both cores.
        assert_eq!(per_head_tasks(&plan(&shape, &seqs(&[(1, 100)]), 2)), 9);
        // One thread: one pass over each KV head's keys and values serves its group.
        let tasks = plan(&shape, &seqs(&[(1, 100)]), 1);
        assert_eq!((tasks.len(), per_head_tasks(&tasks)), (3, 0));
        // A long context: reading it three times costs more than the spread gains.
        let tasks = plan(&shape, &seqs(&[(1, PER_HEAD_MAX_KEYS)]), 2);
        assert_eq!((tasks.len(), per_head_tasks(&tasks)), (3, 0));
        // Enough sequences for per-KV-head tasks to fill the threads.
        let tasks = plan(&shape, &seqs(&[(1, 10); 8]), 2);
        assert_eq!((tasks.len(), per_head_tasks(&tasks)), (24, 0));
    }
}
