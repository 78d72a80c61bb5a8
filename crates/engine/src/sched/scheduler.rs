//! The engine loop itself: continuous batching over a paged KV store.
//!
//! Each step: take new commands; give every decoding sequence its one token (growing its
//! block table, preempting the newest sequences by recompute when blocks run out);
//! continue chunked prefills; admit waiting requests first-come-first-served while the
//! token budget, `max_num_seqs` and free blocks allow (reusing cached prefix blocks);
//! run one forward pass over the whole batch; sample where a sequence reached its last
//! token; report, finish, release.
//!
//! KV hand-off: a finished prefill leg (`RemoteDecode`) leaves its blocks to a lease
//! instead of the pool; a decode leg (`RemotePrefill`) is admitted like any request,
//! then waits aside (`pulling`) while the puller fills its missing blocks, and joins
//! the running batch with only its last prompt token left to compute.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::handle::{Command, SeqId};
use super::request::FinishReason;
use super::sequence::{PullState, Sequence};
use super::stats::{EngineStats, SharedStats};
use super::{EngineConfig, HandoffLinks};
use crate::exec::Executor;
use crate::kv::pool::BlockPool;
use crate::kv_events::KvEventSink;
use crate::metrics as names;
use crate::model::{LogitsFor, SeqInput};
use crate::sample::DeviceDraw;
use crate::transfer::auth;
use crate::transfer::puller::FailureKind;
use crate::transfer::wire::tokens_digest;
use crate::transfer::{
    Handoff, KvRole, LoadFailurePolicy, PullFailure, PullJob, PullOutcome, PullerMsg,
};

/// What one sequence contributes to a step.
struct Slot {
    /// Index into `running`.
    seq: usize,
    /// Tokens `num_computed..num_computed + len` are computed this step.
    len: usize,
}

/// A sequence that finished in a step: how, or the error it failed with.
type Finished = (SeqId, Result<FinishReason, String>);

pub(crate) struct EngineLoop {
    executor: Executor,
    blocks: BlockPool,
    config: EngineConfig,
    waiting: VecDeque<Sequence>,
    /// In admission order: the last one is preempted first.
    running: Vec<Sequence>,
    /// Admitted remote prefills whose KV is being pulled into their blocks.
    pulling: Vec<Sequence>,
    handoff: HandoffLinks,
    /// Set with `--kv-events-config`: where each step's block events go.
    kv_events: Option<KvEventSink>,
    commands: mpsc::UnboundedReceiver<Command>,
    stats: Arc<SharedStats>,
    steps: u64,
    preemptions: u64,
}

impl EngineLoop {
    pub fn new(
        executor: Executor,
        config: EngineConfig,
        commands: mpsc::UnboundedReceiver<Command>,
        stats: Arc<SharedStats>,
        handoff: HandoffLinks,
        kv_events: Option<KvEventSink>,
    ) -> Self {
        let mut blocks = BlockPool::new(
            executor.num_blocks(),
            executor.kv_layout().block_size,
            config.prefix_caching,
        );
        if kv_events.is_some() {
            blocks.enable_events(executor.kv_medium());
        }
        Self {
            executor,
            blocks,
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            pulling: Vec::new(),
            handoff,
            kv_events,
            commands,
            stats,
            steps: 0,
            preemptions: 0,
        }
    }

    /// Runs until every [`super::EngineHandle`] is gone.
    pub fn run(mut self) {
        while self.take_commands() {
            self.step();
            self.publish_gauges();
            self.publish_kv_events();
        }
    }

    /// Applies queued commands, waiting for one when there is nothing to do. False when
    /// the loop should end.
    fn take_commands(&mut self) -> bool {
        if self.running.is_empty() && self.waiting.is_empty() {
            match self.commands.blocking_recv() {
                Some(command) => self.apply(command),
                None => return false,
            }
        }
        loop {
            match self.commands.try_recv() {
                Ok(command) => self.apply(command),
                Err(mpsc::error::TryRecvError::Empty) => return true,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    // Finish what is queued; the loop ends once idle. (Pulls still in
                    // flight cannot report back any more.)
                    return !(self.running.is_empty() && self.waiting.is_empty());
                }
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Submit {
                id,
                request,
                events,
            } => {
                let seq = Sequence::new(id, *request, events);
                if let Err(message) = self.check_fits(&seq) {
                    seq.send_failed(message);
                    return;
                }
                if let KvRole::RemotePrefill(source) = &seq.kv {
                    let source = source.clone();
                    self.tell_puller(PullerMsg::Track { seq: id, source });
                }
                self.waiting.push_back(seq);
            }
            Command::Stop(id) => self.end(id, FinishReason::Stop),
            Command::Cancel(id) => self.end(id, FinishReason::Aborted),
            Command::Release(blocks) => {
                let tail_first: Vec<_> = blocks.into_iter().rev().collect();
                self.blocks.release(&tail_first);
            }
            Command::Pulled { seq, outcome } => self.on_pulled(seq, outcome),
        }
    }

    fn tell_puller(&self, message: PullerMsg) {
        if let Some(puller) = &self.handoff.puller {
            let _ = puller.send(message);
        }
    }

    /// A request the engine could never run (the HTTP layer checks first; this guards
    /// every other caller).
    fn check_fits(&self, seq: &Sequence) -> Result<(), String> {
        let positions = seq.prompt_len + seq.max_tokens;
        let capacity = self.blocks.num_blocks() * self.blocks.block_size();
        let limit = self.config.max_model_len.min(capacity);
        if seq.prompt_len == 0 || seq.max_tokens == 0 {
            return Err("a request needs at least one prompt token and max_tokens >= 1".into());
        }
        if positions > limit {
            return Err(format!(
                "prompt ({} tokens) plus max_tokens ({}) exceeds the limit of {limit} tokens",
                seq.prompt_len, seq.max_tokens
            ));
        }
        let vocab = self.executor.config().vocab_size;
        if let Some(t) = seq.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(format!("token id {t} is outside the vocabulary ({vocab})"));
        }
        Ok(())
    }

    /// Ends a request at the caller's word (a stop string, or it went away).
    fn end(&mut self, id: SeqId, reason: FinishReason) {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.remove(i);
            self.finish(seq, reason);
        } else if let Some(seq) = self
            .waiting
            .iter()
            .position(|s| s.id == id)
            .and_then(|i| self.waiting.remove(i))
        {
            self.finish(seq, reason);
        } else if let Some(seq) = self.pulling.iter_mut().find(|s| s.id == id) {
            // Its blocks are being written: it ends when the pull does.
            seq.abandoned = true;
        }
    }

    fn finish(&mut self, mut seq: Sequence, reason: FinishReason) {
        if seq.awaits_pull() {
            // P holds the prompt's blocks for this request: free them now.
            self.tell_puller(PullerMsg::Release { seq: seq.id });
        }
        let handoff = self.lease_for_remote_decode(&mut seq, reason);
        self.release_blocks(&mut seq);
        seq.send_finished(reason, handoff);
    }

    /// A finished prefill leg's computed blocks go to a lease instead of the pool.
    fn lease_for_remote_decode(
        &mut self,
        seq: &mut Sequence,
        reason: FinishReason,
    ) -> Option<Handoff> {
        if seq.kv != KvRole::RemoteDecode || reason == FinishReason::Aborted {
            return None;
        }
        let leases = self.handoff.leases.as_ref()?;
        let held = seq.num_computed.div_ceil(self.blocks.block_size());
        if held == 0 {
            return None;
        }
        let blocks: Vec<_> = seq.blocks.drain(..held).collect();
        let remote_request_id = format!("{}-{:08x}", seq.request_id, rand::random::<u32>());
        let tokens = seq.tokens[..seq.num_computed].to_vec();
        let lease_secret = auth::new_lease_secret();
        let expires_at = auth::now_unix() + leases.duration().as_secs_f64().ceil() as u64;
        leases.insert(
            remote_request_id.clone(),
            lease_secret.clone(),
            blocks.clone(),
            tokens,
        );
        metrics::gauge!(names::KV_BLOCKS_HELD_FOR_REMOTE).set(leases.held_blocks() as f64);
        Some(Handoff {
            remote_request_id,
            block_ids: blocks,
            num_tokens: seq.num_computed,
            lease_secret,
            expires_at,
        })
    }

    fn fail(&mut self, mut seq: Sequence, message: String) {
        self.release_blocks(&mut seq);
        seq.send_failed(message);
    }

    fn release_blocks(&mut self, seq: &mut Sequence) {
        // Tail first, so that under pressure a sequence's last blocks are evicted
        // before the shared prefix they hang off.
        let blocks: Vec<_> = seq.blocks.iter().rev().copied().collect();
        self.blocks.release(&blocks);
        seq.reset_for_recompute();
    }

    fn step(&mut self) {
        let mut budget = self.config.max_num_batched_tokens;
        let mut slots = self.schedule_running(&mut budget);
        self.admit_waiting(&mut budget, &mut slots);
        if slots.is_empty() {
            return;
        }
        let tokens: usize = slots.iter().map(|s| s.len).sum();
        metrics::histogram!(names::ITERATION_TOKENS_TOTAL).record(tokens as f64);
        let kind = self.step_kind(&slots);
        let started = Instant::now();
        let picked = match self.run_batch(&slots) {
            Ok(picked) => picked,
            Err(err) => {
                // A bug, not a client error: fail the batch's requests and carry on.
                tracing::error!(%err, "forward pass failed");
                let ids: Vec<SeqId> = slots.iter().map(|s| self.running[s.seq].id).collect();
                for id in ids {
                    if let Some(i) = self.running.iter().position(|s| s.id == id) {
                        let seq = self.running.remove(i);
                        self.fail(seq, format!("internal engine error: {err}"));
                    }
                }
                return;
            }
        };
        let forwarded = Instant::now();
        let finished = self.sample_and_report(&slots, picked.as_deref());
        record_step_time(kind, "forward", forwarded.duration_since(started));
        record_step_time(kind, "sample", forwarded.elapsed());
        // Answered only now, so that a client holding its answer finds the step that
        // produced it in the metrics.
        self.retire(finished);
    }

    /// `decode` (one new token per sequence), `prefill` (prompt chunks only) or `mixed`.
    fn step_kind(&self, slots: &[Slot]) -> &'static str {
        let decodes = slots
            .iter()
            .filter(|slot| {
                let seq = &self.running[slot.seq];
                slot.len == 1 && seq.num_computed + 1 == seq.tokens.len() && seq.generated() > 0
            })
            .count();
        match decodes {
            0 => "prefill",
            n if n == slots.len() => "decode",
            _ => "mixed",
        }
    }

    /// Decoding and partly prefilled sequences, in admission order, within the budget.
    fn schedule_running(&mut self, budget: &mut usize) -> Vec<Slot> {
        let mut slots = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            if *budget == 0 {
                break;
            }
            let len = self.running[i].step_len().min(*budget);
            if !self.ensure_blocks(i, len) {
                // `i` itself was preempted (it was the newest); nothing after it runs.
                break;
            }
            *budget -= len;
            slots.push(Slot { seq: i, len });
            i += 1;
        }
        slots
    }

    /// Gives running sequence `i` blocks for `len` more tokens, preempting the newest
    /// running sequences while blocks are short. False if `i` had to be preempted.
    fn ensure_blocks(&mut self, i: usize, len: usize) -> bool {
        let block_size = self.blocks.block_size();
        loop {
            let seq = &self.running[i];
            let needed = (seq.num_computed + len).div_ceil(block_size);
            let missing = needed.saturating_sub(seq.blocks.len());
            if missing == 0 {
                return true;
            }
            if let Some(new) = self.blocks.allocate(missing) {
                self.running[i].blocks.extend(new);
                return true;
            }
            let victim = self.running.len() - 1;
            self.preempt(victim);
            if victim == i {
                return false;
            }
        }
    }

    /// Frees a running sequence's blocks and queues it first, to be recomputed.
    fn preempt(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        self.release_blocks(&mut seq);
        metrics::counter!(names::NUM_PREEMPTIONS_TOTAL).increment(1);
        self.preemptions += 1;
        tracing::debug!(seq = seq.id, "preempted by recompute");
        self.waiting.push_front(seq);
    }

    /// Admits waiting sequences first-come-first-served, but for those held until
    /// another's prompt is computed ([`GenerationRequest::after_prompt_of`]), which
    /// keep their places without holding up the others.
    fn admit_waiting(&mut self, budget: &mut usize, slots: &mut Vec<Slot>) {
        let mut held = Vec::new();
        self.admit_unheld(budget, slots, &mut held);
        for seq in held.into_iter().rev() {
            self.waiting.push_front(seq);
        }
    }

    /// Whether sequence `id` is still to compute its prompt (waiting, pulling it, or
    /// running through it).
    fn prompt_pending(&self, id: SeqId) -> bool {
        self.waiting.iter().any(|seq| seq.id == id)
            || self.pulling.iter().any(|seq| seq.id == id)
            || self
                .running
                .iter()
                .any(|seq| seq.id == id && seq.num_computed < seq.prompt_len)
    }

    fn admit_unheld(
        &mut self,
        budget: &mut usize,
        slots: &mut Vec<Slot>,
        held: &mut Vec<Sequence>,
    ) {
        while *budget > 0 && self.running.len() + self.pulling.len() < self.config.max_num_seqs {
            let Some(mut seq) = self.waiting.pop_front() else {
                return;
            };
            if seq
                .after_prompt_of
                .is_some_and(|leader| self.prompt_pending(leader))
            {
                held.push(seq);
                continue;
            }
            if !seq.is_listening() {
                self.finish(seq, FinishReason::Aborted);
                continue;
            }
            if !self.allocate_prompt(&mut seq) {
                self.waiting.push_front(seq);
                return;
            }
            if seq.awaits_pull() {
                match self.start_pull(&mut seq) {
                    Ok(true) => {
                        self.pulling.push(seq);
                        continue;
                    }
                    Ok(false) => {}
                    Err(failure) => {
                        self.tell_puller(PullerMsg::Release { seq: seq.id });
                        seq.pull = PullState::Settled;
                        match self.recover_from_pull_failure(seq, failure) {
                            Some(recovered) => seq = recovered,
                            None => continue,
                        }
                    }
                }
            }
            let len = seq.step_len().min(*budget);
            *budget -= len;
            self.running.push(seq);
            slots.push(Slot {
                seq: self.running.len() - 1,
                len,
            });
        }
    }

    /// Sends the pull of the prompt blocks `seq` lacks (its blocks are allocated).
    /// `Ok(false)` when there is nothing to pull: every block but the last token's is
    /// cached here.
    fn start_pull(&mut self, seq: &mut Sequence) -> Result<bool, PullFailure> {
        let KvRole::RemotePrefill(source) = &seq.kv else {
            return Ok(false);
        };
        let block_size = self.blocks.block_size();
        // The last prompt token is always recomputed (its logits give the first token).
        let first = seq.num_computed / block_size;
        let end = (seq.prompt_len - 1).div_ceil(block_size);
        if first >= end {
            self.tell_puller(PullerMsg::Release { seq: seq.id });
            seq.pull = PullState::Settled;
            return Ok(false);
        }
        let invalid =
            |message: String| PullFailure::new(FailureKind::InvalidParams, source, message);
        if self.handoff.puller.is_none() {
            return Err(invalid("this worker has no KV puller".into()));
        }
        if source.block_ids.len() < end {
            return Err(invalid(format!(
                "remote_block_ids has {} blocks; a {}-token prompt needs {end}",
                source.block_ids.len(),
                seq.prompt_len
            )));
        }
        let num_tokens = (end * block_size).min(seq.prompt_len);
        let job = PullJob {
            seq: seq.id,
            source: source.clone(),
            remote_blocks: source.block_ids[first..end].to_vec(),
            local_blocks: seq.blocks[first..end].to_vec(),
            num_tokens,
            tokens_digest: tokens_digest(&seq.tokens[..num_tokens]),
        };
        seq.pull = PullState::InFlight;
        self.tell_puller(PullerMsg::Pull(job));
        Ok(true)
    }

    /// A pull ended: the request joins the running batch (or ends).
    fn on_pulled(&mut self, id: SeqId, outcome: PullOutcome) {
        let Some(i) = self.pulling.iter().position(|s| s.id == id) else {
            return;
        };
        let mut seq = self.pulling.remove(i);
        seq.pull = PullState::Settled;
        if seq.abandoned || !seq.is_listening() {
            self.finish(seq, FinishReason::Aborted);
            return;
        }
        match outcome {
            Ok(_) => {
                seq.num_computed = seq.prompt_len - 1;
                seq.cached_tokens = seq.num_computed;
            }
            Err(failure) => match self.recover_from_pull_failure(seq, failure) {
                Some(recovered) => seq = recovered,
                None => return,
            },
        }
        self.running.push(seq);
    }

    /// Applies `--kv-load-failure-policy`: the request to compute locally, or `None`
    /// after failing it.
    fn recover_from_pull_failure(
        &mut self,
        seq: Sequence,
        failure: PullFailure,
    ) -> Option<Sequence> {
        match self.handoff.load_failure_policy {
            LoadFailurePolicy::Recompute => {
                tracing::warn!(
                    request_id = seq.request_id,
                    %failure,
                    "computing the prompt locally instead"
                );
                metrics::counter!(names::KV_LOAD_RECOMPUTES_TOTAL).increment(1);
                Some(seq)
            }
            LoadFailurePolicy::Fail => {
                tracing::warn!(request_id = seq.request_id, %failure, "failing the request");
                self.fail(seq, failure.client_message());
                None
            }
        }
    }

    /// Reuses cached prefix blocks and allocates the rest for every known token.
    fn allocate_prompt(&mut self, seq: &mut Sequence) -> bool {
        let block_size = self.blocks.block_size();
        // Keep at least the last token to compute: its logits are needed.
        // Prompt log probabilities need every position's logits: nothing cached.
        let max_cached = if seq.wants_prompt_logits() {
            0
        } else {
            (seq.tokens.len() - 1) / block_size
        };
        let needed = seq.tokens.len().div_ceil(block_size);
        // Hopeless even if the whole cacheable prefix hits: don't look it up (a lookup
        // counts as a prefix-cache query, and this request is retried every step).
        if self.blocks.num_available() < needed - max_cached {
            return false;
        }
        let (cached, hashes) = self.blocks.match_prefix(&seq.tokens, max_cached);
        // Now, not at the end of the step: the request's answer may reach its client
        // first, and the counters must already include it.
        self.publish_prefix_counters();
        let Some(fresh) = self.blocks.allocate(needed - cached.len()) else {
            let tail_first: Vec<_> = cached.iter().rev().copied().collect();
            self.blocks.release(&tail_first);
            return false;
        };
        seq.num_computed = cached.len() * block_size;
        if seq.generated() == 0 {
            seq.cached_tokens = seq.num_computed;
        }
        seq.blocks = cached;
        seq.blocks.extend(fresh);
        seq.block_hashes = hashes;
        true
    }

    /// Runs the step's forward pass. When no sequence in it reports or masks its logits
    /// and the executor can pick tokens where the logits are (a GPU), returns the picked
    /// tokens, one per sampling sequence in slot order (each sequence's sampler made its
    /// draw for it); otherwise the logits wait in the executor for
    /// [`Self::sample_and_report`].
    fn run_batch(
        &mut self,
        slots: &[Slot],
    ) -> Result<Option<Vec<u32>>, crate::model::ForwardError> {
        let draws = self.device_draws(slots);
        let inputs: Vec<SeqInput> = slots
            .iter()
            .map(|slot| {
                let seq = &self.running[slot.seq];
                let start = seq.num_computed;
                SeqInput {
                    tokens: &seq.tokens[start..start + slot.len],
                    start_pos: start,
                    block_table: &seq.blocks,
                    logits: if seq.wants_prompt_logits() {
                        LogitsFor::All
                    } else if start + slot.len == seq.tokens.len() {
                        LogitsFor::Last
                    } else {
                        LogitsFor::None
                    },
                }
            })
            .collect();
        if let Some(draws) = draws {
            return Ok(Some(
                self.executor.forward_sampled(&inputs, &draws)?.to_vec(),
            ));
        }
        self.executor.forward(&inputs)?;
        Ok(None)
    }

    /// When the executor can pick tokens where the logits are (a GPU) and no sequence
    /// of the step reports or masks its logits: a draw for each sequence that samples
    /// in this step, in slot order (the order of the logits rows).
    fn device_draws(&mut self, slots: &[Slot]) -> Option<Vec<DeviceDraw>> {
        let on_device = self.executor.samples_on_device()
            && slots
                .iter()
                .all(|slot| self.running[slot.seq].samples_on_device());
        if !on_device {
            return None;
        }
        let mut draws = Vec::with_capacity(slots.len());
        for slot in slots {
            let seq = &mut self.running[slot.seq];
            if seq.num_computed + slot.len == seq.tokens.len() {
                draws.push(seq.device_draw()?);
            }
        }
        Some(draws)
    }

    /// Samples (or takes the `picked` tokens of) every sequence whose prompt is now
    /// computed, and sends the tokens on. Returns the sequences that finished, for
    /// [`Self::retire`].
    fn sample_and_report(&mut self, slots: &[Slot], picked: Option<&[u32]>) -> Vec<Finished> {
        let vocab = self.executor.config().vocab_size;
        let mut logits_row = 0;
        let mut finished = Vec::new();
        for slot in slots {
            let seq = &mut self.running[slot.seq];
            let start = seq.num_computed;
            seq.num_computed += slot.len;
            commit_full_blocks(&mut self.blocks, seq);
            if let Some(picked) = picked {
                if seq.num_computed < seq.tokens.len() {
                    continue;
                }
                logits_row += 1;
                let token = seq.take_device_token(picked[logits_row - 1]);
                if let Some(reason) = seq.accept_token(token, None) {
                    finished.push((seq.id, Ok(reason)));
                }
                continue;
            }
            let logits = self.executor.last_logits();
            let row = if seq.wants_prompt_logits() {
                let rows = &logits[logits_row * vocab..(logits_row + slot.len) * vocab];
                logits_row += slot.len;
                seq.collect_prompt_logprobs(start, rows, vocab);
                if seq.num_computed < seq.tokens.len() {
                    continue;
                }
                seq.send_prompt_logprobs();
                &rows[(slot.len - 1) * vocab..]
            } else {
                if seq.num_computed < seq.tokens.len() {
                    continue;
                }
                logits_row += 1;
                &logits[(logits_row - 1) * vocab..logits_row * vocab]
            };
            let token = match seq.next_token(row) {
                Ok(Some(token)) => token,
                Ok(None) => {
                    finished.push((seq.id, Ok(FinishReason::Stop)));
                    continue;
                }
                Err(error) => {
                    finished.push((seq.id, Err(error.to_string())));
                    continue;
                }
            };
            let logprobs = seq.sampler.logprobs(row, token);
            if let Some(reason) = seq.accept_token(token, logprobs) {
                finished.push((seq.id, Ok(reason)));
            }
        }
        finished
    }

    /// Answers the sequences that finished in a step and frees their blocks.
    fn retire(&mut self, finished: Vec<Finished>) {
        for (id, outcome) in finished {
            if let Some(i) = self.running.iter().position(|s| s.id == id) {
                let seq = self.running.remove(i);
                match outcome {
                    Ok(reason) => self.finish(seq, reason),
                    Err(message) => self.fail(seq, message),
                }
            }
        }
    }

    fn publish_gauges(&mut self) {
        self.steps += 1;
        let prefix = self.blocks.prefix_cache_stats();
        let stats = EngineStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_usage: self.blocks.usage(),
            prefix_cache_queries: prefix.queries,
            prefix_cache_hits: prefix.hits,
            preemptions: self.preemptions,
            steps: self.steps,
        };
        self.stats.store(&stats);
        metrics::gauge!(names::NUM_REQUESTS_RUNNING).set(stats.running as f64);
        metrics::gauge!(names::NUM_REQUESTS_WAITING).set(stats.waiting as f64);
        metrics::gauge!(names::KV_CACHE_USAGE_PERC).set(stats.kv_usage);
        self.publish_prefix_counters();
    }

    /// The step's block events as one batch (none if nothing entered or left the cache).
    fn publish_kv_events(&mut self) {
        let Some(sink) = self.kv_events.as_mut() else {
            return;
        };
        let events = self.blocks.take_events();
        if !events.is_empty() {
            sink.send(events);
        }
    }

    fn publish_prefix_counters(&self) {
        let prefix = self.blocks.prefix_cache_stats();
        metrics::counter!(names::PREFIX_CACHE_QUERIES_TOTAL).absolute(prefix.queries);
        metrics::counter!(names::PREFIX_CACHE_HITS_TOTAL).absolute(prefix.hits);
    }
}

/// Records one part of an engine step's time under the step's kind.
fn record_step_time(kind: &'static str, part: &'static str, took: Duration) {
    metrics::histogram!(names::ENGINE_STEP_SECONDS, names::KIND => kind, names::PART => part)
        .record(took.as_secs_f64());
}

/// Registers the sequence's newly completed blocks in the prefix cache, in one call
/// (one `BlockStored` per run of newly cached blocks). Blocks pulled from a prefill
/// worker are committed here too, once the step after the pull computed the last
/// prompt token, so they are announced like local ones.
fn commit_full_blocks(pool: &mut BlockPool, seq: &mut Sequence) {
    let block_size = pool.block_size();
    let full = seq.num_computed / block_size;
    let first = seq.block_hashes.len();
    if first >= full {
        return;
    }
    let parent = seq.block_hashes.last().copied();
    let tokens = &seq.tokens[first * block_size..full * block_size];
    let hashes = pool.commit_full_blocks(&seq.blocks[first..full], parent, tokens);
    seq.block_hashes.extend(hashes);
}
