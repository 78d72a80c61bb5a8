//! What the online planner reads: each finished streamed request's time to first
//! token and time per output token as the router saw them, kept for a bounded recent
//! past. The relayed body records into it; the planner takes the samples of a window.
//!
//! Only streamed answers count: a whole answer's first byte is its last, so its time
//! to first token is unknown to the router. Time per output token is the mean gap
//! between the answer's SSE events after the first (a worker sends one per token).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

/// Samples kept at most; the oldest go first.
const CAPACITY: usize = 16_384;

/// One finished streamed request.
#[derive(Debug, Clone, Copy)]
struct Sample {
    finished: Instant,
    ttft_secs: f64,
    tpot_secs: Option<f64>,
}

/// The recent finished requests, shared by every router thread.
#[derive(Debug, Default)]
pub struct Signals {
    samples: Mutex<VecDeque<Sample>>,
}

/// The samples of a window, each figure in seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub ttft: Vec<f64>,
    pub tpot: Vec<f64>,
}

impl Signals {
    pub fn record(&self, ttft_secs: f64, tpot_secs: Option<f64>) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == CAPACITY {
            samples.pop_front();
        }
        samples.push_back(Sample {
            finished: Instant::now(),
            ttft_secs,
            tpot_secs,
        });
    }

    /// The requests finished after `since`.
    pub fn window(&self, since: Instant) -> Window {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let recent = samples.iter().rev().take_while(|s| s.finished > since);
        let mut window = Window::default();
        for sample in recent {
            window.ttft.push(sample.ttft_secs);
            window.tpot.extend(sample.tpot_secs);
        }
        window
    }
}

/// Counts the SSE events of a relayed stream and when the first and last came.
#[derive(Debug, Default)]
pub(crate) struct EventClock {
    events: u32,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl EventClock {
    /// Notes the `data:` events of one relayed chunk (`[DONE]` is not a token).
    pub fn chunk(&mut self, chunk: &[u8]) {
        let events = count(chunk, b"data:").saturating_sub(count(chunk, b"[DONE]"));
        if events == 0 {
            return;
        }
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.events += events as u32;
    }

    /// Mean seconds between the events after the first, if there were two or more.
    pub fn per_event_secs(&self) -> Option<f64> {
        let (first, last) = (self.first?, self.last?);
        (self.events > 1)
            .then(|| last.duration_since(first).as_secs_f64() / f64::from(self.events - 1))
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
    fn a_window_holds_what_finished_after_its_start() {
        let signals = Signals::default();
        signals.record(1.0, Some(0.1));
        let start = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        signals.record(2.0, None);
        signals.record(3.0, Some(0.3));
        assert_eq!(
            signals.window(start),
            Window {
                ttft: vec![3.0, 2.0],
                tpot: vec![0.3]
            }
        );
    }

    #[test]
    fn events_are_counted_without_done() {
        let mut clock = EventClock::default();
        clock.chunk(b"data: {\"a\":1}\n\n");
        assert_eq!(clock.per_event_secs(), None);
        clock.chunk(b"data: {\"a\":2}\n\ndata: {\"a\":3}\n\ndata: [DONE]\n\n");
        assert_eq!(clock.events, 3);
        assert!(clock.per_event_secs().is_some());
        clock.chunk(b": keep-alive\n\n");
        assert_eq!(clock.events, 3);
    }
}
