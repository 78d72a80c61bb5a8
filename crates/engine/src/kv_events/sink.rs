//! The engine loop's end of the event stream: numbers each step's events and queues
//! them, without ever blocking, for the publisher task.

use std::time::{SystemTime, UNIX_EPOCH};

use tandem_protocol::kv_events::{KvEvent, KvEventBatch};
use tokio::sync::mpsc;

use crate::metrics as names;

/// One step's batch with its sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct NumberedBatch {
    pub seq: u64,
    pub batch: KvEventBatch,
}

/// Held by the engine loop: [`KvEventSink::send`] after each step that recorded events.
#[derive(Debug)]
pub struct KvEventSink {
    queue: mpsc::Sender<NumberedBatch>,
    next_seq: u64,
}

/// The publisher's end of the queue.
#[derive(Debug)]
pub struct KvEventSource(mpsc::Receiver<NumberedBatch>);

/// A queue of `max_queue_size` batches (at least 1) from the engine to the publisher.
pub fn channel(max_queue_size: usize) -> (KvEventSink, KvEventSource) {
    let (queue, receiver) = mpsc::channel(max_queue_size.max(1));
    let sink = KvEventSink { queue, next_seq: 0 };
    (sink, KvEventSource(receiver))
}

/// What became of a batch handed to [`KvEventSink::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Queued,
    /// The queue was full or the publisher gone: dropped, counted, and its sequence
    /// number skipped so that subscribers see the gap.
    Dropped,
}

impl KvEventSink {
    /// Numbers `events` as the next batch (stamped now, data-parallel rank 0) and
    /// queues it; a full queue drops it. The number is taken either way.
    pub fn send(&mut self, events: Vec<KvEvent>) -> Sent {
        let seq = self.next_seq;
        self.next_seq += 1;
        let batch = KvEventBatch {
            ts: unix_seconds(),
            events,
            data_parallel_rank: Some(0),
        };
        match self.queue.try_send(NumberedBatch { seq, batch }) {
            Ok(()) => Sent::Queued,
            Err(_) => {
                metrics::counter!(names::KV_EVENTS_DROPPED_TOTAL).increment(1);
                Sent::Dropped
            }
        }
    }
}

impl KvEventSource {
    /// The next batch; `None` once the engine loop is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<NumberedBatch> {
        self.0.recv().await
    }
}

/// `time.time()`.
fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dropped_batch_leaves_a_gap_in_the_numbers() {
        let (mut sink, mut source) = channel(1);
        assert_eq!(sink.send(vec![KvEvent::AllBlocksCleared]), Sent::Queued);
        assert_eq!(sink.send(vec![]), Sent::Dropped);
        let first = source.recv().await.unwrap();
        assert_eq!(first.seq, 0);
        assert_eq!(first.batch.events, vec![KvEvent::AllBlocksCleared]);
        assert_eq!(first.batch.data_parallel_rank, Some(0));
        assert!(first.batch.ts > 1.7e9);
        assert_eq!(sink.send(vec![]), Sent::Queued);
        assert_eq!(source.recv().await.unwrap().seq, 2);
        drop(sink);
        assert_eq!(source.recv().await, None);
    }
}
