//! The prefill side's leases: KV blocks kept after a request finished so that a decode
//! worker can read them. The engine loop creates a lease when a `do_remote_decode`
//! request finishes; the hand-off server checks reads against it, renews it on
//! heartbeats, and ends it when the reader is done or when it expires unrenewed. A lease
//! with a read in progress is never ended, so a read is never served from freed blocks.
//!
//! Every lease has a secret, issued only in the signed params of its prefill answer:
//! reads, heartbeats and dones must present it, and a wrong one is answered exactly as
//! an unknown request. A read covers exactly the tokens whose digest it presents: at
//! least one, and only blocks that start below them.
//!
//! Ending a lease returns its blocks; the caller hands them back to the engine loop,
//! which alone owns the block pool.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::auth::secrets_equal;
use super::wire::{ErrorCode, LeaseRef, tokens_digest};
use crate::kv::BlockId;

/// What the engine reports about a lease it created (becomes `kv_transfer_params`).
/// Its `Debug` leaves the lease secret out.
#[derive(Clone, PartialEq, Eq)]
pub struct Handoff {
    pub remote_request_id: String,
    pub block_ids: Vec<BlockId>,
    /// Positions whose KV the blocks hold (the prompt).
    pub num_tokens: usize,
    /// What readers must present ([`super::auth::new_lease_secret`]).
    pub lease_secret: String,
    /// Unix seconds when the lease ends unless renewed (what the signature promises).
    pub expires_at: u64,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff")
            .field("remote_request_id", &self.remote_request_id)
            .field("block_ids", &self.block_ids)
            .field("num_tokens", &self.num_tokens)
            .field("lease_secret", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A read of a lease's blocks, as `read` and `read_device` ask for it (no `Debug`: it
/// carries the lease secret).
#[derive(Clone, Copy)]
pub struct LeaseRead<'a> {
    pub request_id: &'a str,
    pub lease_secret: &'a str,
    pub block_ids: &'a [BlockId],
    /// Prompt tokens the reader vouches for, and their digest.
    pub num_tokens: usize,
    pub digest: &'a str,
}

struct Lease {
    secret: String,
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
    /// Tokens per block: block `i` of a lease holds positions from `i × block_size`.
    block_size: usize,
    leases: Mutex<HashMap<String, Lease>>,
}

impl LeaseTable {
    pub fn new(duration: Duration, block_size: usize) -> Self {
        Self {
            duration,
            block_size: block_size.max(1),
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

    /// Holds `blocks` (the KV of `tokens`) for a remote reader presenting `secret`.
    pub fn insert(
        &self,
        request_id: String,
        secret: String,
        blocks: Vec<BlockId>,
        tokens: Vec<u32>,
    ) {
        self.insert_at(Instant::now(), request_id, secret, blocks, tokens)
    }

    fn insert_at(
        &self,
        now: Instant,
        request_id: String,
        secret: String,
        blocks: Vec<BlockId>,
        tokens: Vec<u32>,
    ) {
        let lease = Lease {
            secret,
            blocks,
            tokens,
            expires: now + self.duration,
            readers: 0,
            done: false,
        };
        self.lock().insert(request_id, lease);
    }

    /// Starts a read; pair with [`Self::end_read`]. The reader must hold the lease's
    /// secret, vouch for at least one of its tokens (`num_tokens` and their digest), and
    /// ask only for its blocks that start below those tokens.
    pub fn begin_read(&self, read: &LeaseRead<'_>) -> Result<(), Refusal> {
        self.begin_read_at(Instant::now(), read)
    }

    fn begin_read_at(&self, now: Instant, read: &LeaseRead<'_>) -> Result<(), Refusal> {
        let request_id = read.request_id;
        let mut leases = self.lock();
        let lease = match leases.get_mut(request_id) {
            Some(lease) if secrets_equal(&lease.secret, read.lease_secret) => lease,
            // A wrong secret learns nothing: the answer of an unknown request.
            _ => return Err(unknown(request_id)),
        };
        if lease.expires <= now || lease.done {
            return Err((
                ErrorCode::UnknownRequest,
                format!("the lease of request {request_id} has expired"),
            ));
        }
        check_tokens(lease, read)?;
        check_blocks(lease, read, self.block_size)?;
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

    /// Renews the named leases (those whose secret matches) to at least two thirds of a
    /// lease from now (vLLM's rule); returns how many were renewed.
    pub fn heartbeat(&self, named: &[LeaseRef]) -> usize {
        self.heartbeat_at(Instant::now(), named)
    }

    fn heartbeat_at(&self, now: Instant, named: &[LeaseRef]) -> usize {
        let renewed_until = now + self.duration * 2 / 3;
        let mut leases = self.lock();
        let mut count = 0;
        for named in named {
            if let Some(lease) = leases.get_mut(&named.request_id)
                && secrets_equal(&lease.secret, &named.lease_secret)
            {
                lease.expires = lease.expires.max(renewed_until);
                count += 1;
            }
        }
        count
    }

    /// The reader is done: ends the lease now, or after the read in progress. Returns
    /// whether the lease existed with that secret, and the blocks to release now, if any.
    pub fn done(&self, request_id: &str, secret: &str) -> (bool, Option<Vec<BlockId>>) {
        let mut leases = self.lock();
        let Some(lease) = leases.get_mut(request_id) else {
            return (false, None);
        };
        if !secrets_equal(&lease.secret, secret) {
            return (false, None);
        }
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

fn unknown(request_id: &str) -> Refusal {
    (
        ErrorCode::UnknownRequest,
        format!("no KV is held for request {request_id}"),
    )
}

/// At least one token, no more than the lease holds, and the lease's own.
fn check_tokens(lease: &Lease, read: &LeaseRead<'_>) -> Result<(), Refusal> {
    let n = read.num_tokens;
    let held = lease.tokens.len();
    if n == 0 || n > held || tokens_digest(&lease.tokens[..n]) != read.digest {
        return Err((
            ErrorCode::PromptMismatch,
            format!(
                "the reader's first {n} prompt tokens are not those of request {} \
                 ({held} tokens)",
                read.request_id
            ),
        ));
    }
    Ok(())
}

/// Every block is the lease's, and its first position is among the vouched tokens.
fn check_blocks(lease: &Lease, read: &LeaseRead<'_>, block_size: usize) -> Result<(), Refusal> {
    // Each block at most once: a read never sends more than the lease holds.
    if read.block_ids.len() > lease.blocks.len() {
        return Err((
            ErrorCode::BlockOutOfRange,
            format!(
                "{} blocks asked of request {}, which holds {}",
                read.block_ids.len(),
                read.request_id,
                lease.blocks.len()
            ),
        ));
    }
    let positions: HashMap<BlockId, usize> = lease
        .blocks
        .iter()
        .enumerate()
        .map(|(index, &block)| (block, index))
        .collect();
    let mut asked = std::collections::HashSet::with_capacity(read.block_ids.len());
    for &block in read.block_ids {
        if !asked.insert(block) {
            return Err((
                ErrorCode::BlockOutOfRange,
                format!("block {block} is asked twice"),
            ));
        }
        let Some(&index) = positions.get(&block) else {
            return Err((
                ErrorCode::BlockOutOfRange,
                format!(
                    "block {block} does not belong to request {}",
                    read.request_id
                ),
            ));
        };
        if index.saturating_mul(block_size) >= read.num_tokens {
            return Err((
                ErrorCode::BlockOutOfRange,
                format!(
                    "block {block} holds positions from {}, past the {} tokens read",
                    index * block_size,
                    read.num_tokens
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(30);
    const SECRET: &str = "5ec2e7";

    /// A table with lease "r" (secret [`SECRET`], blocks 7 and 8 of 2 tokens each,
    /// prompt 1 2 3) created at `t0`.
    fn table(t0: Instant) -> LeaseTable {
        let t = LeaseTable::new(LEASE, 2);
        t.insert_at(t0, "r".into(), SECRET.into(), vec![7, 8], vec![1, 2, 3]);
        t
    }

    /// A read of lease "r" with the right secret.
    fn read<'a>(blocks: &'a [BlockId], num_tokens: usize, digest: &'a str) -> LeaseRead<'a> {
        LeaseRead {
            request_id: "r",
            lease_secret: SECRET,
            block_ids: blocks,
            num_tokens,
            digest,
        }
    }

    fn named(id: &str, secret: &str) -> LeaseRef {
        LeaseRef {
            request_id: id.into(),
            lease_secret: secret.into(),
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn refusal(r: Result<(), Refusal>) -> ErrorCode {
        r.unwrap_err().0
    }

    #[test]
    fn reads_are_checked_against_the_lease() {
        let t = table(Instant::now());
        let two = tokens_digest(&[1, 2]);
        let three = tokens_digest(&[1, 2, 3]);
        let unknown = LeaseRead {
            request_id: "x",
            ..read(&[7], 2, &two)
        };
        assert_eq!(refusal(t.begin_read(&unknown)), ErrorCode::UnknownRequest);
        assert_eq!(
            refusal(t.begin_read(&read(&[7, 9], 3, &three))),
            ErrorCode::BlockOutOfRange
        );
        assert_eq!(
            refusal(t.begin_read(&read(&[7], 3, &two))),
            ErrorCode::PromptMismatch
        );
        assert_eq!(
            refusal(t.begin_read(&read(&[7], 4, &two))),
            ErrorCode::PromptMismatch
        );
        t.begin_read(&read(&[8, 7], 3, &three)).unwrap();
        assert_eq!(t.end_read("r"), None, "still leased");
        assert_eq!(t.done("r", SECRET), (true, Some(vec![7, 8])));
        assert_eq!(t.held_blocks(), 0);
        assert_eq!(t.done("r", SECRET), (false, None));
    }

    #[test]
    fn a_wrong_lease_secret_is_answered_as_an_unknown_request() {
        let t = table(Instant::now());
        let three = tokens_digest(&[1, 2, 3]);
        let unknown = refusal_of(&t, "x", SECRET, &three);
        for wrong in ["", "5ec2e8", "5ec2e", "5ec2e7 "] {
            let refused = refusal_of(&t, "r", wrong, &three);
            assert_eq!(refused.0, ErrorCode::UnknownRequest, "{wrong:?}");
            assert_eq!(
                refused.1,
                unknown.1.replace("request x", "request r"),
                "{wrong:?}"
            );
            assert_eq!(t.done("r", wrong), (false, None));
            assert_eq!(t.heartbeat(&[named("r", wrong)]), 0);
        }
        assert_eq!(t.held_blocks(), 2, "nothing ended the lease");
        assert_eq!(t.heartbeat(&[named("r", SECRET)]), 1);
    }

    fn refusal_of(t: &LeaseTable, id: &str, secret: &str, digest: &str) -> Refusal {
        let read = LeaseRead {
            request_id: id,
            lease_secret: secret,
            ..read(&[7], 3, digest)
        };
        t.begin_read(&read).unwrap_err()
    }

    #[test]
    fn a_read_covers_exactly_the_tokens_it_vouches_for() {
        let t = table(Instant::now());
        // No tokens vouched for: nothing can be read, not even with the empty digest.
        let none = tokens_digest(&[]);
        assert_eq!(
            refusal(t.begin_read(&read(&[7], 0, &none))),
            ErrorCode::PromptMismatch
        );
        assert_eq!(
            refusal(t.begin_read(&read(&[], 0, &none))),
            ErrorCode::PromptMismatch
        );
        // Two tokens vouch for block 7 (positions 0-1), not block 8 (from position 2).
        let two = tokens_digest(&[1, 2]);
        assert_eq!(
            refusal(t.begin_read(&read(&[8], 2, &two))),
            ErrorCode::BlockOutOfRange
        );
        t.begin_read(&read(&[7], 2, &two)).unwrap();
        t.end_read("r");
        // A suffix (the reader holds block 7 already): the tokens still start at 0.
        let three = tokens_digest(&[1, 2, 3]);
        t.begin_read(&read(&[8], 3, &three)).unwrap();
        t.end_read("r");
    }

    #[test]
    fn a_read_asks_each_block_once() {
        let t = table(Instant::now());
        let three = tokens_digest(&[1, 2, 3]);
        for ids in [&[7, 7][..], &[7, 8, 7], &[7, 7, 7, 7, 7]] {
            assert_eq!(
                refusal(t.begin_read(&read(ids, 3, &three))),
                ErrorCode::BlockOutOfRange,
                "{ids:?}"
            );
        }
        t.begin_read(&read(&[7, 8], 3, &three)).unwrap();
        t.end_read("r");
    }

    #[test]
    fn done_during_a_read_releases_when_the_read_ends() {
        let t = table(Instant::now());
        let three = tokens_digest(&[1, 2, 3]);
        t.begin_read(&read(&[7], 3, &three)).unwrap();
        assert_eq!(t.done("r", SECRET), (true, None));
        assert!(t.begin_read(&read(&[7], 3, &three)).is_err());
        assert_eq!(t.end_read("r"), Some(vec![7, 8]));
    }

    #[test]
    fn heartbeats_extend_to_two_thirds_of_a_lease() {
        let t0 = Instant::now();
        let t = table(t0);
        let beat = [named("r", SECRET), named("gone", SECRET)];
        assert_eq!(t.heartbeat_at(t0 + secs(25), &beat), 1);
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
        t.heartbeat_at(t0 + secs(1), &[named("r", SECRET)]);
        assert!(t.expire_at(t0 + secs(29)).is_empty());
    }

    #[test]
    fn a_lease_under_a_read_outlives_its_expiry() {
        let t0 = Instant::now();
        let t = table(t0);
        let three = tokens_digest(&[1, 2, 3]);
        t.begin_read_at(t0 + secs(29), &read(&[8], 3, &three))
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
        let three = tokens_digest(&[1, 2, 3]);
        let err = t
            .begin_read_at(t0 + secs(30), &read(&[7], 3, &three))
            .unwrap_err();
        assert_eq!(err.0, ErrorCode::UnknownRequest);
        assert!(err.1.contains("expired"));
    }
}
