//! `prefix`: cache-aware selection in the spirit of SGLang's `cache_aware`. Requests
//! that share a prompt prefix go to the worker that recently saw it (its KV cache
//! likely still holds it), unless load is so imbalanced that the least-loaded worker
//! is the better bet.
//!
//! The cache model is an approximate prefix tree over fixed-size chunks of the text
//! (`CHUNK_CHARS` characters, the last one possibly shorter). It is stored flattened:
//! each node is keyed by a hash of the whole prefix up to and including its chunk, so
//! a lookup walks the request chunk by chunk and stops at the first unknown prefix.
//! Each node records which workers hold it and when they last did (an LRU tick).
//! Matches therefore count in whole chunks, and a hash collision can (very rarely)
//! claim a match that is not there; both are fine for a routing hint.
//!
//! Memory is bounded by `max_tree_chars`: the sum, over every (node, worker) entry, of
//! the node's chunk length, i.e. the characters each worker's own tree would hold.
//! Past it, least-recently-used entries are evicted. Inserting a text touches its whole
//! path with one tick and, within a tick, deeper entries go first, so eviction always
//! takes leaves and never leaves a prefix hole behind a kept suffix.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::hash::{DefaultHasher, Hasher};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::least_loaded::{least_loaded_from, load_key, min_index_from};
use super::{Candidate, Policy, RequestInfo};

/// Characters per chunk of the prefix tree: the granularity of a match.
const CHUNK_CHARS: usize = 16;

/// Tuning for the `prefix` policy (a TOML table; every field is optional, unknown
/// fields are errors).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefixConfig {
    /// Follow the cache when matched chars / request chars is at least this.
    pub cache_threshold: f64,
    /// Load is imbalanced when max − min in-flight requests exceeds this ...
    pub balance_abs_threshold: usize,
    /// ... and max exceeds this times min.
    pub balance_rel_threshold: f64,
    /// Cap on the characters stored across all workers' entries.
    pub max_tree_chars: usize,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        Self {
            cache_threshold: 0.5,
            balance_abs_threshold: 32,
            balance_rel_threshold: 1.5,
            max_tree_chars: 1 << 22,
        }
    }
}

pub struct PrefixPolicy {
    config: PrefixConfig,
    tree: Mutex<ChunkTree>,
}

impl fmt::Debug for PrefixPolicy {
    // The tree can be large; show its size, not its contents.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrefixPolicy")
            .field("config", &self.config)
            .field("stored_chars", &self.stored_chars())
            .finish()
    }
}

impl PrefixPolicy {
    pub fn new(config: PrefixConfig) -> Self {
        Self {
            config,
            tree: Mutex::new(ChunkTree::default()),
        }
    }

    /// Characters stored across all workers (at most `max_tree_chars`).
    pub fn stored_chars(&self) -> usize {
        self.lock_tree().total_chars
    }

    // A panic elsewhere while holding the lock leaves a consistent-enough hint cache;
    // keep routing rather than propagate the poison.
    fn lock_tree(&self) -> MutexGuard<'_, ChunkTree> {
        self.tree.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn choose(&self, tree: &ChunkTree, candidates: &[Candidate<'_>], text: &str) -> Option<usize> {
        let rotation = tree.clock as usize;
        if is_imbalanced(candidates, &self.config) {
            return least_loaded_from(candidates, rotation);
        }
        if let Some(index) = self.cache_hit(tree, candidates, text) {
            return Some(index);
        }
        // No worker holds enough of it: give it to the one holding the least text
        // (most room for a new prefix), then the least loaded.
        min_index_from(candidates, rotation, |candidate| {
            let chars = tree
                .worker_id(candidate.url)
                .map_or(0, |id| tree.chars_of(id));
            (chars, load_key(candidate))
        })
    }

    fn cache_hit(
        &self,
        tree: &ChunkTree,
        candidates: &[Candidate<'_>],
        text: &str,
    ) -> Option<usize> {
        let (index, matched) = tree.longest_match(candidates, text)?;
        let text_chars = text.chars().count();
        let ratio = matched as f64 / text_chars as f64;
        (matched > 0 && ratio >= self.config.cache_threshold).then_some(index)
    }
}

impl Policy for PrefixPolicy {
    fn name(&self) -> &'static str {
        "prefix"
    }

    fn select(&self, candidates: &[Candidate<'_>], request: &RequestInfo<'_>) -> Option<usize> {
        let mut tree = self.lock_tree();
        let chosen = self.choose(&tree, candidates, request.text)?;
        tree.insert(
            candidates[chosen].url,
            request.text,
            self.config.max_tree_chars,
        );
        Some(chosen)
    }

    fn forget(&self, url: &str) {
        self.lock_tree().forget(url);
    }
}

/// True when max − min in-flight requests exceeds the absolute threshold and max
/// exceeds the relative threshold times min.
/// The same approximate prefix model, on its own: how much of a text a given worker
/// probably holds in its KV cache (for conditional disaggregation, which asks about the
/// one decode worker already chosen).
pub struct PrefixCache {
    max_chars: usize,
    tree: Mutex<ChunkTree>,
}

impl fmt::Debug for PrefixCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrefixCache")
            .field("max_chars", &self.max_chars)
            .finish_non_exhaustive()
    }
}

impl PrefixCache {
    pub fn new(max_chars: usize) -> Self {
        Self {
            max_chars,
            tree: Mutex::new(ChunkTree::default()),
        }
    }

    fn lock_tree(&self) -> MutexGuard<'_, ChunkTree> {
        self.tree.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Characters of `text`'s prefix that `url` was recorded with, then records `text`
    /// under `url`.
    pub fn match_and_record(&self, url: &str, text: &str) -> usize {
        let mut tree = self.lock_tree();
        let candidate = [Candidate {
            url,
            in_flight_requests: 0,
            in_flight_tokens: 0,
        }];
        let matched = tree
            .longest_match(&candidate, text)
            .map_or(0, |(_, chars)| chars);
        tree.insert(url, text, self.max_chars);
        matched
    }

    pub fn forget(&self, url: &str) {
        self.lock_tree().forget(url);
    }
}

fn is_imbalanced(candidates: &[Candidate<'_>], config: &PrefixConfig) -> bool {
    let loads = candidates.iter().map(|c| c.in_flight_requests);
    let (Some(max), Some(min)) = (loads.clone().max(), loads.min()) else {
        return false;
    };
    max - min > config.balance_abs_threshold
        && max as f64 > config.balance_rel_threshold * min as f64
}

type WorkerId = u64;
type Tick = u64;
type PrefixHash = u64;

/// One chunk of a text, identified by the hash of the text up to its end.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    prefix_hash: PrefixHash,
    chars: usize,
}

/// The text's chunks in order, each hashed together with everything before it.
fn prefix_chunks(text: &str) -> impl Iterator<Item = Chunk> + '_ {
    let mut rest = text;
    let mut prefix_hash: PrefixHash = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest
            .char_indices()
            .nth(CHUNK_CHARS)
            .map_or(rest.len(), |(byte, _)| byte);
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        // `DefaultHasher::new()` has fixed keys, so hashes agree across calls.
        let mut hasher = DefaultHasher::new();
        hasher.write_u64(prefix_hash);
        hasher.write(piece.as_bytes());
        prefix_hash = hasher.finish();
        Some(Chunk {
            prefix_hash,
            chars: piece.chars().count(),
        })
    })
}

/// A prefix of some recorded text: its last chunk's length, its depth in chunks, and
/// the workers holding it with the tick each last touched it.
#[derive(Debug)]
struct Node {
    chars: usize,
    depth: usize,
    holders: HashMap<WorkerId, Tick>,
}

/// One (node, worker) entry in eviction order: oldest tick first, then deepest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct LruKey {
    tick: Tick,
    depth: Reverse<usize>,
    prefix_hash: PrefixHash,
    worker: WorkerId,
}

#[derive(Debug, Default)]
struct ChunkTree {
    worker_ids: HashMap<String, WorkerId>,
    next_worker_id: WorkerId,
    nodes: HashMap<PrefixHash, Node>,
    lru: BTreeSet<LruKey>,
    chars_by_worker: HashMap<WorkerId, usize>,
    total_chars: usize,
    /// Advances on every insert; orders entries for eviction.
    clock: Tick,
}

impl ChunkTree {
    fn worker_id(&self, url: &str) -> Option<WorkerId> {
        self.worker_ids.get(url).copied()
    }

    fn chars_of(&self, worker: WorkerId) -> usize {
        self.chars_by_worker.get(&worker).copied().unwrap_or(0)
    }

    fn intern(&mut self, url: &str) -> WorkerId {
        if let Some(id) = self.worker_id(url) {
            return id;
        }
        let id = self.next_worker_id;
        self.next_worker_id += 1;
        self.worker_ids.insert(url.to_owned(), id);
        id
    }

    /// The candidate sharing the longest recorded prefix with `text` and that length
    /// in chars; ties go to the less loaded. `None` when nobody matches a chunk.
    fn longest_match(&self, candidates: &[Candidate<'_>], text: &str) -> Option<(usize, usize)> {
        let ids: Vec<Option<WorkerId>> = candidates.iter().map(|c| self.worker_id(c.url)).collect();
        let mut matched = vec![0usize; candidates.len()];
        let mut walked = 0;
        for chunk in prefix_chunks(text) {
            let Some(node) = self.nodes.get(&chunk.prefix_hash) else {
                break;
            };
            let before = walked;
            walked += chunk.chars;
            let mut extended = false;
            for (index, id) in ids.iter().enumerate() {
                let contiguous = matched[index] == before;
                if contiguous && id.is_some_and(|id| node.holders.contains_key(&id)) {
                    matched[index] = walked;
                    extended = true;
                }
            }
            if !extended {
                break;
            }
        }
        let best = (0..candidates.len())
            .filter(|&index| matched[index] > 0)
            .min_by_key(|&index| (Reverse(matched[index]), load_key(&candidates[index])))?;
        Some((best, matched[best]))
    }

    /// Records `text` as held by `url`, then evicts down to `max_chars`.
    fn insert(&mut self, url: &str, text: &str, max_chars: usize) {
        let worker = self.intern(url);
        self.clock += 1;
        let tick = self.clock;
        let mut kept = 0;
        for (depth, chunk) in prefix_chunks(text).enumerate() {
            // A text longer than the whole cap would only evict its own head.
            if kept + chunk.chars > max_chars {
                break;
            }
            kept += chunk.chars;
            self.touch(worker, chunk, depth + 1, tick);
        }
        self.evict_to(max_chars);
    }

    fn touch(&mut self, worker: WorkerId, chunk: Chunk, depth: usize, tick: Tick) {
        let node = self.nodes.entry(chunk.prefix_hash).or_insert_with(|| Node {
            chars: chunk.chars,
            depth,
            holders: HashMap::new(),
        });
        let node_depth = node.depth;
        let key = |tick| LruKey {
            tick,
            depth: Reverse(node_depth),
            prefix_hash: chunk.prefix_hash,
            worker,
        };
        match node.holders.insert(worker, tick) {
            Some(old_tick) => {
                self.lru.remove(&key(old_tick));
            }
            None => {
                self.total_chars += node.chars;
                *self.chars_by_worker.entry(worker).or_default() += node.chars;
            }
        }
        self.lru.insert(key(tick));
    }

    fn evict_to(&mut self, max_chars: usize) {
        while self.total_chars > max_chars {
            let Some(oldest) = self.lru.pop_first() else {
                break;
            };
            self.remove_entry(oldest.prefix_hash, oldest.worker);
        }
    }

    fn remove_entry(&mut self, prefix_hash: PrefixHash, worker: WorkerId) {
        let Some(node) = self.nodes.get_mut(&prefix_hash) else {
            return;
        };
        if node.holders.remove(&worker).is_none() {
            return;
        }
        self.total_chars -= node.chars;
        if let Some(chars) = self.chars_by_worker.get_mut(&worker) {
            *chars -= node.chars;
            if *chars == 0 {
                self.chars_by_worker.remove(&worker);
            }
        }
        if node.holders.is_empty() {
            self.nodes.remove(&prefix_hash);
        }
    }

    fn forget(&mut self, url: &str) {
        let Some(worker) = self.worker_ids.remove(url) else {
            return;
        };
        self.lru.retain(|key| key.worker != worker);
        let mut removed = 0;
        self.nodes.retain(|_, node| {
            if node.holders.remove(&worker).is_some() {
                removed += node.chars;
            }
            !node.holders.is_empty()
        });
        self.total_chars -= removed;
        self.chars_by_worker.remove(&worker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URLS: [&str; 3] = ["http://a", "http://b", "http://c"];

    fn idle(urls: &[&'static str]) -> Vec<Candidate<'static>> {
        urls.iter()
            .map(|url| Candidate {
                url,
                in_flight_requests: 0,
                in_flight_tokens: 0,
            })
            .collect()
    }

    fn with_requests(urls: &[&'static str], requests: &[usize]) -> Vec<Candidate<'static>> {
        let mut candidates = idle(urls);
        for (candidate, &n) in candidates.iter_mut().zip(requests) {
            candidate.in_flight_requests = n;
        }
        candidates
    }

    fn worker_chars(policy: &PrefixPolicy, url: &str) -> usize {
        let tree = policy.lock_tree();
        tree.worker_id(url).map_or(0, |id| tree.chars_of(id))
    }

    fn pick(policy: &PrefixPolicy, candidates: &[Candidate<'_>], text: &str) -> usize {
        policy
            .select(candidates, &RequestInfo { text, tokens: None })
            .expect("non-empty")
    }

    /// A distinct, deterministic text of `chars` characters.
    fn text(seed: usize, chars: usize) -> String {
        format!("doc {seed}: ")
            .chars()
            .chain((0..).map(|i| char::from(b'a' + ((seed * 7 + i * 13) % 26) as u8)))
            .take(chars)
            .collect()
    }

    #[test]
    fn the_cache_model_answers_for_one_worker() {
        let cache = PrefixCache::new(1 << 20);
        let long = text(7, 200);
        assert_eq!(cache.match_and_record("http://d1", &long), 0);
        assert_eq!(cache.match_and_record("http://d1", &long), 200);
        assert_eq!(
            cache.match_and_record("http://d2", &long),
            0,
            "another worker"
        );
        let extended = format!("{long}{}", text(8, 100));
        assert!(cache.match_and_record("http://d1", &extended) >= 192);
        cache.forget("http://d1");
        assert_eq!(cache.match_and_record("http://d1", &long), 0);
    }

    #[test]
    fn empty_gives_none() {
        let policy = PrefixPolicy::new(PrefixConfig::default());
        assert_eq!(
            policy.select(
                &[],
                &RequestInfo {
                    text: "hi",
                    tokens: None
                }
            ),
            None
        );
        assert_eq!(policy.stored_chars(), 0);
    }

    #[test]
    fn repeated_text_sticks_to_one_worker() {
        let policy = PrefixPolicy::new(PrefixConfig::default());
        let candidates = idle(&URLS);
        for (seed, chars) in [(1, 200), (2, 5), (3, 37)] {
            let prompt = text(seed, chars);
            let first = pick(&policy, &candidates, &prompt);
            for _ in 0..10 {
                assert_eq!(pick(&policy, &candidates, &prompt), first, "{prompt}");
            }
        }
    }

    #[test]
    fn shared_prefix_routes_to_the_worker_that_saw_it() {
        let policy = PrefixPolicy::new(PrefixConfig::default());
        let candidates = idle(&URLS);
        let system = text(1, 400);
        let first = pick(&policy, &candidates, &format!("{system} question one"));
        // Other traffic grows the other workers' trees.
        for seed in 2..8 {
            pick(&policy, &candidates, &text(seed, 300));
        }
        let follow_up = format!("{system} a different, longer question two");
        assert_eq!(pick(&policy, &candidates, &follow_up), first);
    }

    #[test]
    fn new_text_goes_to_the_smallest_tree() {
        let policy = PrefixPolicy::new(PrefixConfig::default());
        let candidates = idle(&URLS);
        let picks: Vec<_> = (0..3)
            .map(|seed| pick(&policy, &candidates, &text(seed, 100)))
            .collect();
        let mut sorted = picks.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            [0, 1, 2],
            "each new text takes an empty worker: {picks:?}"
        );
    }

    #[test]
    fn imbalance_falls_back_to_least_loaded() {
        let policy = PrefixPolicy::new(PrefixConfig::default());
        let prompt = text(1, 300);
        let owner = pick(&policy, &idle(&URLS), &prompt);

        // Within the thresholds, affinity wins over load.
        let mut mildly_busy_owner = [0; 3];
        mildly_busy_owner[owner] = 30;
        let candidates = with_requests(&URLS, &mildly_busy_owner);
        assert_eq!(pick(&policy, &candidates, &prompt), owner);

        let mut busy_owner = [0; 3];
        busy_owner[owner] = 100;
        busy_owner[(owner + 2) % 3] = 2;
        let candidates = with_requests(&URLS, &busy_owner);
        assert_eq!(pick(&policy, &candidates, &prompt), (owner + 1) % 3);
    }

    #[test]
    fn imbalance_needs_both_thresholds() {
        let config = PrefixConfig::default();
        let urls = ["a", "b"];
        assert!(is_imbalanced(&with_requests(&urls, &[40, 0]), &config));
        assert!(
            !is_imbalanced(&with_requests(&urls, &[32, 0]), &config),
            "abs"
        );
        assert!(
            !is_imbalanced(&with_requests(&urls, &[140, 100]), &config),
            "rel"
        );
        assert!(is_imbalanced(&with_requests(&urls, &[160, 100]), &config));
    }

    #[test]
    fn forget_removes_affinity() {
        let policy = PrefixPolicy::new(PrefixConfig::default());
        let urls = ["http://a", "http://b"];
        let prompt = text(1, 300);
        // Only `a` is offered, so it records the prompt.
        assert_eq!(pick(&policy, &idle(&urls[..1]), &prompt), 0);
        let a_busier = with_requests(&urls, &[3, 0]);
        assert_eq!(
            pick(&policy, &a_busier, &prompt),
            0,
            "affinity beats mild load"
        );

        policy.forget("http://a");
        assert_eq!(worker_chars(&policy, "http://a"), 0);
        assert_eq!(policy.stored_chars(), 0);
        assert_eq!(
            pick(&policy, &a_busier, &prompt),
            1,
            "no affinity: less loaded"
        );
        policy.forget("http://unknown");
    }

    #[test]
    fn memory_cap_evicts_least_recently_used() {
        let max_tree_chars = 10_000;
        let policy = PrefixPolicy::new(PrefixConfig {
            max_tree_chars,
            ..PrefixConfig::default()
        });
        let candidates = idle(&URLS);
        let mut last = 0;
        for seed in 0..500 {
            last = pick(&policy, &candidates, &text(seed, 1000));
            assert!(policy.stored_chars() <= max_tree_chars);
        }
        assert!(policy.stored_chars() > max_tree_chars / 2);
        let per_worker: usize = URLS.iter().map(|url| worker_chars(&policy, url)).sum();
        assert_eq!(per_worker, policy.stored_chars());

        let tree = policy.lock_tree();
        let recent = tree.longest_match(&candidates, &text(499, 1000));
        assert_eq!(recent, Some((last, 1000)), "the newest text survives");
        assert_eq!(tree.longest_match(&candidates, &text(0, 1000)), None);
        assert_eq!(
            tree.lru.len(),
            tree.nodes.values().map(|n| n.holders.len()).sum::<usize>()
        );
    }

    #[test]
    fn eviction_trims_leaves_and_keeps_prefixes() {
        let mut tree = ChunkTree::default();
        let candidates = idle(&URLS[..1]);
        tree.insert(URLS[0], &text(1, 160), 100);
        assert_eq!(tree.total_chars, 96, "whole chunks up to the cap");
        assert_eq!(
            tree.longest_match(&candidates, &text(1, 160)),
            Some((0, 96))
        );
        tree.insert(URLS[0], &text(2, 64), 100);
        // The older text lost its deepest chunks, not its head.
        assert_eq!(tree.total_chars, 96);
        assert_eq!(
            tree.longest_match(&candidates, &text(1, 160)),
            Some((0, 32))
        );
        assert_eq!(tree.longest_match(&candidates, &text(2, 64)), Some((0, 64)));
    }

    #[test]
    fn handles_multibyte_text_and_tiny_caps() {
        let policy = PrefixPolicy::new(PrefixConfig {
            max_tree_chars: 0,
            ..PrefixConfig::default()
        });
        let candidates = idle(&URLS);
        let prompt = "héllo wörld, ✓ 日本語のテキスト ".repeat(10);
        pick(&policy, &candidates, &prompt);
        pick(&policy, &candidates, "");
        assert_eq!(policy.stored_chars(), 0);

        let policy = PrefixPolicy::new(PrefixConfig::default());
        let first = pick(&policy, &candidates, &prompt);
        assert_eq!(pick(&policy, &candidates, &prompt), first);
        assert_eq!(policy.stored_chars(), prompt.chars().count());
    }
}
