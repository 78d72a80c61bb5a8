//! What the online planner reads, as the router sees it happen: each successful
//! streamed answer's time to first token (recorded when the first token is relayed)
//! and its time per output token (the mean gap between its SSE events, recorded for
//! every [`TPOT_SEGMENT`] tokens and for the rest at the end, so a long answer is
//! judged while it streams, not only once it has finished). Kept for a bounded recent
//! past; the planner takes a window of it.
//!
//! Only streamed answers count: a whole answer's first byte is its last, so its time
//! to first token is unknown to the router.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

/// Samples kept at most, of each kind; the oldest go first.
const CAPACITY: usize = 16_384;

/// Output tokens per TPOT sample.
pub const TPOT_SEGMENT: u32 = 16;

/// The recent samples, shared by every router thread.
#[derive(Debug, Default)]
pub struct Signals {
    ttft: Mutex<VecDeque<(Instant, f64)>>,
    tpot: Mutex<VecDeque<(Instant, f64)>>,
}

/// The samples of a window, each in seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub ttft: Vec<f64>,
    pub tpot: Vec<f64>,
}

impl Signals {
    pub fn record_ttft(&self, secs: f64) {
        push(&self.ttft, secs);
    }

    pub fn record_tpot(&self, secs: f64) {
        push(&self.tpot, secs);
    }

    /// The samples recorded after `since`, newest first.
    pub fn window(&self, since: Instant) -> Window {
        Window {
            ttft: after(&self.ttft, since),
            tpot: after(&self.tpot, since),
        }
    }
}

fn push(samples: &Mutex<VecDeque<(Instant, f64)>>, secs: f64) {
    let mut samples = samples.lock().unwrap_or_else(|e| e.into_inner());
    if samples.len() == CAPACITY {
        samples.pop_front();
    }
    samples.push_back((Instant::now(), secs));
}

fn after(samples: &Mutex<VecDeque<(Instant, f64)>>, since: Instant) -> Vec<f64> {
    let samples = samples.lock().unwrap_or_else(|e| e.into_inner());
    samples
        .iter()
        .rev()
        .take_while(|(at, _)| *at > since)
        .map(|(_, secs)| *secs)
        .collect()
}

/// Times the SSE events of one relayed stream, a segment of tokens at a time.
#[derive(Debug, Default)]
pub(crate) struct EventClock {
    /// When the segment's first event came.
    segment_start: Option<Instant>,
    /// Events since then.
    segment_events: u32,
}

impl EventClock {
    /// Notes the `data:` events of one relayed chunk (`[DONE]` is not a token); the
    /// mean gap of a segment once it has [`TPOT_SEGMENT`] events.
    pub fn chunk(&mut self, chunk: &[u8]) -> Option<f64> {
        let events = count(chunk, b"data:").saturating_sub(count(chunk, b"[DONE]"));
        if events == 0 {
            return None;
        }
        let now = Instant::now();
        let Some(start) = self.segment_start else {
            self.segment_start = Some(now);
            self.segment_events = events as u32 - 1;
            return None;
        };
        self.segment_events += events as u32;
        if self.segment_events < TPOT_SEGMENT {
            return None;
        }
        let mean = now.duration_since(start).as_secs_f64() / f64::from(self.segment_events);
        self.segment_start = Some(now);
        self.segment_events = 0;
        Some(mean)
    }

    /// The mean gap of the unfinished segment, when the stream has ended.
    pub fn rest(&self, end: Instant) -> Option<f64> {
        let start = self.segment_start?;
        (self.segment_events > 0)
            .then(|| end.duration_since(start).as_secs_f64() / f64::from(self.segment_events))
    }
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_holds_what_was_recorded_after_its_start() {
        let signals = Signals::default();
        signals.record_ttft(1.0);
        let start = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        signals.record_ttft(2.0);
        signals.record_tpot(0.3);
        signals.record_ttft(3.0);
        assert_eq!(
            signals.window(start),
            Window {
                ttft: vec![3.0, 2.0],
                tpot: vec![0.3]
            }
        );
    }

    #[test]
    fn a_segment_of_events_gives_one_sample_and_the_rest_another() {
        let mut clock = EventClock::default();
        assert_eq!(clock.chunk(b"data: {\"a\":0}\n\n"), None);
        assert_eq!(clock.chunk(b": keep-alive\n\n"), None);
        for _ in 0..TPOT_SEGMENT - 1 {
            assert_eq!(clock.chunk(b"data: {}\n\n"), None);
        }
        assert!(clock.chunk(b"data: {}\n\n").is_some());
        assert_eq!(clock.rest(Instant::now()), None);
        clock.chunk(b"data: {}\n\ndata: {}\n\ndata: [DONE]\n\n");
        assert_eq!(clock.segment_events, 2);
        assert!(clock.rest(Instant::now()).is_some());
    }
}
