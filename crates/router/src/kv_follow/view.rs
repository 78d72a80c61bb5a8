//! [`KvCacheView`]: the KV index behind a lock, the URL → [`WorkerId`] map and each
//! followed worker's liveness, shared by the subscribers (writers) and the policies
//! (readers, through [`PrefixLookup`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use tandem_protocol::kv_events::{KvEvent, KvEventBatch};

use crate::kv_index::{ApplyOutcome, KvIndex, KvIndexCounters, WorkerId, prompt_keys};
use crate::metrics as names;
use crate::policy::PrefixLookup;

/// What the router knows of one followed worker's event stream. Lock-free, so that
/// [`KvCacheView::note_routed`] costs a map read and an atomic.
#[derive(Debug)]
pub(crate) struct WorkerLive {
    pub(crate) id: WorkerId,
    connected: AtomicBool,
    /// Tokens per block, from its `BlockStored` events; 0 until one arrives.
    block_size: AtomicUsize,
    /// When a request was first routed to it since its last event: milliseconds since
    /// the view's epoch, plus 1; 0 when none is waiting.
    routed_since_event: AtomicU64,
}

/// Why a worker's cache is unknown, or that it is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheState {
    /// Followed, connected, in sequence: its blocks are known.
    Known,
    /// No event stream is configured for it.
    NotFollowed,
    /// Its stream is not connected.
    Disconnected,
    /// It missed messages that replay could not bring back.
    Stale,
    /// Requests went to it and no event came back for `stale_after`.
    EventsStopped,
}

/// The router's view of its workers' KV caches: see the module doc of `kv_follow`.
pub struct KvCacheView {
    index: Mutex<IndexState>,
    workers: RwLock<HashMap<String, Arc<WorkerLive>>>,
    next_id: AtomicU32,
    epoch: Instant,
    stale_after: Duration,
}

/// A summary: the index may hold millions of entries.
impl std::fmt::Debug for KvCacheView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let workers = self.workers.read().map_or(0, |w| w.len());
        let entries = self.index.lock().map_or(0, |state| state.index.entries());
        f.debug_struct("KvCacheView")
            .field("followed_workers", &workers)
            .field("index_entries", &entries)
            .field("stale_after", &self.stale_after)
            .finish()
    }
}

struct IndexState {
    index: KvIndex,
    /// The counters as last turned into metrics.
    published: KvIndexCounters,
}

impl KvCacheView {
    /// An empty view: an index of at most `max_blocks` entries; a worker whose events
    /// stop for `stale_after` after a request was routed to it counts as unknown.
    pub fn new(max_blocks: usize, stale_after: Duration) -> Self {
        KvCacheView {
            index: Mutex::new(IndexState {
                index: KvIndex::new(max_blocks),
                published: KvIndexCounters::default(),
            }),
            workers: RwLock::new(HashMap::new()),
            next_id: AtomicU32::new(0),
            epoch: Instant::now(),
            stale_after,
        }
    }

    /// The view as the policies take it.
    pub fn lookup(self: &Arc<Self>) -> Arc<dyn PrefixLookup> {
        self.clone()
    }

    fn lock(&self) -> MutexGuard<'_, IndexState> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self, url: &str) -> Option<Arc<WorkerLive>> {
        let workers = self.workers.read().unwrap_or_else(|e| e.into_inner());
        workers.get(url).cloned()
    }

    /// Starts following `url` afresh (a worker followed before is forgotten first).
    pub(crate) fn register(&self, url: &str) -> Arc<WorkerLive> {
        let live = Arc::new(WorkerLive {
            id: WorkerId(self.next_id.fetch_add(1, Ordering::Relaxed)),
            connected: AtomicBool::new(false),
            block_size: AtomicUsize::new(0),
            routed_since_event: AtomicU64::new(0),
        });
        let old = {
            let mut workers = self.workers.write().unwrap_or_else(|e| e.into_inner());
            workers.insert(url.to_owned(), live.clone())
        };
        if let Some(old) = old {
            self.lock().index.remove_worker(old.id);
        }
        live
    }

    /// Stops following `url` and forgets its blocks.
    pub(crate) fn unregister(&self, url: &str) {
        let old = {
            let mut workers = self.workers.write().unwrap_or_else(|e| e.into_inner());
            workers.remove(url)
        };
        if let Some(old) = old {
            self.lock().index.remove_worker(old.id);
            metrics::gauge!(names::KV_INDEX_BLOCKS, names::WORKER => url.to_owned()).set(0.0);
        }
    }

    /// Forgets the blocks of a worker id no longer in the map (a subscriber that
    /// applied a last batch after its worker was unregistered).
    pub(crate) fn forget(&self, worker: WorkerId) {
        self.lock().index.remove_worker(worker);
    }

    /// The dispatcher's hook: a request was just routed to `url`. If no event comes
    /// from it within `stale_after`, its cache counts as unknown until one does.
    pub fn note_routed(&self, url: &str) {
        if let Some(live) = self.live(url) {
            let now = self.now_stamp();
            let _ = live.routed_since_event.compare_exchange(
                0,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    fn now_stamp(&self) -> u64 {
        let millis = self.epoch.elapsed().as_millis();
        u64::try_from(millis).unwrap_or(u64::MAX - 1) + 1
    }

    /// Whether `url` has an event stream.
    pub fn is_followed(&self, url: &str) -> bool {
        self.live(url).is_some()
    }

    /// Engine blocks of `url` in the index.
    pub fn worker_blocks(&self, url: &str) -> usize {
        self.live(url)
            .map_or(0, |live| self.lock().index.worker_blocks(live.id))
    }

    /// Whether `url`'s cache is known, and why not.
    pub fn cache_state(&self, url: &str) -> CacheState {
        match self.live(url) {
            None => CacheState::NotFollowed,
            Some(live) => self.state_of(&live, &self.lock().index),
        }
    }

    fn state_of(&self, live: &WorkerLive, index: &KvIndex) -> CacheState {
        if !live.connected.load(Ordering::Relaxed) {
            return CacheState::Disconnected;
        }
        if index.is_stale(live.id) {
            return CacheState::Stale;
        }
        let routed = live.routed_since_event.load(Ordering::Relaxed);
        let waited = self.now_stamp().saturating_sub(routed);
        if routed != 0 && Duration::from_millis(waited) > self.stale_after {
            return CacheState::EventsStopped;
        }
        CacheState::Known
    }

    /// Counts of the workers whose cache is unknown, and publishes the per-worker
    /// blocks gauge: called on a timer, not per event.
    pub(crate) fn publish_gauges(&self) {
        let workers: Vec<(String, Arc<WorkerLive>)> = {
            let map = self.workers.read().unwrap_or_else(|e| e.into_inner());
            map.iter().map(|(u, l)| (u.clone(), l.clone())).collect()
        };
        let state = self.lock();
        let mut unknown = 0usize;
        for (url, live) in &workers {
            if self.state_of(live, &state.index) != CacheState::Known {
                unknown += 1;
            }
            let blocks = state.index.worker_blocks(live.id) as f64;
            metrics::gauge!(names::KV_INDEX_BLOCKS, names::WORKER => url.clone()).set(blocks);
        }
        metrics::gauge!(names::KV_UNKNOWN_WORKERS).set(unknown as f64);
    }

    pub(crate) fn set_connected(&self, live: &WorkerLive, connected: bool) {
        live.connected.store(connected, Ordering::Relaxed);
    }

    /// An event arrived from `live`'s worker: it is not silent any more.
    pub(crate) fn event_arrived(&self, live: &WorkerLive) {
        live.routed_since_event.store(0, Ordering::Relaxed);
    }

    pub(crate) fn last_seq(&self, live: &WorkerLive) -> Option<u64> {
        self.lock().index.last_seq(live.id)
    }

    /// Forgets `live`'s blocks and sequence: its cache is rebuilt from new events.
    pub(crate) fn reset(&self, live: &WorkerLive) {
        self.lock().index.reset(live.id);
    }

    /// Applies one batch of `live`'s stream, learning its block size.
    pub(crate) fn apply(&self, live: &WorkerLive, seq: u64, batch: &KvEventBatch) -> ApplyOutcome {
        if let Some(size) = block_size_of(batch) {
            live.block_size.store(size, Ordering::Relaxed);
        }
        let mut state = self.lock();
        let outcome = state.index.apply(live.id, seq, batch);
        publish_counters(&mut state);
        outcome
    }
}

/// The block size of the batch's last `BlockStored`, if it has one.
fn block_size_of(batch: &KvEventBatch) -> Option<usize> {
    batch.events.iter().rev().find_map(|event| match event {
        KvEvent::BlockStored(stored) if stored.block_size > 0 => {
            usize::try_from(stored.block_size).ok()
        }
        _ => None,
    })
}

/// Turns what the index counted since the last call into metric increments.
fn publish_counters(state: &mut IndexState) {
    let now = state.index.counters().clone();
    let before = std::mem::replace(&mut state.published, now.clone());
    let applied = now.batches_applied - before.batches_applied;
    if applied > 0 {
        metrics::counter!(names::KV_EVENT_BATCHES_TOTAL).increment(applied);
    }
    for (reason, count) in [
        (
            "duplicate",
            now.batches_duplicate - before.batches_duplicate,
        ),
        (
            "unknown_parent",
            now.stored_unknown_parent - before.stored_unknown_parent,
        ),
        (
            "token_mismatch",
            now.stored_token_mismatch - before.stored_token_mismatch,
        ),
        (
            "zero_block_size",
            now.stored_zero_block_size - before.stored_zero_block_size,
        ),
        (
            "over_cap",
            now.blocks_refused_over_cap - before.blocks_refused_over_cap,
        ),
        (
            "removed_unknown",
            now.removed_unknown - before.removed_unknown,
        ),
    ] {
        if count > 0 {
            metrics::counter!(names::KV_EVENTS_DROPPED_TOTAL, names::REASON => reason)
                .increment(count);
        }
    }
}

impl PrefixLookup for KvCacheView {
    fn cached_prefix_tokens(&self, urls: &[&str], tokens: &[u32]) -> Vec<Option<usize>> {
        let lives: Vec<Option<Arc<WorkerLive>>> = urls.iter().map(|url| self.live(url)).collect();
        let state = self.lock();
        // One overlap walk per distinct block size among the workers asked about.
        let mut overlaps: HashMap<usize, HashMap<WorkerId, usize>> = HashMap::new();
        lives
            .iter()
            .map(|live| {
                let live = live.as_ref()?;
                if self.state_of(live, &state.index) != CacheState::Known {
                    return None;
                }
                let block_size = live.block_size.load(Ordering::Relaxed);
                if block_size == 0 {
                    return Some(0);
                }
                let overlap = overlaps
                    .entry(block_size)
                    .or_insert_with(|| state.index.overlap(&prompt_keys(tokens, block_size)));
                Some(overlap.get(&live.id).copied().unwrap_or(0) * block_size)
            })
            .collect()
    }
}
