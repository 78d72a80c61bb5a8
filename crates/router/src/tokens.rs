//! Counting a prompt's tokens for conditional disaggregation: exactly, with the
//! model's Hugging Face `tokenizer.json` (`--tokenizer`), or as an estimate of four
//! characters per token. Chat requests are counted on their messages' text, without
//! the chat template's few extra tokens. The exact tokenizer also gives a completions
//! prompt's ids ([`TokenCounter::encode`], for [`crate::prompt_tokens`]).

use std::path::Path;

pub enum TokenCounter {
    Estimate,
    Exact(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenCounter::Estimate => "TokenCounter::Estimate",
            TokenCounter::Exact(_) => "TokenCounter::Exact",
        })
    }
}

/// A tokenizer file that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("loading the tokenizer {path}: {message}")]
pub struct TokenizerError {
    path: String,
    message: String,
}

impl TokenCounter {
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        tokenizers::Tokenizer::from_file(path)
            .map(|t| TokenCounter::Exact(Box::new(t)))
            .map_err(|e| TokenizerError {
                path: path.display().to_string(),
                message: e.to_string(),
            })
    }

    /// The token ids of `text` with the tokenizer's special tokens added (as a worker
    /// tokenizes a completions prompt); `None` for an estimate, or text the tokenizer
    /// cannot encode.
    pub fn encode(&self, text: &str) -> Option<Vec<u32>> {
        match self {
            TokenCounter::Estimate => None,
            TokenCounter::Exact(tokenizer) => tokenizer
                .encode_fast(text, true)
                .ok()
                .map(|encoding| encoding.get_ids().to_vec()),
        }
    }

    pub fn count(&self, text: &str) -> usize {
        match self {
            TokenCounter::Estimate => text.len().div_ceil(4),
            TokenCounter::Exact(tokenizer) => tokenizer
                .encode_fast(text, false)
                .map_or_else(|_| text.len().div_ceil(4), |e| e.len()),
        }
    }
}

/// Tokens of a `prompt_tokens`-token text of `text_chars` characters that a worker
/// holding its first `cached_chars` characters lacks.
pub fn uncached_tokens(prompt_tokens: usize, text_chars: usize, cached_chars: usize) -> usize {
    if text_chars == 0 {
        return prompt_tokens;
    }
    let cached = prompt_tokens * cached_chars.min(text_chars) / text_chars;
    prompt_tokens - cached
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_and_cache_shares() {
        assert_eq!(TokenCounter::Estimate.count("abcdefghi"), 3);
        assert_eq!(uncached_tokens(100, 400, 0), 100);
        assert_eq!(uncached_tokens(100, 400, 300), 25);
        assert_eq!(uncached_tokens(100, 400, 400), 0);
        assert_eq!(uncached_tokens(7, 0, 0), 7);
    }

    /// A word-level tokenizer whose post-processor adds `<s>` (id 0), as Llama's does.
    const TOKENIZER_WITH_BOS: &str = r#"{
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<s>": 0, "a": 1, "b": 2, "[UNK]": 3},
                  "unk_token": "[UNK]"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}}
    }"#;

    #[test]
    fn exact_tokenizers_encode_with_their_special_tokens() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), TOKENIZER_WITH_BOS).unwrap();
        let exact = TokenCounter::from_file(file.path()).unwrap();
        assert_eq!(exact.encode("a b a"), Some(vec![0, 1, 2, 1]));
        assert_eq!(TokenCounter::Estimate.encode("a b a"), None);
    }

    #[test]
    fn a_missing_tokenizer_is_a_clear_error() {
        let err = TokenCounter::from_file(Path::new("/nonexistent/tokenizer.json")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/tokenizer.json"),
            "{err}"
        );
    }
}
