//! `round_robin`: rotates over the candidates, blind to load.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidate, Policy, RequestInfo};

/// Takes the next candidate on each call. The counter is global, not per worker, so
/// when the candidate list changes size the rotation simply continues modulo the new
/// length: every index stays valid and no worker is favoured for long.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn select(&self, candidates: &[Candidate<'_>], _request: &RequestInfo<'_>) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        Some(turn % candidates.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle(urls: &[&'static str]) -> Vec<Candidate<'static>> {
        urls.iter()
            .map(|url| Candidate {
                url,
                in_flight_requests: 0,
                in_flight_tokens: 0,
            })
            .collect()
    }

    #[test]
    fn empty_gives_none() {
        assert_eq!(RoundRobin::new().select(&[], &RequestInfo::default()), None);
    }

    #[test]
    fn cycles_over_candidates() {
        let policy = RoundRobin::new();
        let candidates = idle(&["a", "b", "c"]);
        let picks: Vec<_> = (0..6)
            .map(|_| policy.select(&candidates, &RequestInfo::default()))
            .collect();
        assert_eq!(
            picks,
            [0, 1, 2, 0, 1, 2].map(Some).to_vec(),
            "rotation order"
        );
    }

    #[test]
    fn stays_in_range_when_the_list_shrinks_and_grows() {
        let policy = RoundRobin::new();
        let five = idle(&["a", "b", "c", "d", "e"]);
        let two = idle(&["a", "b"]);
        for _ in 0..3 {
            policy.select(&five, &RequestInfo::default());
        }
        let after_shrink: Vec<_> = (0..4)
            .filter_map(|_| policy.select(&two, &RequestInfo::default()))
            .collect();
        assert!(after_shrink.iter().all(|&i| i < 2));
        assert!(after_shrink.contains(&0) && after_shrink.contains(&1));
        let after_grow = policy.select(&five, &RequestInfo::default());
        assert!(after_grow.is_some_and(|i| i < 5));
    }
}
