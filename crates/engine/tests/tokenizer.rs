//! The tokenizer against llama.cpp's reference ids for the default model, plus small
//! tokenizers the tests write themselves (a byte-level BPE `tokenizer.json`, and GGUF
//! metadata for byte-level and SentencePiece vocabularies) and the load errors.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use serde_json::json;
use tandem_engine::ModelError;
use tandem_engine::tokenizer::{IncrementalDecoder, TokenBytes, Tokenizer};

fn smollm() -> Option<Tokenizer> {
    let path = common::default_model()?;
    Some(Tokenizer::from_gguf_file(&path).expect("default model's tokenizer loads"))
}

/// `(text, llama.cpp ids)` for every tokenizer case in the fixture.
fn fixture_cases() -> Vec<(String, Vec<u32>)> {
    let fixture = common::llamacpp_fixture();
    let cases = fixture["tokenizer"].as_array().expect("tokenizer cases");
    cases
        .iter()
        .map(|case| {
            let text = case["text"].as_str().expect("text").to_owned();
            let ids = case["ids"].as_array().expect("ids");
            let ids = ids
                .iter()
                .map(|id| id.as_u64().expect("id") as u32)
                .collect();
            (text, ids)
        })
        .collect()
}

/// Pushes `ids` one by one, returning every chunk (including `finish`'s).
fn stream(decoder: &mut IncrementalDecoder, ids: &[u32]) -> Vec<String> {
    let mut chunks: Vec<String> = ids.iter().filter_map(|&id| decoder.push(id)).collect();
    chunks.extend(decoder.finish());
    chunks
}

#[test]
fn gguf_encoding_matches_llamacpp() {
    let Some(tokenizer) = smollm() else { return };
    for (text, expected) in fixture_cases() {
        let ids = tokenizer.encode(&text, false).expect("encode");
        assert_eq!(ids, expected, "ids for {text:?}");
    }
}

#[test]
fn no_token_stands_for_more_bytes_than_the_bound() {
    let Some(tokenizer) = smollm() else { return };
    let bound = tokenizer
        .max_token_bytes()
        .expect("byte-level BPE bounds the bytes per token");
    let texts = fixture_cases()
        .into_iter()
        .map(|(text, _)| text)
        .chain(["<|im_start|>".to_owned(), " ".repeat(300), "=".repeat(300)])
        .collect::<Vec<_>>();
    for text in texts {
        let ids = tokenizer.encode(&text, false).expect("encode");
        assert!(
            text.len() <= ids.len() * bound,
            "{} bytes in {} tokens of at most {bound} bytes",
            text.len(),
            ids.len()
        );
    }
}

#[test]
fn gguf_decode_inverts_encode() {
    let Some(tokenizer) = smollm() else { return };
    for (text, _) in fixture_cases() {
        let ids = tokenizer.encode(&text, false).expect("encode");
        assert_eq!(tokenizer.decode(&ids, false), text);
    }
}

#[test]
fn gguf_decodes_greedy_generations_like_llamacpp() {
    let Some(tokenizer) = smollm() else { return };
    let fixture = common::llamacpp_fixture();
    for case in fixture["generation"].as_array().expect("generation cases") {
        let ids: Vec<u32> = case["greedy_ids"]
            .as_array()
            .expect("greedy ids")
            .iter()
            .map(|id| id.as_u64().expect("id") as u32)
            .collect();
        let expected = case["greedy_text"].as_str().expect("greedy text");
        assert_eq!(tokenizer.decode(&ids, true), expected);

        let prompt: Vec<u32> = case["prompt_ids"]
            .as_array()
            .expect("prompt ids")
            .iter()
            .map(|id| id.as_u64().expect("id") as u32)
            .collect();
        let mut decoder = IncrementalDecoder::with_context(&tokenizer, &prompt, true);
        assert_eq!(stream(&mut decoder, &ids).concat(), expected);
    }
}

#[test]
fn gguf_incremental_decoding_never_splits_a_character() {
    let Some(tokenizer) = smollm() else { return };
    let (text, ids) = fixture_cases()
        .into_iter()
        .find(|(text, _)| text.contains('🚀') && text.contains('東'))
        .expect("fixture has an emoji and CJK case");
    let mut decoder = tokenizer.incremental_decoder(false);
    let pushed: Vec<Option<String>> = ids.iter().map(|&id| decoder.push(id)).collect();
    assert!(
        pushed.iter().any(Option::is_none),
        "multi-token characters are held back until complete"
    );
    let mut chunks: Vec<String> = pushed.into_iter().flatten().collect();
    chunks.extend(decoder.finish());
    for chunk in &chunks {
        assert!(!chunk.contains('\u{FFFD}'), "broken character in {chunk:?}");
    }
    assert_eq!(chunks.concat(), text);
}

#[test]
fn incremental_finish_flushes_an_incomplete_character_lossily() {
    let Some(tokenizer) = smollm() else { return };
    let ids = tokenizer.encode("🚀", false).expect("encode");
    assert!(ids.len() > 1, "the rocket spans several tokens: {ids:?}");
    let mut decoder = tokenizer.incremental_decoder(false);
    assert_eq!(decoder.push(ids[0]), None);
    assert_eq!(decoder.finish().as_deref(), Some("\u{FFFD}"));
    assert_eq!(decoder.finish(), None);
}

#[test]
fn gguf_special_tokens() {
    let Some(tokenizer) = smollm() else { return };
    assert_eq!(tokenizer.vocab_size(), 49152);
    assert_eq!(tokenizer.bos_token_id(), Some(1));
    assert_eq!(tokenizer.bos_token().as_deref(), Some("<|im_start|>"));
    assert!(!tokenizer.add_bos_by_default());
    assert_eq!(tokenizer.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tokenizer.id_to_token(2).as_deref(), Some("<|im_end|>"));
    assert_eq!(tokenizer.id_to_token(1_000_000), None);

    let eos = tokenizer.eos_token_ids();
    assert!(eos.contains(&2), "<|im_end|> ends a turn: {eos:?}");
    assert!(eos.contains(&0), "<|endoftext|> ends a document: {eos:?}");
    assert!(
        !eos.contains(&1),
        "<|im_start|> does not end generation: {eos:?}"
    );
    if let Some(declared) = tokenizer.eos_token_id() {
        assert!(eos.contains(&declared));
    }

    assert_eq!(
        tokenizer.encode("Hi", true).expect("encode"),
        vec![1, 26843]
    );
    let chat = [1, 4093, 198, 26843, 2, 198];
    assert_eq!(tokenizer.decode(&chat, true), "user\nHi\n");
    assert_eq!(tokenizer.decode(&[26843, 4_000_000], false), "Hi");
}

// ---- Hugging Face tokenizer.json ----

/// GPT-2's byte-to-symbol table: printable bytes stand for themselves, the others
/// are shifted past U+0100.
fn byte_symbols() -> Vec<char> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut shifted = 0u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                char::from(b)
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).expect("valid symbol")
            }
        })
        .collect()
}

const TINY_MERGES: &[(&str, &str)] = &[
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("l", "d"),
    ("Ġwor", "ld"),
];

const TINY_SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A byte-level BPE `tokenizer.json`: three special tokens, 256 byte symbols, and
/// merges that spell `hello` and ` world`.
fn tiny_tokenizer_json() -> serde_json::Value {
    let mut vocab: Vec<String> = TINY_SPECIALS.iter().map(|s| s.to_string()).collect();
    vocab.extend(byte_symbols().into_iter().map(String::from));
    vocab.extend(TINY_MERGES.iter().map(|(l, r)| format!("{l}{r}")));
    let vocab: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .enumerate()
        .map(|(id, token)| (token, json!(id)))
        .collect();
    let added: Vec<serde_json::Value> = TINY_SPECIALS
        .iter()
        .enumerate()
        .map(|(id, content)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let merges: Vec<String> = TINY_MERGES
        .iter()
        .map(|(l, r)| format!("{l} {r}"))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": merges}
    })
}

fn write_json(path: &Path, value: &serde_json::Value) {
    fs::write(path, serde_json::to_string_pretty(value).expect("json")).expect("write");
}

#[test]
fn hf_dir_tokenizer_encodes_decodes_and_knows_special_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_json(&dir.path().join("tokenizer.json"), &tiny_tokenizer_json());
    write_json(
        &dir.path().join("tokenizer_config.json"),
        &json!({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": true}),
    );
    write_json(
        &dir.path().join("generation_config.json"),
        &json!({"eos_token_id": [2, 0]}),
    );
    let tokenizer = Tokenizer::from_hf_dir(dir.path()).expect("loads");

    let hello = tokenizer.token_to_id("hello").expect("hello is a token");
    let world = tokenizer.token_to_id("Ġworld").expect("Ġworld is a token");
    let ids = tokenizer
        .encode("<|im_start|>hello world<|im_end|>", false)
        .expect("encode");
    assert_eq!(ids, vec![1, hello, world, 2]);
    assert_eq!(
        tokenizer.decode(&ids, false),
        "<|im_start|>hello world<|im_end|>"
    );
    assert_eq!(tokenizer.decode(&ids, true), "hello world");

    // Text outside the merges falls back to one token per byte and still round-trips.
    let text = "héllo, 世界!";
    let ids = tokenizer.encode(text, true).expect("encode");
    assert_eq!(ids[0], 1, "BOS prepended");
    assert_eq!(tokenizer.decode(&ids[1..], false), text);
    let mut decoder = tokenizer.incremental_decoder(false);
    let chunks = stream(&mut decoder, &ids[1..]);
    assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
    assert_eq!(chunks.concat(), text);

    assert_eq!(tokenizer.bos_token_id(), Some(1));
    assert_eq!(tokenizer.eos_token_id(), Some(2));
    assert_eq!(tokenizer.eos_token().as_deref(), Some("<|im_end|>"));
    assert!(tokenizer.add_bos_by_default());
    assert_eq!(
        tokenizer
            .eos_token_ids()
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        vec![0, 2]
    );
    assert_eq!(tokenizer.vocab_size(), 3 + 256 + TINY_MERGES.len());
}

#[test]
fn hf_dir_without_config_files_still_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_json(&dir.path().join("tokenizer.json"), &tiny_tokenizer_json());
    let tokenizer = Tokenizer::from_hf_dir(dir.path()).expect("loads");
    assert_eq!(tokenizer.bos_token_id(), None);
    assert!(!tokenizer.add_bos_by_default());
    // End-of-turn control tokens are found by name.
    assert_eq!(
        tokenizer
            .eos_token_ids()
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        vec![0, 2]
    );
}

#[test]
fn hf_dir_missing_tokenizer_json_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = Tokenizer::from_hf_dir(dir.path()).expect_err("no tokenizer.json");
    assert!(
        matches!(&err, ModelError::MissingFile { path, .. } if path.ends_with("tokenizer.json")),
        "{err:?}"
    );
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn hf_dir_corrupt_tokenizer_json_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("tokenizer.json"), "{\"model\": [1, 2").expect("write");
    let err = Tokenizer::from_hf_dir(dir.path()).expect_err("corrupt tokenizer.json");
    assert!(
        matches!(&err, ModelError::Corrupt { path, .. } if path.ends_with("tokenizer.json")),
        "{err:?}"
    );
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn hf_dir_corrupt_tokenizer_config_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_json(&dir.path().join("tokenizer.json"), &tiny_tokenizer_json());
    fs::write(dir.path().join("tokenizer_config.json"), "not json").expect("write");
    let err = Tokenizer::from_hf_dir(dir.path()).expect_err("corrupt config");
    assert!(
        matches!(&err, ModelError::Corrupt { path, .. } if path.ends_with("tokenizer_config.json")),
        "{err:?}"
    );
}

// ---- GGUF metadata written by the tests ----

fn gguf(metadata: Vec<(&str, Value)>) -> Content {
    Content {
        magic: VersionedMagic::GgufV3,
        metadata: metadata
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect::<HashMap<_, _>>(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

fn strings(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
}

fn text(s: &str) -> Value {
    Value::String(s.to_owned())
}

/// The tiny byte-level vocabulary above, as GGUF metadata.
fn tiny_gpt2_gguf(model: &str, pre: &str) -> Content {
    let mut tokens: Vec<String> = TINY_SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(byte_symbols().into_iter().map(String::from));
    tokens.extend(TINY_MERGES.iter().map(|(l, r)| format!("{l}{r}")));
    let types: Vec<Value> = (0..tokens.len())
        .map(|id| Value::I32(if id < TINY_SPECIALS.len() { 3 } else { 1 }))
        .collect();
    let merges: Vec<String> = TINY_MERGES
        .iter()
        .map(|(l, r)| format!("{l} {r}"))
        .collect();
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let merges: Vec<&str> = merges.iter().map(String::as_str).collect();
    gguf(vec![
        ("tokenizer.ggml.model", text(model)),
        ("tokenizer.ggml.pre", text(pre)),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", strings(&merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ])
}

#[test]
fn gguf_byte_level_pre_tokenizer_sets_all_compile() {
    for pre in ["default", "gpt2", "smollm", "llama-bpe", "qwen2", "falcon"] {
        let content = tiny_gpt2_gguf("gpt2", pre);
        let tokenizer = Tokenizer::from_gguf(&content, Path::new("tiny.gguf"))
            .unwrap_or_else(|e| panic!("pre-tokenizer {pre}: {e}"));
        let ids = tokenizer
            .encode("<|im_start|>hello world 123", false)
            .expect("encode");
        assert_eq!(ids[0], 1, "{pre}");
        assert_eq!(
            tokenizer.decode(&ids, false),
            "<|im_start|>hello world 123",
            "{pre}"
        );
    }
}

#[test]
fn gguf_unsupported_tokenizer_model_is_a_clear_error() {
    let content = tiny_gpt2_gguf("bert", "default");
    let err = Tokenizer::from_gguf(&content, Path::new("tiny.gguf")).expect_err("bert");
    assert!(matches!(err, ModelError::Tokenizer { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("tiny.gguf") && message.contains("`bert`"),
        "{message}"
    );
}

#[test]
fn gguf_unknown_pre_tokenizer_is_a_clear_error() {
    let content = tiny_gpt2_gguf("gpt2", "klingon");
    let err = Tokenizer::from_gguf(&content, Path::new("tiny.gguf")).expect_err("klingon");
    assert!(err.to_string().contains("klingon"), "{err}");
}

#[test]
fn gguf_missing_or_mistyped_keys_are_named() {
    let mut content = tiny_gpt2_gguf("gpt2", "gpt2");
    content.metadata.remove("tokenizer.ggml.merges");
    let err = Tokenizer::from_gguf(&content, Path::new("tiny.gguf")).expect_err("no merges");
    assert!(
        matches!(&err, ModelError::MissingKey { key, .. } if key == "tokenizer.ggml.merges"),
        "{err:?}"
    );

    let mut content = tiny_gpt2_gguf("gpt2", "gpt2");
    content
        .metadata
        .insert("tokenizer.ggml.tokens".into(), Value::U32(7));
    let err = Tokenizer::from_gguf(&content, Path::new("tiny.gguf")).expect_err("bad tokens");
    assert!(
        matches!(&err, ModelError::InvalidConfig { key, .. } if key == "tokenizer.ggml.tokens"),
        "{err:?}"
    );

    let mut content = tiny_gpt2_gguf("gpt2", "gpt2");
    content.metadata.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(vec![Value::I32(1)]),
    );
    let err = Tokenizer::from_gguf(&content, Path::new("tiny.gguf")).expect_err("short types");
    assert!(matches!(err, ModelError::InvalidConfig { .. }), "{err:?}");
}

/// A SentencePiece vocabulary (`tokenizer.ggml.model = llama`): no merges, scores
/// decide which pairs merge, and bytes outside the vocabulary use `<0xNN>` tokens.
fn tiny_llama_gguf() -> Content {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    types.extend([6; 256]);
    // SentencePiece merges the pair whose union scores highest first; these scores
    // build `▁hello` and `▁world` through one path each.
    let pieces = [
        ("▁", 0.0),
        ("h", 0.0),
        ("e", 0.0),
        ("l", 0.0),
        ("o", 0.0),
        ("w", 0.0),
        ("r", 0.0),
        ("d", 0.0),
        ("he", 10.0),
        ("ll", 9.0),
        ("hell", 8.0),
        ("▁hell", 7.0),
        ("▁hello", 6.0),
        ("or", 5.0),
        ("ld", 4.5),
        ("▁w", 4.0),
        ("▁wor", 3.0),
        ("▁world", 2.5),
        ("▁h", 1.0),
    ];
    let mut scores = vec![0.0f32; tokens.len()];
    for (piece, score) in pieces {
        tokens.push(piece.to_owned());
        types.push(1);
        scores.push(score);
    }
    let scores = scores.into_iter().map(Value::F32).collect();
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    gguf(vec![
        ("tokenizer.ggml.model", text("llama")),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.scores", Value::Array(scores)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ])
}

#[test]
fn gguf_sentencepiece_vocabulary_merges_by_score_and_falls_back_to_bytes() {
    let tokenizer =
        Tokenizer::from_gguf(&tiny_llama_gguf(), Path::new("tiny.gguf")).expect("loads");
    let hello = tokenizer.token_to_id("▁hello").expect("piece");
    let world = tokenizer.token_to_id("▁world").expect("piece");
    assert!(tokenizer.add_bos_by_default());
    assert_eq!(
        tokenizer.encode("hello world", true).expect("encode"),
        vec![1, hello, world]
    );
    assert_eq!(tokenizer.decode(&[1, hello, world], true), "hello world");

    // "é" is not a piece: its two UTF-8 bytes become byte tokens.
    let ids = tokenizer.encode("hé", false).expect("encode");
    let byte = |b: u8| {
        tokenizer
            .token_to_id(&format!("<0x{b:02X}>"))
            .expect("byte token")
    };
    assert_eq!(&ids[ids.len() - 2..], &[byte(0xC3), byte(0xA9)]);
    assert_eq!(tokenizer.decode(&ids, false), "hé");
    let mut decoder = tokenizer.incremental_decoder(false);
    assert_eq!(stream(&mut decoder, &ids).concat(), "hé");
    assert!(tokenizer.eos_token_ids().contains(&2));

    // Mid-text, a piece keeps its leading space; only the text's first one is dropped.
    let mut decoder = IncrementalDecoder::with_context(&tokenizer, &[1, hello], true);
    assert_eq!(decoder.push(world).as_deref(), Some(" world"));
    let mut decoder = tokenizer.incremental_decoder(true);
    assert_eq!(decoder.push(world).as_deref(), Some("world"));
}

/// The ids' text as [`Tokenizer::vocab_bytes`] spells it (control tokens as their
/// written form).
fn spelled(entries: &[TokenBytes], ids: &[u32]) -> Vec<u8> {
    ids.iter()
        .flat_map(|&id| match &entries[id as usize] {
            TokenBytes::Text(bytes) => bytes.clone(),
            TokenBytes::Special(name) => name.clone().into_bytes(),
            TokenBytes::Unused => panic!("id {id} has no entry"),
        })
        .collect()
}

#[test]
fn vocab_bytes_spell_llamacpps_ids_back_into_the_text() {
    let Some(tokenizer) = smollm() else { return };
    let entries = tokenizer.vocab_bytes().expect("byte-level vocabulary");
    assert_eq!(entries.len(), tokenizer.vocab_size());
    for (text, ids) in fixture_cases() {
        assert_eq!(spelled(&entries, &ids), text.as_bytes(), "{text:?}");
    }
    let end = tokenizer.token_to_id("<|im_end|>").expect("control token");
    assert_eq!(
        entries[end as usize],
        TokenBytes::Special("<|im_end|>".into())
    );
}

#[test]
fn vocab_bytes_of_a_sentencepiece_vocabulary_restore_spaces_and_bytes() {
    let tokenizer =
        Tokenizer::from_gguf(&tiny_llama_gguf(), Path::new("tiny.gguf")).expect("loads");
    let entries = tokenizer.vocab_bytes().expect("byte-fallback vocabulary");
    let ids = tokenizer.encode("hello world hé", false).expect("encode");
    assert_eq!(spelled(&entries, &ids), " hello world hé".as_bytes());
    assert_eq!(entries[2], TokenBytes::Special("</s>".into()));
}
