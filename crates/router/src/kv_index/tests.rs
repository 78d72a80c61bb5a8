use tandem_protocol::kv_events::{BlockRemoved, BlockStored, KvEvent, KvEventBatch, decode_batch};

use super::*;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../protocol/tests/fixtures/vllm-0.26/kv_events.jsonl"
);

const A: WorkerId = WorkerId(1);
const B: WorkerId = WorkerId(2);

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The recording's (seq, batch) pairs, decoded from their payloads.
fn fixture() -> Vec<(u64, KvEventBatch)> {
    let text = std::fs::read_to_string(FIXTURE).expect("fixture");
    text.lines()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).expect("json");
            let seq = record["seq"].as_u64().expect("seq");
            let payload = hex(record["payload_hex"].as_str().expect("payload_hex"));
            (seq, decode_batch(&payload).expect("decodes"))
        })
        .collect()
}

fn stored_events(batches: &[(u64, KvEventBatch)]) -> Vec<&BlockStored> {
    batches
        .iter()
        .flat_map(|(_, batch)| &batch.events)
        .filter_map(|event| match event {
            KvEvent::BlockStored(stored) => Some(stored),
            _ => None,
        })
        .collect()
}

/// The recorded prompts: the token ids concatenated along each chain (a run without
/// a parent starts a prompt, a run with one continues the last).
fn recorded_prompts(batches: &[(u64, KvEventBatch)]) -> Vec<Vec<u32>> {
    let mut prompts: Vec<Vec<u32>> = Vec::new();
    for stored in stored_events(batches) {
        match (stored.parent_block_hash, prompts.last_mut()) {
            (Some(_), Some(prompt)) => prompt.extend(&stored.token_ids),
            _ => prompts.push(stored.token_ids.clone()),
        }
    }
    prompts
}

fn ingest(index: &mut KvIndex, worker: WorkerId, batches: &[(u64, KvEventBatch)]) {
    for (seq, batch) in batches {
        assert_eq!(index.apply(worker, *seq, batch), ApplyOutcome::Applied);
    }
}

fn batch(events: Vec<KvEvent>) -> KvEventBatch {
    KvEventBatch {
        ts: 0.0,
        events,
        data_parallel_rank: Some(0),
    }
}

fn stored(hashes: &[u64], parent: Option<u64>, tokens: Vec<u32>, block_size: u32) -> KvEvent {
    KvEvent::BlockStored(BlockStored::new(
        hashes.to_vec(),
        parent,
        tokens,
        block_size,
        "GPU",
    ))
}

fn removed(hashes: &[u64]) -> KvEvent {
    KvEvent::BlockRemoved(BlockRemoved {
        block_hashes: hashes.to_vec(),
        medium: Some("GPU".into()),
        group_idx: Some(0),
    })
}

/// Tokens `start..start + blocks × 4`, for blocks of 4.
fn tokens(start: u32, blocks: u32) -> Vec<u32> {
    (start..start + blocks * 4).collect()
}

#[test]
fn the_recording_is_indexed_whole() {
    let batches = fixture();
    assert_eq!(batches.len(), 5);
    let mut index = KvIndex::new(1000);
    ingest(&mut index, A, &batches);
    assert_eq!(index.entries(), 11);
    assert_eq!(index.distinct_blocks(), 11);
    let prompts = recorded_prompts(&batches);
    let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
    assert_eq!(lengths, [80, 48, 48]);
    for prompt in &prompts {
        let keys = prompt_keys(prompt, 16);
        assert_eq!(keys.len(), prompt.len() / 16);
        assert_eq!(index.overlap(&keys), HashMap::from([(A, keys.len())]));
    }
    assert_eq!(index.counters().batches_applied, 5);
    assert_eq!(index.counters().stored_unknown_parent, 0);
    assert!(!index.is_stale(A));
}

#[test]
fn a_longer_prompt_matches_its_cached_prefix_and_a_partial_block_is_ignored() {
    let batches = fixture();
    let mut index = KvIndex::new(1000);
    ingest(&mut index, A, &batches);
    let mut prompt = recorded_prompts(&batches)[0].clone();
    prompt.extend(9000..9040); // two more full blocks and a partial one
    let keys = prompt_keys(&prompt, 16);
    assert_eq!(keys.len(), 7);
    assert_eq!(index.overlap(&keys), HashMap::from([(A, 5)]));
    // A different first block matches nothing.
    prompt[0] = 1;
    assert!(index.overlap(&prompt_keys(&prompt, 16)).is_empty());
}

#[test]
fn a_second_worker_with_a_prefix_only() {
    let batches = fixture();
    let mut index = KvIndex::new(1000);
    ingest(&mut index, A, &batches);
    // B received only the first message (2 of the first prompt's 5 blocks), under its
    // own engine hashes: the router keys agree since they come from the tokens.
    let KvEvent::BlockStored(first) = &batches[0].1.events[0] else {
        panic!("the first event stores blocks");
    };
    let mut other = first.clone();
    other.block_hashes = vec![11, 12];
    assert_eq!(
        index.apply(B, 0, &batch(vec![KvEvent::BlockStored(other)])),
        ApplyOutcome::Applied
    );
    let keys = prompt_keys(&recorded_prompts(&batches)[0], 16);
    assert_eq!(index.overlap(&keys), HashMap::from([(A, 5), (B, 2)]));
    assert_eq!(index.distinct_blocks(), 11);
    assert_eq!(index.entries(), 13);
}

#[test]
fn a_removed_block_in_the_middle_stops_the_overlap_there() {
    let batches = fixture();
    let mut index = KvIndex::new(1000);
    ingest(&mut index, A, &batches);
    let KvEvent::BlockStored(second) = &batches[1].1.events[0] else {
        panic!("the second event stores blocks");
    };
    // The first prompt's 4th block (the second of message 1).
    let middle = second.block_hashes[1];
    assert_eq!(
        index.apply(A, 5, &batch(vec![removed(&[middle])])),
        ApplyOutcome::Applied
    );
    let keys = prompt_keys(&recorded_prompts(&batches)[0], 16);
    assert_eq!(index.overlap(&keys), HashMap::from([(A, 3)]));
    assert_eq!(index.entries(), 10);
    // Removing it again, or a hash never stored, is counted and harmless.
    index.apply(A, 6, &batch(vec![removed(&[middle, 42])]));
    assert_eq!(index.counters().removed_unknown, 2);
    assert_eq!(index.entries(), 10);
}

#[test]
fn all_blocks_cleared_forgets_the_worker_only() {
    let batches = fixture();
    let mut index = KvIndex::new(1000);
    ingest(&mut index, A, &batches);
    ingest(&mut index, B, &batches);
    assert_eq!(index.entries(), 22);
    index.apply(A, 5, &batch(vec![KvEvent::AllBlocksCleared]));
    assert_eq!(index.worker_blocks(A), 0);
    assert_eq!(index.entries(), 11);
    let keys = prompt_keys(&recorded_prompts(&batches)[0], 16);
    assert_eq!(index.overlap(&keys), HashMap::from([(B, 5)]));
    assert_eq!(index.last_seq(A), Some(5));
    index.apply(B, 5, &batch(vec![KvEvent::AllBlocksCleared]));
    assert!(index.overlap(&keys).is_empty());
    assert_eq!(index.distinct_blocks(), 0);
}

#[test]
fn gaps_and_duplicates_are_detected() {
    let mut index = KvIndex::new(1000);
    let empty = batch(vec![]);
    assert_eq!(index.apply(A, 7, &empty), ApplyOutcome::Applied);
    assert_eq!(index.apply(A, 8, &empty), ApplyOutcome::Applied);
    assert_eq!(index.apply(A, 8, &empty), ApplyOutcome::Duplicate);
    assert_eq!(index.apply(A, 3, &empty), ApplyOutcome::Duplicate);
    assert!(!index.is_stale(A));
    let gapped = batch(vec![stored(&[1], None, tokens(0, 1), 4)]);
    assert_eq!(
        index.apply(A, 11, &gapped),
        ApplyOutcome::Gap {
            expected: 9,
            got: 11
        }
    );
    // Applied anyway, and the worker marked stale until reset.
    assert_eq!(index.worker_blocks(A), 1);
    assert!(index.is_stale(A));
    assert_eq!(index.apply(A, 12, &empty), ApplyOutcome::Applied);
    assert!(index.is_stale(A));
    let counters = index.counters();
    assert_eq!(
        (
            counters.batches_applied,
            counters.batches_duplicate,
            counters.gaps
        ),
        (4, 2, 1)
    );
    index.reset(A);
    assert!(!index.is_stale(A));
    assert_eq!(index.last_seq(A), None);
    assert_eq!(index.worker_blocks(A), 0);
    // After a reset (an engine restart), numbering starts again from anything.
    assert_eq!(index.apply(A, 0, &empty), ApplyOutcome::Applied);
}

#[test]
fn a_duplicate_is_not_applied() {
    let mut index = KvIndex::new(1000);
    index.apply(A, 0, &batch(vec![stored(&[1], None, tokens(0, 1), 4)]));
    index.apply(A, 0, &batch(vec![stored(&[2], None, tokens(100, 1), 4)]));
    assert_eq!(index.worker_blocks(A), 1);
}

#[test]
fn an_unknown_parent_is_dropped_and_counted() {
    let mut index = KvIndex::new(1000);
    let orphan = batch(vec![stored(&[2, 3], Some(99), tokens(4, 2), 4)]);
    assert_eq!(index.apply(A, 0, &orphan), ApplyOutcome::Applied);
    assert_eq!(index.entries(), 0);
    assert_eq!(index.counters().stored_unknown_parent, 1);
    // A parent known to another worker does not count.
    index.apply(B, 0, &batch(vec![stored(&[99], None, tokens(0, 1), 4)]));
    index.apply(A, 1, &orphan);
    assert_eq!(index.counters().stored_unknown_parent, 2);
    assert_eq!(index.worker_blocks(A), 0);
}

#[test]
fn a_mismatched_token_count_is_refused() {
    let mut index = KvIndex::new(1000);
    let mut short = tokens(0, 2);
    short.pop();
    index.apply(A, 0, &batch(vec![stored(&[1, 2], None, short, 4)]));
    index.apply(A, 1, &batch(vec![stored(&[1], None, tokens(0, 2), 4)]));
    assert_eq!(index.counters().stored_token_mismatch, 2);
    assert_eq!(index.entries(), 0);
    // The batch's other events still apply.
    index.apply(
        A,
        2,
        &batch(vec![
            stored(&[1], None, tokens(0, 2), 4),
            stored(&[1], None, tokens(0, 1), 4),
        ]),
    );
    assert_eq!(index.entries(), 1);
}

#[test]
fn the_cap_bounds_the_index() {
    let mut index = KvIndex::new(3);
    index.apply(A, 0, &batch(vec![stored(&[1, 2], None, tokens(0, 2), 4)]));
    index.apply(B, 0, &batch(vec![stored(&[1, 2], None, tokens(0, 2), 4)]));
    // B stored its first block only; the run is cut, never holed.
    assert_eq!(index.entries(), 3);
    assert_eq!(index.counters().blocks_refused_over_cap, 1);
    let keys = prompt_keys(&tokens(0, 2), 4);
    assert_eq!(index.overlap(&keys), HashMap::from([(A, 2), (B, 1)]));
    // B's next block has no parent now: dropped as unknown.
    index.apply(B, 1, &batch(vec![stored(&[3], Some(2), tokens(8, 1), 4)]));
    assert_eq!(index.counters().stored_unknown_parent, 1);
    // Room comes back when a worker evicts.
    index.apply(A, 1, &batch(vec![removed(&[2])]));
    index.apply(B, 2, &batch(vec![stored(&[2], Some(1), tokens(4, 1), 4)]));
    assert_eq!(index.overlap(&keys), HashMap::from([(A, 1), (B, 2)]));
    assert_eq!(index.entries(), 3);
    // And when a worker leaves.
    index.remove_worker(B);
    assert_eq!(index.entries(), 1);
    assert_eq!(index.overlap(&keys), HashMap::from([(A, 1)]));
}

#[test]
fn hostile_block_sizes_are_refused_without_panicking() {
    let mut index = KvIndex::new(1000);
    index.apply(A, 0, &batch(vec![stored(&[1], None, vec![], 0)]));
    index.apply(A, 1, &batch(vec![stored(&[], None, vec![1, 2], 0)]));
    assert_eq!(index.counters().stored_zero_block_size, 2);
    index.apply(
        A,
        2,
        &batch(vec![stored(&[1], None, tokens(0, 1), u32::MAX)]),
    );
    let many = vec![0; 1 << 16];
    index.apply(
        A,
        3,
        &batch(vec![stored(&many, None, tokens(0, 1), u32::MAX)]),
    );
    assert_eq!(index.counters().stored_token_mismatch, 2);
    assert_eq!(index.entries(), 0);
    assert!(prompt_keys(&tokens(0, 2), 0).is_empty());
    assert!(prompt_keys(&tokens(0, 2), usize::MAX).is_empty());
}

#[test]
fn engine_hashes_sharing_tokens_are_counted_apart() {
    // Two KV-cache groups store the same tokens under different engine hashes.
    let mut index = KvIndex::new(1000);
    index.apply(
        A,
        0,
        &batch(vec![
            stored(&[1], None, tokens(0, 1), 4),
            stored(&[2], None, tokens(0, 1), 4),
        ]),
    );
    assert_eq!((index.entries(), index.distinct_blocks()), (2, 1));
    let keys = prompt_keys(&tokens(0, 1), 4);
    index.apply(A, 1, &batch(vec![removed(&[1])]));
    assert_eq!(index.overlap(&keys), HashMap::from([(A, 1)]));
    index.apply(A, 2, &batch(vec![removed(&[2])]));
    assert!(index.overlap(&keys).is_empty());
    assert_eq!((index.entries(), index.distinct_blocks()), (0, 0));
}

#[test]
fn keys_chain_over_the_whole_prefix() {
    let a = prompt_keys(&[1, 2, 3, 4, 5, 6, 7, 8], 4);
    let b = prompt_keys(&[9, 9, 9, 9, 5, 6, 7, 8], 4);
    assert_eq!(a.len(), 2);
    assert_ne!(a[0], b[0]);
    // Same second block, different prefix: different key.
    assert_ne!(a[1], b[1]);
    assert_eq!(a, prompt_keys(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4));
    assert!(prompt_keys(&[], 4).is_empty());
    assert!(KvIndex::new(10).overlap(&[]).is_empty());
}
