//! Causal attention over the paged KV store for a ragged batch.
//!
//! Keys and values are read out of the store (f16 or f32) into f32 buffers; all
//! arithmetic is f32.
//!
//! Work is split into independent tasks for the thread pool. A sequence with few new
//! tokens (decode) is scored block by block straight from the store; one with many
//! (prefill) gathers its KV head's keys and values into contiguous buffers once per
//! chunk of queries and runs two GEMMs per query head, skipping the key range that
//! the causal mask hides from the whole chunk.

use std::cell::RefCell;

use crate::kernels::ThreadPool;
use crate::kv::{BlockId, KvStore};

/// Sequences with at most this many new tokens are scored block by block.
const DIRECT_MAX_TOKENS: usize = 4;
/// Queries handled by one prefill task.
const QUERY_CHUNK: usize = 64;

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
    /// Query head for direct tasks; KV head for chunked tasks.
    head: usize,
    /// First query (relative to the sequence) and query count.
    first: usize,
    count: usize,
    direct: bool,
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
    let tasks = plan(shape, seqs);
    let out_stride = shape.num_heads * shape.head_dim;
    assert!(out.len() >= seqs.iter().map(|s| s.row + s.n_tokens).max().unwrap_or(0) * out_stride);
    let out_ptr = OutPtr(out.as_mut_ptr());
    pool.run(tasks.len(), |i| {
        let task = tasks[i];
        let seq = &seqs[task.seq];
        let ctx = TaskCtx {
            shape,
            seq,
            layer,
            queries,
            kv,
            out: out_ptr,
            out_stride,
        };
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            if task.direct {
                ctx.direct(task, &mut scratch);
            } else {
                ctx.chunked(task, &mut scratch);
            }
        });
    });
}

fn plan(shape: &AttnShape, seqs: &[AttnSeq]) -> Vec<Task> {
    let mut tasks = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        if seq.n_tokens <= DIRECT_MAX_TOKENS {
            for head in 0..shape.num_heads {
                tasks.push(Task {
                    seq: s,
                    head,
                    first: 0,
                    count: seq.n_tokens,
                    direct: true,
                });
            }
            continue;
        }
        // Later chunks see more keys; queue them first so the pool ends balanced.
        let chunks = seq.n_tokens.div_ceil(QUERY_CHUNK);
        for c in (0..chunks).rev() {
            let first = c * QUERY_CHUNK;
            let count = QUERY_CHUNK.min(seq.n_tokens - first);
            for head in 0..shape.num_kv_heads {
                tasks.push(Task {
                    seq: s,
                    head,
                    first,
                    count,
                    direct: false,
                });
            }
        }
    }
    tasks
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

    /// Scores one query head's few new tokens against the store, block by block.
    fn direct(&self, task: Task, scratch: &mut Vec<f32>) {
        let s = self.shape;
        let d = s.head_dim;
        let kv_head = task.head / (s.num_heads / s.num_kv_heads);
        let scale = 1.0 / (d as f32).sqrt();
        let per_block = s.block_size * d;
        for token in task.first..task.first + task.count {
            let ctx_len = self.seq.start_pos + token + 1;
            scratch.clear();
            scratch.resize(per_block + ctx_len, 0.0);
            let (block_buf, scores) = scratch.split_at_mut(per_block);
            let q = self.query(token, task.head);
            for (b, chunk) in scores.chunks_mut(s.block_size).enumerate() {
                let keys = &mut block_buf[..chunk.len() * d];
                self.kv
                    .read_keys(self.layer, self.seq.block_table[b], kv_head, keys);
                for (slot, score) in chunk.iter_mut().enumerate() {
                    *score = dot(q, &block_buf[slot * d..(slot + 1) * d]) * scale;
                }
            }
            softmax(scores);
            // SAFETY: direct tasks are the only writers of their query head's outputs.
            let out = unsafe { std::slice::from_raw_parts_mut(self.out_head(token, task.head), d) };
            out.fill(0.0);
            for (b, chunk) in scores.chunks(s.block_size).enumerate() {
                let values = &mut block_buf[..chunk.len() * d];
                self.kv
                    .read_values(self.layer, self.seq.block_table[b], kv_head, values);
                for (slot, &p) in chunk.iter().enumerate() {
                    axpy(p, &block_buf[slot * d..(slot + 1) * d], out);
                }
            }
        }
    }

    /// A chunk of queries for every query head of one KV head, with two GEMMs each.
    fn chunked(&self, task: Task, scratch: &mut Vec<f32>) {
        let s = self.shape;
        let d = s.head_dim;
        let group = s.num_heads / s.num_kv_heads;
        // Keys visible to the chunk's last query.
        let n_keys = self.seq.start_pos + task.first + task.count;
        let need = 2 * n_keys * d + task.count * n_keys;
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let (keys, rest) = scratch.split_at_mut(n_keys * d);
        let (values, rest) = rest.split_at_mut(n_keys * d);
        let scores = &mut rest[..task.count * n_keys];
        self.gather(task.head, n_keys, keys, values);
        let scale = 1.0 / (d as f32).sqrt();
        for head in task.head * group..(task.head + 1) * group {
            let q = self.query(task.first, head);
            // scores[i][j] = q_i · k_j
            // SAFETY: lhs rows are `q_stride` apart inside `queries`, rhs is `keys`
            // viewed as [d][n_keys] (column j = key j), dst is `scores`.
            unsafe {
                gemm::gemm(
                    task.count,
                    n_keys,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    n_keys as isize,
                    false,
                    q.as_ptr(),
                    1,
                    s.q_stride as isize,
                    keys.as_ptr(),
                    d as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (i, row) in scores.chunks_mut(n_keys).enumerate() {
                let visible = self.seq.start_pos + task.first + i + 1;
                softmax(&mut row[..visible]);
                row[visible..].fill(0.0);
            }
            // SAFETY: this task owns query heads `head` of tokens first..first+count;
            // dst rows are `out_stride` apart.
            unsafe {
                let out = self.out_head(task.first, head);
                gemm::gemm(
                    task.count,
                    d,
                    n_keys,
                    out,
                    1,
                    self.out_stride as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    n_keys as isize,
                    values.as_ptr(),
                    1,
                    d as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    }

    /// Copies the first `n_keys` positions of `kv_head` into contiguous `[n][d]` buffers.
    fn gather(&self, kv_head: usize, n_keys: usize, keys: &mut [f32], values: &mut [f32]) {
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
        debug_assert_eq!(keys.len(), n_keys * self.shape.head_dim);
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    crate::kernels::ops::dot(a, b)
}

#[inline]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    crate::kernels::ops::axpy(alpha, x, y)
}

fn softmax(xs: &mut [f32]) {
    crate::kernels::ops::softmax(xs);
}
