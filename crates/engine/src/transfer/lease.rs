//! The prefill side's leases: KV blocks kept after a request finished so that a decode
//! worker can read them. The engine loop creates a lease when a `do_remote_decode`
//! request finishes; the hand-off server checks reads against it, renews it on
//! heartbeats, and ends it when the reader is done or when it expires unrenewed. A lease
//! with a read in progress is never ended, so a read is never served from freed blocks.
//!
//! Ending a lease returns its blocks; the caller hands them back to the engine loop,
//! which alone owns the block pool.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::wire::{ErrorCode, tokens_digest};
use crate::kv::BlockId;

/// What the engine reports about a lease it created (becomes `kv_transfer_params`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    pub remote_request_id: String,
    pub block_ids: Vec<BlockId>,
    /// Positions whose KV the blocks hold (the prompt).
    pub num_tokens: usize,
}

struct Lease {
    blocks: Vec<BlockId>,
    tokens: Vec<u32>,
    expires: Instant,
    readers: u32,
    /// The reader said it is done while a read was still running.
    done: bool,
}

/// A refused read: why, and a message for the reader.
pub type Refusal = (ErrorCode, String);

/// Every lease of one prefill worker.
pub struct LeaseTable {
    duration: Duration,
    leases: Mutex<HashMap<String, Lease>>,
}

impl LeaseTable {
    pub fn new(duration: Duration) -> Self {
        Self {
            duration,
            leases: Mutex::new(HashMap::new()),
        }
    }

    pub fn duration(&self) -> Duration {
        self.duration
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        // A panic while holding the lock leaves the map consistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds `blocks` (the KV of `tokens`) for a remote reader.
    pub fn insert(&self, request_id: String, blocks: Vec<BlockId>, tokens: Vec<u32>) {
        self.insert_at(Instant::now(), request_id, blocks, tokens)
    }

    fn insert_at(&self, now: Instant, request_id: String, blocks: Vec<BlockId>, tokens: Vec<u32>) {
        let lease = Lease {
            blocks,
            tokens,
            expires: now + self.duration,
            readers: 0,
            done: false,
        };
        self.lock().insert(request_id, lease);
    }

    /// Starts a read of `block_ids` of `request_id`; pair with [`Self::end_read`]. The
    /// reader's prompt prefix must be the lease's.
    pub fn begin_read(
        &self,
        request_id: &str,
        block_ids: &[BlockId],
        num_tokens: usize,
        digest: &str,
    ) -> Result<(), Refusal> {
        self.begin_read_at(Instant::now(), request_id, block_ids, num_tokens, digest)
    }

    fn begin_read_at(
        &self,
        now: Instant,
        request_id: &str,
        block_ids: &[BlockId],
        num_tokens: usize,
        digest: &str,
    ) -> Result<(), Refusal> {
        let mut leases = self.lock();
        let lease = match leases.get_mut(request_id) {
            Some(lease) if lease.expires > now && !lease.done => lease,
            Some(_) => {
                return Err((
                    ErrorCode::UnknownRequest,
                    format!("the lease of request {request_id} has expired"),
                ));
            }
            None => {
                return Err((
                    ErrorCode::UnknownRequest,
                    format!("no KV is held for request {request_id}"),
                ));
            }
        };
        if let Some(bad) = block_ids.iter().find(|b| !lease.blocks.contains(b)) {
            return Err((
                ErrorCode::BlockOutOfRange,
                format!("block {bad} does not belong to request {request_id}"),
            ));
        }
        if num_tokens > lease.tokens.len() || tokens_digest(&lease.tokens[..num_tokens]) != digest {
            return Err((
                ErrorCode::PromptMismatch,
                format!(
                    "the reader's first {num_tokens} prompt tokens are not those of request \
                     {request_id} ({} tokens)",
                    lease.tokens.len()
                ),
            ));
        }
        lease.readers += 1;
        Ok(())
    }

    /// Ends a read; returns the blocks to release if the lease ended meanwhile (the
    /// reader said done, or it expired).
    pub fn end_read(&self, request_id: &str) -> Option<Vec<BlockId>> {
        self.end_read_at(Instant::now(), request_id)
    }

    fn end_read_at(&self, now: Instant, request_id: &str) -> Option<Vec<BlockId>> {
        let mut leases = self.lock();
        let lease = leases.get_mut(request_id)?;
        lease.readers = lease.readers.saturating_sub(1);
        let ended = lease.done || lease.expires <= now;
        if lease.readers == 0 && ended {
            leases.remove(request_id).map(|l| l.blocks)
        } else {
            None
        }
    }

    /// Renews the named leases to at least two thirds of a lease from now (vLLM's rule);
    /// returns how many exist.
    pub fn heartbeat(&self, request_ids: &[String]) -> usize {
        self.heartbeat_at(Instant::now(), request_ids)
    }

    fn heartbeat_at(&self, now: Instant, request_ids: &[String]) -> usize {
        let renewed_until = now + self.duration * 2 / 3;
        let mut leases = self.lock();
        let mut count = 0;
        for id in request_ids {
            if let Some(lease) = leases.get_mut(id) {
                lease.expires = lease.expires.max(renewed_until);
                count += 1;
            }
        }
        count
    }

    /// The reader is done: ends the lease now, or after the read in progress. Returns
    /// the blocks to release now, if any; `None` also when the lease is unknown.
    pub fn done(&self, request_id: &str) -> (bool, Option<Vec<BlockId>>) {
        let mut leases = self.lock();
        let Some(lease) = leases.get_mut(request_id) else {
            return (false, None);
        };
        if lease.readers > 0 {
            lease.done = true;
            return (true, None);
        }
        (true, leases.remove(request_id).map(|l| l.blocks))
    }

    /// Ends every expired lease with no read in progress; returns each one's blocks.
    pub fn expire(&self) -> Vec<(String, Vec<BlockId>)> {
        self.expire_at(Instant::now())
    }

    fn expire_at(&self, now: Instant) -> Vec<(String, Vec<BlockId>)> {
        let mut leases = self.lock();
        let expired: Vec<String> = leases
            .iter()
            .filter(|(_, l)| l.readers == 0 && l.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        expired
            .into_iter()
            .filter_map(|id| leases.remove(&id).map(|l| (id, l.blocks)))
            .collect()
    }

    /// Blocks held for remote readers.
    pub fn held_blocks(&self) -> usize {
        self.lock().values().map(|l| l.blocks.len()).sum()
    }

    /// Ends every lease (shutdown); returns all their blocks.
    pub fn drain(&self) -> Vec<BlockId> {
        self.lock().drain().flat_map(|(_, l)| l.blocks).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(30);

    /// A table with lease "r" (blocks 7 and 8, prompt 1 2 3) created at `t0`.
    fn table(t0: Instant) -> LeaseTable {
        let t = LeaseTable::new(LEASE);
        t.insert_at(t0, "r".into(), vec![7, 8], vec![1, 2, 3]);
        t
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn reads_are_checked_against_the_lease() {
        let t = table(Instant::now());
        let digest = tokens_digest(&[1, 2]);
        let refusal = |r: Result<(), Refusal>| r.unwrap_err().0;
        assert_eq!(
            refusal(t.begin_read("x", &[7], 2, &digest)),
            ErrorCode::UnknownRequest
        );
        assert_eq!(
            refusal(t.begin_read("r", &[7, 9], 2, &digest)),
            ErrorCode::BlockOutOfRange
        );
        assert_eq!(
            refusal(t.begin_read("r", &[7], 3, &digest)),
            ErrorCode::PromptMismatch
        );
        assert_eq!(
            refusal(t.begin_read("r", &[7], 4, &digest)),
            ErrorCode::PromptMismatch
        );
        t.begin_read("r", &[8, 7], 2, &digest).unwrap();
        assert_eq!(t.end_read("r"), None, "still leased");
        assert_eq!(t.done("r"), (true, Some(vec![7, 8])));
        assert_eq!(t.held_blocks(), 0);
        assert_eq!(t.done("r"), (false, None));
    }

    #[test]
    fn done_during_a_read_releases_when_the_read_ends() {
        let t = table(Instant::now());
        t.begin_read("r", &[7], 3, &tokens_digest(&[1, 2, 3]))
            .unwrap();
        assert_eq!(t.done("r"), (true, None));
        assert!(t.begin_read("r", &[7], 0, &tokens_digest(&[])).is_err());
        assert_eq!(t.end_read("r"), Some(vec![7, 8]));
    }

    #[test]
    fn heartbeats_extend_to_two_thirds_of_a_lease() {
        let t0 = Instant::now();
        let t = table(t0);
        assert_eq!(
            t.heartbeat_at(t0 + secs(25), &["r".into(), "gone".into()]),
            1
        );
        // Renewed until 25 + 20 = 45 s, past the original 30 s.
        assert!(t.expire_at(t0 + secs(44)).is_empty());
        assert_eq!(
            t.expire_at(t0 + secs(45)),
            vec![("r".to_string(), vec![7, 8])]
        );
    }

    #[test]
    fn early_heartbeats_never_shorten_a_lease() {
        let t0 = Instant::now();
        let t = table(t0);
        t.heartbeat_at(t0 + secs(1), &["r".into()]);
        assert!(t.expire_at(t0 + secs(29)).is_empty());
    }

    #[test]
    fn a_lease_under_a_read_outlives_its_expiry() {
        let t0 = Instant::now();
        let t = table(t0);
        t.begin_read_at(t0 + secs(29), "r", &[8], 0, &tokens_digest(&[]))
            .unwrap();
        assert!(
            t.expire_at(t0 + secs(31)).is_empty(),
            "a read is in progress"
        );
        assert_eq!(t.end_read_at(t0 + secs(31), "r"), Some(vec![7, 8]));
    }

    #[test]
    fn expired_leases_refuse_reads() {
        let t0 = Instant::now();
        let t = table(t0);
        let err = t
            .begin_read_at(t0 + secs(30), "r", &[7], 0, &tokens_digest(&[]))
            .unwrap_err();
        assert_eq!(err.0, ErrorCode::UnknownRequest);
        assert!(err.1.contains("expired"));
    }
}
