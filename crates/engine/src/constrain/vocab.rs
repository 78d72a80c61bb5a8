//! The model's vocabulary as llguidance sees it: every token id's bytes in a trie,
//! control tokens marked apart, the end-of-generation ids as its end tokens, and
//! tokenizing through tandem's own tokenizer.

use llguidance::toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use super::ConstraintError;
use crate::tokenizer::{TokenBytes, Tokenizer};

pub(super) struct TokenizerBridge {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerBridge {
    /// `vocab_size` is the logits row length; ids past the tokenizer's vocabulary
    /// become unusable placeholders.
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize) -> Result<Self, ConstraintError> {
        let entries = tokenizer
            .vocab_bytes()
            .map_err(|e| ConstraintError::Unavailable(e.to_string()))?;
        let size = vocab_size.max(entries.len());
        let words: Vec<Vec<u8>> = (0..size)
            .map(|id| trie_word(id, entries.get(id).unwrap_or(&TokenBytes::Unused)))
            .collect();
        let end_tokens: Vec<TokenId> = tokenizer
            .eos_token_ids()
            .iter()
            .copied()
            .filter(|&id| (id as usize) < size)
            .collect();
        let Some(&first_end) = end_tokens.first() else {
            return Err(ConstraintError::Unavailable(
                "the tokenizer has no end-of-generation token".into(),
            ));
        };
        let mut info = TokRxInfo::new(size as u32, first_end);
        info.tok_bos = tokenizer.bos_token_id();
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&end_tokens);
        Ok(Self {
            trie,
            tokenizer: tokenizer.clone(),
        })
    }
}

/// A trie entry: text as its bytes; a control token as the marker byte and its name,
/// which no text can spell (the marker is not valid UTF-8).
fn trie_word(id: usize, entry: &TokenBytes) -> Vec<u8> {
    let special = |name: &str| {
        let mut word = vec![TokTrie::SPECIAL_TOKEN_MARKER];
        word.extend_from_slice(name.as_bytes());
        word
    };
    match entry {
        TokenBytes::Text(bytes) => bytes.clone(),
        TokenBytes::Special(name) => special(name),
        TokenBytes::Unused => special(&format!("<[unused {id}]>")),
    }
}

impl TokenizerEnv for TokenizerBridge {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<TokenId> {
        let text = String::from_utf8_lossy(bytes);
        self.tokenizer.encode(&text, false).unwrap_or_else(|e| {
            tracing::warn!("tokenizing grammar text failed: {e}");
            Vec::new()
        })
    }
}
