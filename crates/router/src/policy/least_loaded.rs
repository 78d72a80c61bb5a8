//! `least_loaded`: fewest in-flight requests, then fewest in-flight tokens; equal
//! workers take turns. Also owns the load ordering the other load-aware policies share.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidate, Policy, RequestInfo};

/// How busy a candidate is, lower is less busy: requests first, then tokens.
pub(super) fn load_key(candidate: &Candidate<'_>) -> (usize, usize) {
    (candidate.in_flight_requests, candidate.in_flight_tokens)
}

/// The index of the smallest `key`, scanning from `start` (modulo the length) and
/// wrapping around, so that among equal keys the first one at or after `start` wins.
pub(super) fn min_index_from<K: Ord>(
    candidates: &[Candidate<'_>],
    start: usize,
    key: impl Fn(&Candidate<'_>) -> K,
) -> Option<usize> {
    let len = candidates.len();
    if len == 0 {
        return None;
    }
    (0..len)
        .map(|step| (start % len + step) % len)
        .min_by_key(|&index| key(&candidates[index]))
}

/// The least-loaded candidate, ties going to the first one at or after `start`.
pub(super) fn least_loaded_from(candidates: &[Candidate<'_>], start: usize) -> Option<usize> {
    min_index_from(candidates, start, load_key)
}

#[derive(Debug, Default)]
pub struct LeastLoaded {
    /// Where the tie-breaking scan starts; advances on every call.
    rotation: AtomicUsize,
}

impl LeastLoaded {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Policy for LeastLoaded {
    fn name(&self) -> &'static str {
        "least_loaded"
    }

    fn select(&self, candidates: &[Candidate<'_>], _request: &RequestInfo<'_>) -> Option<usize> {
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        least_loaded_from(candidates, start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(loads: &[(usize, usize)]) -> Vec<Candidate<'static>> {
        loads
            .iter()
            .map(|&(in_flight_requests, in_flight_tokens)| Candidate {
                url: "http://worker",
                in_flight_requests,
                in_flight_tokens,
            })
            .collect()
    }

    #[test]
    fn empty_gives_none() {
        assert_eq!(
            LeastLoaded::new().select(&[], &RequestInfo::default()),
            None
        );
    }

    #[test]
    fn picks_fewest_requests_then_fewest_tokens() {
        let policy = LeastLoaded::new();
        let by_requests = loaded(&[(3, 0), (1, 900), (2, 0)]);
        let by_tokens = loaded(&[(1, 500), (1, 100), (1, 300)]);
        for _ in 0..5 {
            assert_eq!(
                policy.select(&by_requests, &RequestInfo::default()),
                Some(1)
            );
            assert_eq!(policy.select(&by_tokens, &RequestInfo::default()), Some(1));
        }
    }

    #[test]
    fn spreads_ties_over_the_equal_workers() {
        let policy = LeastLoaded::new();
        let candidates = loaded(&[(4, 10), (1, 10), (1, 10), (1, 10)]);
        let mut hits = [0usize; 4];
        for _ in 0..40 {
            let index = policy
                .select(&candidates, &RequestInfo::default())
                .expect("non-empty");
            hits[index] += 1;
        }
        assert_eq!(hits[0], 0, "the busier worker is never picked");
        assert!(hits[1..].iter().all(|&n| n > 0), "hits: {hits:?}");
    }
}
