//! Warnings that would otherwise repeat once per request (every request falling back
//! while a prefill pool is down, say): logged at most once per interval, each with the
//! number of occurrences held back since the last one.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One warning's rate limit.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    state: Mutex<ThrottleState>,
}

#[derive(Debug)]
struct ThrottleState {
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new(ThrottleState {
                last: None,
                held_back: 0,
            }),
        }
    }

    /// `Some(occurrences held back since the last log)` when this occurrence should
    /// be logged, else `None` (and it is counted as held back).
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let due = state
            .last
            .is_none_or(|last| now.duration_since(last) >= self.every);
        if !due {
            state.held_back += 1;
            return None;
        }
        state.last = Some(now);
        Some(std::mem::take(&mut state.held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_once_per_interval_and_counts_the_rest() {
        let throttle = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(throttle.admit(t0), Some(0));
        assert_eq!(throttle.admit(t0 + Duration::from_secs(1)), None);
        assert_eq!(throttle.admit(t0 + Duration::from_secs(9)), None);
        assert_eq!(throttle.admit(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(throttle.admit(t0 + Duration::from_secs(11)), None);
    }
}
