//! `random`: a uniformly random candidate, blind to load.

use super::{Candidate, Policy, RequestInfo};

#[derive(Debug, Default)]
pub struct Random;

impl Random {
    pub fn new() -> Self {
        Self
    }
}

impl Policy for Random {
    fn name(&self) -> &'static str {
        "random"
    }

    fn select(&self, candidates: &[Candidate<'_>], _request: &RequestInfo<'_>) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        Some(rand::random_range(0..candidates.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_gives_none() {
        assert_eq!(Random::new().select(&[], &RequestInfo::default()), None);
    }

    #[test]
    fn covers_every_candidate_over_many_draws() {
        let candidates: Vec<_> = ["a", "b", "c", "d"]
            .into_iter()
            .map(|url| Candidate {
                url,
                in_flight_requests: 0,
                in_flight_tokens: 0,
            })
            .collect();
        let mut hits = [0usize; 4];
        for _ in 0..4000 {
            let index = Random::new()
                .select(&candidates, &RequestInfo::default())
                .expect("non-empty");
            hits[index] += 1;
        }
        // Each expects 1000; 500 is over 18 standard deviations away.
        assert!(hits.iter().all(|&n| n > 500), "hits: {hits:?}");
    }
}
