//! The bytes of text each token id stands for, as a grammar engine needs them to
//! decide which tokens may come next ([`crate::constrain`]).
//!
//! Vocabulary entries are not text: byte-level BPE (GPT-2, SmolLM2, Llama 3) writes
//! every byte as a printable symbol (`Ġ` for a space), and SentencePiece with byte
//! fallback writes a space as `▁` and a raw byte as `<0xNN>`. Which of the two a
//! tokenizer uses is read from its decoder. Added tokens are their own text; special
//! ones (control tokens) stand for no text at all and are reported apart.

use std::collections::HashMap;

use serde_json::Value;
use tokenizers::Tokenizer as HfTokenizer;

use super::Tokenizer;
use crate::error::ModelError;

/// One vocabulary entry as text bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenBytes {
    /// Ordinary text.
    Text(Vec<u8>),
    /// A control token (its written form, e.g. `<|im_end|>`), which stands for no text.
    Special(String),
    /// An id with no vocabulary entry.
    Unused,
}

/// How vocabulary entries spell bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    ByteLevel,
    /// SentencePiece with byte fallback: `space` marks a space.
    ByteFallback {
        space: char,
    },
}

impl Tokenizer {
    /// Every id's bytes, in id order (`vocab_size` entries).
    pub fn vocab_bytes(&self) -> Result<Vec<TokenBytes>, ModelError> {
        let hf = self.hf();
        let spelling = spelling(hf).ok_or_else(|| {
            self.error(
                "cannot tell how its vocabulary spells bytes (neither a ByteLevel nor a \
                 ByteFallback decoder)"
                    .into(),
            )
        })?;
        let added = hf.get_added_tokens_decoder();
        let byte_of_symbol = byte_level_symbols();
        let entries = (0..self.vocab_size() as u32)
            .map(|id| match (added.get(&id), hf.id_to_token(id)) {
                (Some(token), _) if token.special => TokenBytes::Special(token.content.clone()),
                (Some(token), _) => TokenBytes::Text(token.content.clone().into_bytes()),
                (None, Some(entry)) => {
                    TokenBytes::Text(entry_bytes(&entry, spelling, &byte_of_symbol))
                }
                (None, None) => TokenBytes::Unused,
            })
            .collect();
        Ok(entries)
    }
}

fn entry_bytes(entry: &str, spelling: Spelling, byte_of_symbol: &HashMap<char, u8>) -> Vec<u8> {
    match spelling {
        Spelling::ByteLevel => entry
            .chars()
            .map(|c| byte_of_symbol.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
            // An entry outside the byte alphabet is taken as plain text.
            .unwrap_or_else(|| entry.as_bytes().to_vec()),
        Spelling::ByteFallback { space } => match fallback_byte(entry) {
            Some(byte) => vec![byte],
            None => entry.replace(space, " ").into_bytes(),
        },
    }
}

/// `<0xNN>` → the byte NN.
fn fallback_byte(entry: &str) -> Option<u8> {
    let hex = entry.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// GPT-2's byte-to-symbol table, inverted: printable Latin-1 bytes stand for
/// themselves, the others are numbered from U+0100 in byte order.
fn byte_level_symbols() -> HashMap<char, u8> {
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|byte| {
            let c = char::from(byte);
            let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
            if printable {
                (c, byte)
            } else {
                let symbol = char::from_u32(next).expect("below U+0200");
                next += 1;
                (symbol, byte)
            }
        })
        .collect()
}

fn spelling(hf: &HfTokenizer) -> Option<Spelling> {
    let decoder = serde_json::to_value(hf.get_decoder()?).ok()?;
    let mut types = Vec::new();
    decoder_types(&decoder, &mut types);
    if types.iter().any(|(kind, _)| kind == "ByteLevel") {
        return Some(Spelling::ByteLevel);
    }
    if types.iter().any(|(kind, _)| kind == "ByteFallback") {
        let space = types
            .iter()
            .find_map(|(kind, replaced)| (kind == "Replace").then_some(*replaced).flatten())
            .unwrap_or('▁');
        return Some(Spelling::ByteFallback { space });
    }
    None
}

/// The decoder types in a (serialized) decoder, with the one-character pattern of
/// each `Replace` that restores a space.
fn decoder_types(decoder: &Value, out: &mut Vec<(String, Option<char>)>) {
    let kind = decoder["type"].as_str().unwrap_or_default().to_owned();
    if kind == "Sequence" {
        for inner in decoder["decoders"].as_array().into_iter().flatten() {
            decoder_types(inner, out);
        }
        return;
    }
    let replaced = (kind == "Replace" && decoder["content"] == " ")
        .then(|| decoder["pattern"]["String"].as_str())
        .flatten()
        .and_then(|pattern| {
            let mut chars = pattern.chars();
            chars.next().filter(|_| chars.next().is_none())
        });
    out.push((kind, replaced));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_symbols_cover_every_byte_once() {
        let table = byte_level_symbols();
        assert_eq!(table.len(), 256);
        assert_eq!(table[&'Ġ'], b' ');
        assert_eq!(table[&'Ċ'], b'\n');
        assert_eq!(table[&'a'], b'a');
        let mut bytes: Vec<u8> = table.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
    }

    #[test]
    fn entries_are_spelled_back_into_bytes() {
        let table = byte_level_symbols();
        assert_eq!(entry_bytes("Ġthe", Spelling::ByteLevel, &table), b" the");
        // "é" is two bytes, each written as its own symbol.
        assert_eq!(
            entry_bytes("Ã©", Spelling::ByteLevel, &table),
            "é".as_bytes()
        );
        let fallback = Spelling::ByteFallback { space: '▁' };
        assert_eq!(entry_bytes("▁the", fallback, &table), b" the");
        assert_eq!(entry_bytes("<0x0A>", fallback, &table), b"\n");
        assert_eq!(entry_bytes("<0xZZ>", fallback, &table), b"<0xZZ>");
    }
}
