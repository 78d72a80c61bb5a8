//! The most bytes of input text one token can stand for, so that text too long for
//! any context can be refused before it is tokenized (tokenizing megabytes costs
//! seconds and gigabytes).
//!
//! A vocabulary entry is never shorter, in UTF-8 bytes, than the input it matches:
//! byte-level BPE writes each input byte as a symbol of one or two bytes (`Ġ` for a
//! space), SentencePiece writes a space as `▁` (three bytes), a byte-fallback token
//! `<0xNN>` stands for one byte and a special token for its own text. So with `L` the
//! longest entry, text of `B` bytes needs at least `B / L` tokens, as long as nothing
//! before the model shrinks the text or drops parts of it (normalizers such as NFKC,
//! pre-tokenizers that remove whitespace) and no token stands for a run of unknown
//! text (fused unknown tokens). For tokenizers that might, there is no bound.

use serde_json::Value;
use tokenizers::Tokenizer as HfTokenizer;
use tokenizers::models::ModelWrapper;

/// `L` above, or `None` when this tokenizer gives no such bound.
pub(super) fn max_token_bytes(hf: &HfTokenizer) -> Option<usize> {
    let model_ok = match hf.get_model() {
        ModelWrapper::BPE(bpe) => bpe.byte_fallback || bpe.unk_token.is_none() || !bpe.fuse_unk,
        _ => false,
    };
    let normalizer_ok = hf
        .get_normalizer()
        .is_none_or(|n| serde_json::to_value(n).is_ok_and(|n| never_shrinks(&n)));
    let pre_tokenizer_ok = hf
        .get_pre_tokenizer()
        .is_none_or(|p| serde_json::to_value(p).is_ok_and(|p| keeps_all_text(&p)));
    if !(model_ok && normalizer_ok && pre_tokenizer_ok) {
        return None;
    }
    hf.get_vocab(true).keys().map(String::len).max()
}

/// Whether a normalizer (as serialized) never makes text shorter.
fn never_shrinks(normalizer: &Value) -> bool {
    match normalizer["type"].as_str() {
        Some("Prepend" | "ByteLevel") => true,
        Some("Replace") => match (
            normalizer["pattern"]["String"].as_str(),
            normalizer["content"].as_str(),
        ) {
            (Some(pattern), Some(content)) => content.len() >= pattern.len(),
            _ => false,
        },
        Some("Sequence") => all(&normalizer["normalizers"], never_shrinks),
        _ => false,
    }
}

/// Whether a pre-tokenizer (as serialized) passes every byte of the text on.
fn keeps_all_text(pre_tokenizer: &Value) -> bool {
    match pre_tokenizer["type"].as_str() {
        Some("ByteLevel" | "Metaspace" | "Digits") => true,
        Some("Split") => pre_tokenizer["behavior"].as_str() != Some("Removed"),
        Some("Sequence") => all(&pre_tokenizer["pretokenizers"], keeps_all_text),
        _ => false,
    }
}

fn all(list: &Value, check: fn(&Value) -> bool) -> bool {
    list.as_array().is_some_and(|items| items.iter().all(check))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_text_preserving_normalizers_give_a_bound() {
        let space_marks = json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]});
        assert!(never_shrinks(&space_marks));
        assert!(!never_shrinks(&json!({"type": "NFKC"})));
        let deleting = json!({"type": "Replace", "pattern": {"String": "ab"}, "content": ""});
        assert!(!never_shrinks(&deleting));
        let regex = json!({"type": "Replace", "pattern": {"Regex": "a+"}, "content": "a"});
        assert!(!never_shrinks(&regex));
    }

    #[test]
    fn pre_tokenizers_that_drop_text_give_no_bound() {
        let llama3 = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "x"}, "behavior": "Isolated"},
            {"type": "ByteLevel"}]});
        assert!(keeps_all_text(&llama3));
        assert!(!keeps_all_text(&json!({"type": "Whitespace"})));
        assert!(!keeps_all_text(
            &json!({"type": "Split", "behavior": "Removed"})
        ));
    }
}
