//! `power_of_two`: two distinct random candidates, the less loaded of them.
//!
//! What this guarantees: with two candidates it always picks the less loaded; with
//! more, it never picks a candidate that is strictly busier than every other one,
//! since any pair containing it holds a less loaded one. It does not always find the
//! minimum; that is the point (less herding than `least_loaded`).

use super::least_loaded::load_key;
use super::{Candidate, Policy, RequestInfo};

#[derive(Debug, Default)]
pub struct PowerOfTwo;

impl PowerOfTwo {
    pub fn new() -> Self {
        Self
    }
}

/// Two distinct indices below `len` (which must be at least 2), uniformly at random.
fn two_distinct(len: usize) -> (usize, usize) {
    let first = rand::random_range(0..len);
    let second = rand::random_range(0..len - 1);
    // Skip over `first` so that every other index is equally likely.
    let second = if second >= first { second + 1 } else { second };
    (first, second)
}

impl Policy for PowerOfTwo {
    fn name(&self) -> &'static str {
        "power_of_two"
    }

    fn select(&self, candidates: &[Candidate<'_>], _request: &RequestInfo<'_>) -> Option<usize> {
        match candidates.len() {
            0 => None,
            1 => Some(0),
            len => {
                let (first, second) = two_distinct(len);
                if load_key(&candidates[second]) < load_key(&candidates[first]) {
                    Some(second)
                } else {
                    Some(first)
                }
            }
        }
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
    fn empty_gives_none_and_one_gives_it() {
        let policy = PowerOfTwo::new();
        assert_eq!(policy.select(&[], &RequestInfo::default()), None);
        assert_eq!(
            policy.select(&loaded(&[(9, 9)]), &RequestInfo::default()),
            Some(0)
        );
    }

    #[test]
    fn with_two_always_picks_the_less_loaded() {
        let policy = PowerOfTwo::new();
        let by_requests = loaded(&[(2, 0), (1, 0)]);
        let by_tokens = loaded(&[(1, 50), (1, 70)]);
        for _ in 0..200 {
            assert_eq!(
                policy.select(&by_requests, &RequestInfo::default()),
                Some(1)
            );
            assert_eq!(policy.select(&by_tokens, &RequestInfo::default()), Some(0));
        }
    }

    #[test]
    fn never_picks_a_strict_maximum() {
        let policy = PowerOfTwo::new();
        let candidates = loaded(&[(5, 0), (1, 0), (9, 0), (3, 0)]);
        let mut hits = [0usize; 4];
        for _ in 0..2000 {
            let index = policy
                .select(&candidates, &RequestInfo::default())
                .expect("non-empty");
            hits[index] += 1;
        }
        assert_eq!(hits[2], 0, "hits: {hits:?}");
        // The minimum wins whenever it is drawn (half the pairs), so it dominates.
        assert!(hits[1] > hits[0] && hits[1] > hits[3], "hits: {hits:?}");
    }

    #[test]
    fn two_distinct_covers_all_pairs() {
        let mut seen = [[false; 3]; 3];
        for _ in 0..1000 {
            let (a, b) = two_distinct(3);
            assert_ne!(a, b);
            seen[a][b] = true;
        }
        let pairs = seen.iter().flatten().filter(|&&s| s).count();
        assert_eq!(pairs, 6);
    }
}
