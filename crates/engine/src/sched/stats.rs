//! A snapshot of the engine loop's state that any thread can read: what `/metrics`
//! exports as gauges, and what tests and health checks look at.

use std::sync::atomic::{AtomicU64, Ordering};

/// Engine state as of the end of the last step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    /// Fraction of KV blocks referenced by a sequence.
    pub kv_usage: f64,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub preemptions: u64,
    /// Engine steps run so far.
    pub steps: u64,
}

/// The shared cells behind [`EngineStats`], written only by the engine loop.
#[derive(Default)]
pub(crate) struct SharedStats {
    running: AtomicU64,
    waiting: AtomicU64,
    kv_usage_bits: AtomicU64,
    prefix_cache_queries: AtomicU64,
    prefix_cache_hits: AtomicU64,
    preemptions: AtomicU64,
    steps: AtomicU64,
}

impl SharedStats {
    pub fn store(&self, stats: &EngineStats) {
        let relaxed = Ordering::Relaxed;
        self.running.store(stats.running as u64, relaxed);
        self.waiting.store(stats.waiting as u64, relaxed);
        self.kv_usage_bits.store(stats.kv_usage.to_bits(), relaxed);
        self.prefix_cache_queries
            .store(stats.prefix_cache_queries, relaxed);
        self.prefix_cache_hits
            .store(stats.prefix_cache_hits, relaxed);
        self.preemptions.store(stats.preemptions, relaxed);
        // Release: a reader that sees this step sees the values above.
        self.steps.store(stats.steps, Ordering::Release);
    }

    pub fn load(&self) -> EngineStats {
        let steps = self.steps.load(Ordering::Acquire);
        let relaxed = Ordering::Relaxed;
        EngineStats {
            running: self.running.load(relaxed) as usize,
            waiting: self.waiting.load(relaxed) as usize,
            kv_usage: f64::from_bits(self.kv_usage_bits.load(relaxed)),
            prefix_cache_queries: self.prefix_cache_queries.load(relaxed),
            prefix_cache_hits: self.prefix_cache_hits.load(relaxed),
            preemptions: self.preemptions.load(relaxed),
            steps,
        }
    }
}
