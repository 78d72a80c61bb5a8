//! The machine's streaming-read rate, shared by the benches that compare against it.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tandem_engine::kernels::ThreadPool;

/// Bytes per second of reading a 512 MB buffer (larger than any cache) once, split
/// between the pool's threads, best of `trials` (at least 3): the rate at which a decode
/// step can stream weights.
pub fn stream_bandwidth(pool: &ThreadPool, trials: usize) -> f64 {
    const BYTES: usize = 512 << 20;
    let words = vec![1u64; BYTES / 8];
    let n_tasks = pool.n_threads() * 4;
    let chunk = words.len().div_ceil(n_tasks);
    let sums: Vec<AtomicU64> = (0..n_tasks).map(|_| AtomicU64::new(0)).collect();
    let best = (0..trials.max(3))
        .map(|_| {
            let start = Instant::now();
            pool.run(n_tasks, |i| {
                let part = &words[(i * chunk).min(words.len())..((i + 1) * chunk).min(words.len())];
                let sum = part.iter().fold(0u64, |a, &w| a.wrapping_add(w));
                sums[i].store(sum, Ordering::Relaxed);
            });
            start.elapsed()
        })
        .min()
        .unwrap_or_default();
    black_box(&sums);
    BYTES as f64 / best.as_secs_f64()
}
