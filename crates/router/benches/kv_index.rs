//! The pure KV index at scale: 100 workers holding 1M blocks in all (blocks of 16
//! tokens, prompts of 256 tokens whose first 128 are one of 50 shared system prompts).
//!
//! - `kv_index/apply_block_stored`: a worker's 10 000 blocks (625 `BlockStored`
//!   events of 16 blocks) applied on top of the 1M others; blocks per second.
//! - `kv_index/overlap`: one lookup of a 256-token prompt's keys (precomputed);
//!   `kv_index/prompt_keys_and_overlap` includes hashing the tokens.
//!
//! `cargo bench -p tandem-router --bench kv_index`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tandem_protocol::kv_events::{BlockStored, KvEvent, KvEventBatch};
use tandem_router::kv_index::{KvIndex, WorkerId, prompt_keys};

const WORKERS: u32 = 100;
const BLOCK: usize = 16;
const PROMPT_BLOCKS: usize = 16;
const SYSTEM_BLOCKS: usize = 8;
const SYSTEM_PROMPTS: u32 = 50;
/// 100 workers × 625 prompts × 16 blocks = 1M blocks.
const PROMPTS_PER_WORKER: u32 = 625;

/// splitmix64, for reproducible token ids.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Prompt `p` of worker `w`: a shared system prompt, then its own tokens.
fn prompt(w: u32, p: u32) -> Vec<u32> {
    let system = (w * 7 + p) % SYSTEM_PROMPTS;
    let mut tokens: Vec<u32> = (0..SYSTEM_BLOCKS * BLOCK)
        .map(|i| system * 10_000 + i as u32)
        .collect();
    let mut state = u64::from(w) << 32 | u64::from(p);
    tokens.extend(
        (0..(PROMPT_BLOCKS - SYSTEM_BLOCKS) * BLOCK).map(|_| (next(&mut state) % 128_000) as u32),
    );
    tokens
}

/// The batch a worker publishes when it caches `tokens` (fresh engine hashes).
fn stored(w: u32, p: u32, tokens: Vec<u32>) -> KvEventBatch {
    let base = (u64::from(w) << 40) | (u64::from(p) << 8);
    KvEventBatch {
        ts: 0.0,
        events: vec![KvEvent::BlockStored(BlockStored::new(
            (0..PROMPT_BLOCKS as u64).map(|b| base + b).collect(),
            None,
            tokens,
            BLOCK as u32,
            "GPU",
        ))],
        data_parallel_rank: Some(0),
    }
}

fn worker_batches(w: u32) -> Vec<KvEventBatch> {
    (0..PROMPTS_PER_WORKER)
        .map(|p| stored(w, p, prompt(w, p)))
        .collect()
}

fn populated() -> KvIndex {
    let mut index = KvIndex::new(1 << 21);
    for w in 0..WORKERS {
        for (seq, batch) in worker_batches(w).iter().enumerate() {
            index.apply(WorkerId(w), seq as u64, batch);
        }
    }
    assert_eq!(index.entries(), 1_000_000);
    index
}

fn bench(c: &mut Criterion) {
    let mut index = populated();
    let mut group = c.benchmark_group("kv_index");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));

    let newcomer = WorkerId(WORKERS);
    let batches = worker_batches(WORKERS);
    group.throughput(Throughput::Elements(
        (PROMPTS_PER_WORKER as usize * PROMPT_BLOCKS) as u64,
    ));
    group.bench_function("apply_block_stored", |b| {
        b.iter_custom(|iterations| {
            let mut spent = Duration::ZERO;
            for _ in 0..iterations {
                let start = Instant::now();
                for (seq, batch) in batches.iter().enumerate() {
                    black_box(index.apply(newcomer, seq as u64, batch));
                }
                spent += start.elapsed();
                index.remove_worker(newcomer);
            }
            spent
        })
    });

    // Lookups: prompts cached somewhere (a worker's own) and new prompts sharing
    // only a system prompt.
    let lookups: Vec<Vec<u32>> = (0..256u32)
        .map(|i| match i % 2 {
            0 => prompt(i % WORKERS, i % PROMPTS_PER_WORKER),
            _ => prompt(WORKERS + 1 + i, i),
        })
        .collect();
    let keys: Vec<_> = lookups.iter().map(|t| prompt_keys(t, BLOCK)).collect();
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("overlap", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(index.overlap(&keys[i]))
        })
    });
    group.bench_function("prompt_keys_and_overlap", |b| {
        b.iter(|| {
            i = (i + 1) % lookups.len();
            black_box(index.overlap(&prompt_keys(&lookups[i], BLOCK)))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
