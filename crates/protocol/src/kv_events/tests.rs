use serde_json::Value;

use super::*;

/// Real vLLM 0.26.0's published messages (`shared/fixtures/vllm-0.26/`, kept in
/// `crates/protocol/tests/fixtures/`); a missing file
/// fails the tests that read it.
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/vllm-0.26/kv_events.jsonl"
);

#[derive(serde::Deserialize)]
struct Recorded {
    nparts: usize,
    topic: String,
    seq: u64,
    payload_hex: String,
    decoded: Value,
}

/// Each line of the fixture, with the line's text (for the exact `ts`).
fn recordings() -> Vec<(String, Recorded)> {
    let text = std::fs::read_to_string(FIXTURE)
        .unwrap_or_else(|e| panic!("the vLLM 0.26 fixture {FIXTURE} is required: {e}"));
    let lines: Vec<(String, Recorded)> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            (
                line.to_owned(),
                serde_json::from_str(line).expect("a fixture line"),
            )
        })
        .collect();
    assert!(!lines.is_empty(), "{FIXTURE} has no recording");
    lines
}

fn unhex(hex: &str) -> Vec<u8> {
    let digits: Vec<u8> = hex.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(digits.len().is_multiple_of(2), "odd hex length");
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

/// msgpack fixstr: `0xa0 | len`, then the UTF-8 bytes (strings under 32 bytes).
fn fixstr(s: &str) -> Vec<u8> {
    assert!(s.len() < 32);
    let mut out = vec![0xa0 | s.len() as u8];
    out.extend_from_slice(s.as_bytes());
    out
}

/// Concatenates byte pieces.
fn bytes(pieces: &[&[u8]]) -> Vec<u8> {
    pieces.concat()
}

/// The `ts` as the fixture line writes it (Python's shortest repr), parsed exactly:
/// serde_json's default float parsing may be one ulp off.
fn recorded_ts(line: &str) -> f64 {
    let start = line.find("\"decoded\": [").expect("a decoded batch") + "\"decoded\": [".len();
    let text = &line[start..];
    let end = text.find(',').expect("ts ends with a comma");
    text[..end].trim().parse().expect("ts is a float")
}

// --- the recording -----------------------------------------------------------------

#[test]
fn every_recorded_payload_decodes_to_its_decoded_form() {
    for (line, rec) in recordings() {
        let batch = decode_batch(&unhex(&rec.payload_hex)).expect("a recorded payload decodes");
        assert_eq!(
            batch.ts.to_bits(),
            recorded_ts(&line).to_bits(),
            "seq {}",
            rec.seq
        );
        let mut ours = serde_json::to_value(&batch).unwrap();
        let mut theirs = rec.decoded.clone();
        ours[0] = Value::Null;
        theirs[0] = Value::Null;
        assert_eq!(ours, theirs, "seq {}", rec.seq);
    }
}

#[test]
fn every_recorded_payload_re_encodes_byte_for_byte() {
    for (_, rec) in recordings() {
        let payload = unhex(&rec.payload_hex);
        let batch = decode_batch(&payload).unwrap();
        assert_eq!(encode_batch(&batch).unwrap(), payload, "seq {}", rec.seq);
    }
}

#[test]
fn every_recorded_message_frames_as_vllm_sent_it() {
    for (_, rec) in recordings() {
        assert_eq!(rec.nparts, 3);
        let payload = unhex(&rec.payload_hex);
        let seq = rec.seq.to_be_bytes();
        let parts: [&[u8]; 3] = [rec.topic.as_bytes(), &seq, &payload];
        let message = decode_message(&parts).unwrap();
        assert_eq!(
            (message.topic.as_str(), message.seq),
            (rec.topic.as_str(), rec.seq)
        );
        let encoded = encode_message(&message.topic, message.seq, &message.batch).unwrap();
        assert_eq!(encoded, parts.map(<[u8]>::to_vec));
    }
}

#[test]
fn the_first_recorded_batch_has_the_expected_fields() {
    let (_, rec) = recordings().swap_remove(0);
    let batch = decode_batch(&unhex(&rec.payload_hex)).unwrap();
    let mut token_ids = vec![128000];
    token_ids.extend(100..=130);
    let expected = BlockStored {
        block_hashes: vec![15772197666381361208, 5317438815361777962],
        parent_block_hash: None,
        token_ids,
        block_size: 16,
        lora_id: None,
        medium: Some("GPU".into()),
        lora_name: None,
        extra_keys: Some(vec![None, None]),
        group_idx: Some(0),
        kv_cache_spec_kind: Some("full_attention".into()),
        kv_cache_spec_sliding_window: None,
    };
    assert_eq!(batch.events, vec![KvEvent::BlockStored(expected)]);
    assert_eq!(batch.data_parallel_rank, Some(0));
}

// --- hand-built events against bytes derived from msgspec's rules -------------------
//
// msgspec writes the batch (array_like) as a 3-element array, every element present;
// an event (tag=True, omit_defaults=True) as a map: "type" and the class name first,
// then each field in declaration order, a field whose default is None left out while
// None, a field without a default always written (nil included). Integers take their
// smallest form by value (positive fixint 00-7f, cc u8, cd u16, ce u32, cf u64;
// negative fixint e0-ff), floats are float64 (cb), bytes are bin (c4 len), strings
// fixstr (a0|len) under 32 bytes.

#[test]
fn block_removed_and_all_blocks_cleared_encode_as_msgspec_does() {
    let batch = KvEventBatch {
        ts: 1.5,
        events: vec![
            KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![1, u64::MAX],
                medium: Some("GPU".into()),
                group_idx: Some(0),
            }),
            KvEvent::AllBlocksCleared,
        ],
        data_parallel_rank: Some(0),
    };
    let expected = bytes(&[
        &[0x93],                       // [ts, events, rank]
        &unhex("cb 3ff8000000000000"), // 1.5 as float64
        &[0x92],                       // two events
        &[0x84],                       // {4 keys}: group_idx is set
        &fixstr("type"),
        &fixstr("BlockRemoved"),
        &fixstr("block_hashes"),
        &unhex("92 01 cf ffffffffffffffff"), // [1 (fixint), 2^64-1 (uint64)]
        &fixstr("medium"),
        &fixstr("GPU"),
        &fixstr("group_idx"),
        &[0x00],
        &[0x81], // {1 key}: AllBlocksCleared has no fields
        &fixstr("type"),
        &fixstr("AllBlocksCleared"),
        &[0x00], // data_parallel_rank 0
    ]);
    assert_eq!(encode_batch(&batch).unwrap(), expected);
    assert_eq!(decode_batch(&expected).unwrap(), batch);
}

#[test]
fn defaults_are_omitted_and_nil_without_a_default_is_written() {
    let batch = KvEventBatch {
        ts: 0.0,
        events: vec![KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: vec![],
            medium: None,
            group_idx: None,
        })],
        data_parallel_rank: None,
    };
    let expected = bytes(&[
        &[0x93],
        &unhex("cb 0000000000000000"),
        &[0x91],
        &[0x83], // {3 keys}: group_idx (default None) left out
        &fixstr("type"),
        &fixstr("BlockRemoved"),
        &fixstr("block_hashes"),
        &[0x90], // []
        &fixstr("medium"),
        &[0xc0], // medium has no default: nil is written
        &[0xc0], // the batch is array-like: its defaulted rank is written too
    ]);
    assert_eq!(encode_batch(&batch).unwrap(), expected);
    assert_eq!(decode_batch(&expected).unwrap(), batch);
}

fn full_block_stored() -> BlockStored {
    BlockStored {
        block_hashes: vec![7, 1 << 32],
        parent_block_hash: Some(300),
        token_ids: vec![0, 127, 128, 255, 256, 65535, 65536],
        block_size: 16,
        lora_id: Some(1),
        medium: Some("CPU".into()),
        lora_name: Some("sql-lora".into()),
        extra_keys: Some(vec![
            Some(vec![
                AnyValue::Str("sql-lora".into()),
                AnyValue::UInt(3),
                AnyValue::Int(-1),
                AnyValue::Bin(vec![0xab]),
            ]),
            None,
        ]),
        group_idx: Some(1),
        kv_cache_spec_kind: Some("sliding_window".into()),
        kv_cache_spec_sliding_window: Some(4096),
    }
}

#[test]
fn block_stored_with_every_field_encodes_as_msgspec_does() {
    let batch = KvEventBatch {
        ts: 1.5,
        events: vec![KvEvent::BlockStored(full_block_stored())],
        data_parallel_rank: Some(2),
    };
    let expected = bytes(&[
        &unhex("93 cb 3ff8000000000000 91"),
        &[0x8c], // {12 keys}: the tag and all 11 fields
        &fixstr("type"),
        &fixstr("BlockStored"),
        &fixstr("block_hashes"),
        &unhex("92 07 cf 0000000100000000"), // a small hash is a fixint
        &fixstr("parent_block_hash"),
        &unhex("cd 012c"), // 300
        &fixstr("token_ids"),
        &unhex("97 00 7f cc80 ccff cd0100 cdffff ce00010000"),
        &fixstr("block_size"),
        &[0x10],
        &fixstr("lora_id"),
        &[0x01],
        &fixstr("medium"),
        &fixstr("CPU"),
        &fixstr("lora_name"),
        &fixstr("sql-lora"),
        &fixstr("extra_keys"),
        &[0x92, 0x94], // [("sql-lora", 3, -1, b"\xab"), None]
        &fixstr("sql-lora"),
        &unhex("03 ff c4 01 ab c0"),
        &fixstr("group_idx"),
        &[0x01],
        &fixstr("kv_cache_spec_kind"),
        &fixstr("sliding_window"),
        &fixstr("kv_cache_spec_sliding_window"),
        &unhex("cd 1000"), // 4096
        &[0x02],           // data_parallel_rank
    ]);
    assert_eq!(encode_batch(&batch).unwrap(), expected);
    assert_eq!(decode_batch(&expected).unwrap(), batch);
}

// --- msgspec's decoding rules -------------------------------------------------------

/// A one-event batch `[1.5, [event], 0]` around the bytes of an event map.
fn batch_of(event: &[u8]) -> Vec<u8> {
    bytes(&[&unhex("93 cb 3ff8000000000000 91"), event, &[0x00]])
}

fn removed_one(medium: Option<&str>) -> KvEventBatch {
    KvEventBatch {
        ts: 1.5,
        events: vec![KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: vec![1],
            medium: medium.map(str::to_owned),
            group_idx: None,
        })],
        data_parallel_rank: Some(0),
    }
}

#[test]
fn unknown_keys_and_other_types_fields_are_ignored() {
    let event = bytes(&[
        &[0x85],
        &fixstr("type"),
        &fixstr("BlockRemoved"),
        &fixstr("block_hashes"),
        &[0x91, 0x01],
        &fixstr("future_field"),
        &[0x81, 0x01, 0x92, 0xc0, 0xc3], // {1: [nil, true]}
        &fixstr("token_ids"),            // BlockStored's, not BlockRemoved's
        &fixstr("not ints"),
        &fixstr("medium"),
        &fixstr("GPU"),
    ]);
    assert_eq!(
        decode_batch(&batch_of(&event)).unwrap(),
        removed_one(Some("GPU"))
    );
}

#[test]
fn the_tag_may_come_last() {
    let event = bytes(&[
        &[0x83],
        &fixstr("block_hashes"),
        &[0x91, 0x01],
        &fixstr("medium"),
        &[0xc0],
        &fixstr("type"),
        &fixstr("BlockRemoved"),
    ]);
    assert_eq!(decode_batch(&batch_of(&event)).unwrap(), removed_one(None));
}

#[test]
fn a_repeated_key_keeps_its_last_value() {
    let event = bytes(&[
        &[0x84],
        &fixstr("type"),
        &fixstr("BlockRemoved"),
        &fixstr("medium"),
        &fixstr("CPU"),
        &fixstr("block_hashes"),
        &[0x91, 0x01],
        &fixstr("medium"),
        &fixstr("GPU"),
    ]);
    assert_eq!(
        decode_batch(&batch_of(&event)).unwrap(),
        removed_one(Some("GPU"))
    );
}

#[test]
fn the_batch_takes_a_missing_rank_and_skips_extra_elements() {
    let short = unhex("92 cb 3ff8000000000000 90");
    let batch = decode_batch(&short).unwrap();
    assert_eq!((batch.events.len(), batch.data_parallel_rank), (0, None));
    let long = unhex("95 cb 3ff8000000000000 90 03 a1 78 92 c0 c0");
    assert_eq!(decode_batch(&long).unwrap().data_parallel_rank, Some(3));
    // msgspec takes any number for a float: a float32 or an integer `ts`.
    assert_eq!(
        decode_batch(&unhex("93 ca 3fc00000 90 00")).unwrap().ts,
        1.5
    );
    assert_eq!(decode_batch(&unhex("93 01 90 00")).unwrap().ts, 1.0);
}

/// Asserts that decoding fails as malformed, for a reason whose text has `reason`.
fn assert_malformed(payload: &[u8], reason: &str) {
    match decode_batch(payload) {
        Err(KvEventError::Malformed(e)) if e.to_string().contains(reason) => {}
        other => panic!("expected Malformed ({reason}), got {other:?}"),
    }
}

#[test]
fn unknown_or_missing_or_conflicting_tags_are_refused() {
    let unknown = bytes(&[&[0x81], &fixstr("type"), &fixstr("BlockMoved")]);
    assert_malformed(&batch_of(&unknown), "unknown variant `BlockMoved`");
    let untagged = bytes(&[&[0x81], &fixstr("block_hashes"), &[0x90]]);
    assert_malformed(&batch_of(&untagged), "missing field `type`");
    let tag_not_a_string = bytes(&[&[0x81], &fixstr("type"), &[0x01]]);
    assert_malformed(
        &batch_of(&tag_not_a_string),
        "expected a KV event type name",
    );
    let two_tags = bytes(&[
        &[0x82],
        &fixstr("type"),
        &fixstr("AllBlocksCleared"),
        &fixstr("type"),
        &fixstr("BlockRemoved"),
    ]);
    assert_malformed(&batch_of(&two_tags), "two different event `type` tags");
}

#[test]
fn a_missing_field_without_a_default_is_refused_even_if_nullable() {
    let mut event = full_block_stored();
    event.lora_id = None;
    let mut payload = encode_batch(&KvEventBatch {
        ts: 1.5,
        events: vec![KvEvent::BlockStored(event)],
        data_parallel_rank: Some(0),
    })
    .unwrap();
    // Rename the key "lora_id" to "lora_xx": an unknown key, and lora_id is missing.
    let at = payload.windows(7).position(|w| w == b"lora_id").unwrap();
    payload[at + 5..at + 7].copy_from_slice(b"xx");
    let err = decode_batch(&payload).unwrap_err();
    assert!(err.to_string().contains("lora_id"), "{err}");
}

#[test]
fn positional_events_of_older_vllm_and_a_map_batch_are_refused() {
    let positional = bytes(&[&[0x91], &fixstr("AllBlocksCleared")]);
    assert_malformed(
        &batch_of(&positional),
        "invalid type: sequence, expected a KV event map",
    );
    let map_batch = bytes(&[&[0x81], &fixstr("ts"), &unhex("cb 3ff8000000000000")]);
    assert_malformed(
        &map_batch,
        "invalid type: map, expected a KVEventBatch array",
    );
}

// --- hostile input ------------------------------------------------------------------

#[test]
fn wrong_types_are_refused() {
    let removed = |hashes: &[u8]| {
        batch_of(&bytes(&[
            &[0x83],
            &fixstr("type"),
            &fixstr("BlockRemoved"),
            &fixstr("block_hashes"),
            hashes,
            &fixstr("medium"),
            &[0xc0],
        ]))
    };
    assert!(decode_batch(&removed(&[0x91, 0x01])).is_ok());
    assert_malformed(&removed(&[0x91, 0xa1, b'1']), "FixStr");
    assert_malformed(&removed(&[0x91, 0xff]), "integer `-1`, expected u64");
    assert_malformed(&removed(&unhex("91 c4 02 abcd")), "Bin8");
    assert_malformed(&removed(&[0x01]), "expected a sequence");
    assert_malformed(&unhex("93 a1 31 90 00"), "FixStr");
    assert_malformed(
        &unhex("93 cb 3ff8000000000000 01 00"),
        "expected a sequence",
    );
    assert_malformed(
        &unhex("93 cb 3ff8000000000000 90 ff"),
        "integer `-1`, expected u32",
    );

    let mut stored = full_block_stored();
    stored.token_ids = vec![1];
    let payload = encode_batch(&KvEventBatch {
        ts: 1.5,
        events: vec![KvEvent::BlockStored(stored)],
        data_parallel_rank: Some(0),
    })
    .unwrap();
    // token_ids [1] → [2^32], over u32.
    let at = payload
        .windows(10)
        .position(|w| w == b"\xa9token_ids")
        .unwrap()
        + 10;
    assert_eq!(&payload[at..at + 2], &[0x91, 0x01]);
    let too_big = bytes(&[
        &payload[..at + 1],
        &unhex("cf 0000000100000000"),
        &payload[at + 2..],
    ]);
    assert_malformed(&too_big, "integer `4294967296`, expected u32");
}

#[test]
fn garbage_and_trailing_bytes_are_refused() {
    assert_malformed(b"", "failed to fill whole buffer");
    assert_malformed(&[0xc1], "Reserved");
    assert_malformed(b"hello, world", "expected a KVEventBatch array");
    let mut trailing = batch_of(&bytes(&[
        &[0x81],
        &fixstr("type"),
        &fixstr("AllBlocksCleared"),
    ]));
    trailing.push(0x00);
    assert!(matches!(
        decode_batch(&trailing),
        Err(KvEventError::TrailingBytes(1))
    ));
}

#[test]
fn pseudo_random_bytes_never_panic() {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let len = (next() % 64) as usize;
        // Half start like a batch, to reach the event decoder.
        let mut payload = match next() % 2 {
            0 => unhex("93 cb 3ff8000000000000 91"),
            _ => Vec::new(),
        };
        payload.extend((0..len).map(|_| next() as u8));
        let _ = decode_batch(&payload);
    }
}

#[test]
fn every_truncation_of_a_recorded_payload_is_refused() {
    for (_, rec) in recordings() {
        let payload = unhex(&rec.payload_hex);
        for len in 0..payload.len() {
            assert_malformed(&payload[..len], "IO error while reading");
        }
    }
}

#[test]
fn oversized_payloads_are_refused_unread() {
    let huge = vec![0xc1; MAX_BATCH_BYTES + 1];
    let err = decode_batch(&huge).unwrap_err();
    assert!(matches!(err, KvEventError::TooLarge { len, limit }
        if len == MAX_BATCH_BYTES + 1 && limit == MAX_BATCH_BYTES));
    let (_, rec) = recordings().swap_remove(0);
    let payload = unhex(&rec.payload_hex);
    assert!(decode_batch_limited(&payload, payload.len()).is_ok());
    assert!(matches!(
        decode_batch_limited(&payload, payload.len() - 1),
        Err(KvEventError::TooLarge { .. })
    ));
}

#[test]
fn lengths_claimed_beyond_the_payload_are_refused() {
    // events: an array32 of 2^32-1 events, then nothing.
    assert_malformed(
        &unhex("93 cb 3ff8000000000000 dd ffffffff"),
        "IO error while reading",
    );
    // a str32 key of 2^32-1 bytes.
    assert_malformed(
        &batch_of(&unhex("81 db ffffffff")),
        "unexpected end of file",
    );
    // extra_keys entries: a map32 of 2^32-1 entries.
    let event = bytes(&[
        &[0x82],
        &fixstr("type"),
        &fixstr("BlockStored"),
        &fixstr("extra_keys"),
    ]);
    assert_malformed(
        &batch_of(&bytes(&[&event, &unhex("91 91 df ffffffff")])),
        "IO error while reading",
    );
}

#[test]
fn deep_nesting_is_refused_without_exhausting_the_stack() {
    let event = bytes(&[
        &[0x82],
        &fixstr("type"),
        &fixstr("BlockStored"),
        &fixstr("extra_keys"),
    ]);
    let deep = bytes(&[&event, &vec![0x91; 100_000], &[0xc0]]);
    assert_malformed(&batch_of(&deep), "depth limit exceeded");
    let shallow = bytes(&[&event, &[0x91; 8], &[0xc0]]);
    let err = decode_batch(&batch_of(&shallow)).unwrap_err();
    // Not the depth: the event lacks its required fields.
    assert!(err.to_string().contains("missing field"), "{err}");
}

#[test]
fn extension_types_are_refused() {
    let event = bytes(&[
        &[0x82],
        &fixstr("type"),
        &fixstr("BlockStored"),
        &fixstr("extra_keys"),
    ]);
    assert_malformed(
        &batch_of(&bytes(&[&event, &unhex("91 91 d4 01 00")])),
        "expected a msgpack value other than an extension type",
    );
}

// --- framing ------------------------------------------------------------------------

fn cleared() -> KvEventBatch {
    KvEventBatch {
        ts: 2.0,
        events: vec![KvEvent::AllBlocksCleared],
        data_parallel_rank: Some(1),
    }
}

#[test]
fn messages_are_topic_big_endian_seq_and_payload() {
    let [topic, seq, payload] = encode_message("kv-events", 258, &cleared()).unwrap();
    assert_eq!(topic, b"kv-events");
    assert_eq!(seq, [0, 0, 0, 0, 0, 0, 1, 2]);
    assert_eq!(payload, encode_batch(&cleared()).unwrap());
    let message = decode_message(&[&topic, &seq, &payload]).unwrap();
    assert_eq!(
        message,
        KvEventMessage {
            topic: "kv-events".into(),
            seq: 258,
            batch: cleared()
        }
    );
    // vLLM's default topic is empty.
    let [empty, _, _] = encode_message("", 0, &cleared()).unwrap();
    assert!(empty.is_empty());
}

#[test]
fn malformed_frames_are_refused() {
    let frames = encode_message("kv-events", 7, &cleared()).unwrap();
    let [topic, seq, payload] = [&frames[0][..], &frames[1][..], &frames[2][..]];
    for parts in [
        vec![],
        vec![topic],
        vec![topic, seq],
        vec![topic, seq, payload, payload],
    ] {
        let err = decode_message(&parts).unwrap_err();
        assert!(
            matches!(err, KvEventError::PartCount(n) if n == parts.len()),
            "{err}"
        );
    }
    for bad_seq in [&seq[..7], &[0u8; 9][..], &[][..]] {
        let err = decode_message(&[topic, bad_seq, payload]).unwrap_err();
        assert!(
            matches!(err, KvEventError::SeqLength(n) if n == bad_seq.len()),
            "{err}"
        );
    }
    let err = decode_message(&[&[0xff, 0xfe], seq, payload]).unwrap_err();
    assert!(matches!(err, KvEventError::TopicNotUtf8));
    let err = decode_message(&[topic, seq, &[0xc1]]).unwrap_err();
    assert!(matches!(err, KvEventError::Malformed(_)));
    assert_eq!(decode_seq(&u64::MAX.to_be_bytes()).unwrap(), u64::MAX);
}
