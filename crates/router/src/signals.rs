//! What the online planner reads, as the router sees it happen: each successful
//! streamed answer's time to first token (recorded when the first token is relayed)
//! and its time per output token (the mean gap between its SSE events, recorded for
//! every [`TPOT_SEGMENT`] tokens and for the rest at the end, so a long answer is
//! judged while it streams, not only once it has finished). Kept for a bounded recent
//! past; the planner takes a window of it. Also the streamed requests still waiting
//! for their first token, each held by a [`Waiting`] guard from the dispatcher until the
//! token is relayed or the request ends: the planner reads how long they have waited.
//!
//! Only streamed answers count: a whole answer's first byte is its last, so its time
//! to first token is unknown to the router.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
    /// Streamed requests not yet given a first token: when each arrived. As many as
    /// there are requests in flight (each guard removes its own).
    waiting: Mutex<HashMap<u64, Instant>>,
    next_waiting: AtomicU64,
}

/// The samples of a window, each in seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub ttft: Vec<f64>,
    pub tpot: Vec<f64>,
    /// How long each request still waiting for its first token has waited, now.
    pub waiting: Vec<f64>,
}

/// A streamed request waiting for its first token, counted in [`Window::waiting`]
/// until [`Waiting::answered`] or until its last clone is dropped (the request failed,
/// or its client left).
#[derive(Debug, Clone)]
pub struct Waiting(Arc<WaitingEntry>);

#[derive(Debug)]
struct WaitingEntry {
    signals: Arc<Signals>,
    id: u64,
}

impl Waiting {
    /// Its first token was relayed: it no longer waits.
    pub fn answered(&self) {
        self.0.signals.stop_waiting(self.0.id);
    }
}

impl Drop for WaitingEntry {
    fn drop(&mut self) {
        self.signals.stop_waiting(self.id);
    }
}

impl Signals {
    pub fn record_ttft(&self, secs: f64) {
        push(&self.ttft, secs);
    }

    pub fn record_tpot(&self, secs: f64) {
        push(&self.tpot, secs);
    }

    /// Counts a streamed request that arrived at `arrival` as waiting for its first
    /// token while the guard lives.
    pub fn waiting_since(self: &Arc<Self>, arrival: Instant) -> Waiting {
        let id = self.next_waiting.fetch_add(1, Ordering::Relaxed);
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, arrival);
        Waiting(Arc::new(WaitingEntry {
            signals: Arc::clone(self),
            id,
        }))
    }

    fn stop_waiting(&self, id: u64) {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// The samples recorded after `since`, newest first, and the waits of the requests
    /// waiting now.
    pub fn window(&self, since: Instant) -> Window {
        let now = Instant::now();
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        Window {
            ttft: after(&self.ttft, since),
            tpot: after(&self.tpot, since),
            waiting: waiting
                .values()
                .map(|arrival| now.saturating_duration_since(*arrival).as_secs_f64())
                .collect(),
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
                tpot: vec![0.3],
                waiting: Vec::new(),
            }
        );
    }

    #[test]
    fn a_request_waits_until_answered_or_dropped() {
        let signals = Arc::new(Signals::default());
        let long_ago = Instant::now() - std::time::Duration::from_secs(5);
        let first = signals.waiting_since(long_ago);
        let second = signals.waiting_since(Instant::now());
        let relayed = second.clone();
        let waits = signals.window(Instant::now()).waiting;
        assert_eq!(waits.len(), 2);
        assert!(waits.iter().any(|&w| w >= 5.0), "{waits:?}");
        relayed.answered();
        assert_eq!(signals.window(Instant::now()).waiting.len(), 1);
        // The answered one's other clone going leaves the count alone.
        drop(second);
        assert_eq!(signals.window(Instant::now()).waiting.len(), 1);
        drop(first);
        assert!(signals.window(Instant::now()).waiting.is_empty());
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
