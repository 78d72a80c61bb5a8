//! Streaming detokenization: text chunks for generated ids as they arrive.
//!
//! Decoding one id at a time is wrong in two ways: a character may span several
//! byte-level tokens, and some decoders depend on neighbours (SentencePiece drops the
//! leading space of the first token only). So the decoder keeps a short window: a
//! few ids whose text was already emitted, as context, then the ids not yet emitted.
//! Each push decodes the window and emits what it adds to the emitted text, once that
//! no longer ends in an incomplete character; the emitted ids then become the new
//! context. The window stays a few ids long, so the cost per id is small and constant.

use std::fmt;
use std::sync::Arc;

use tokenizers::Tokenizer as HfTokenizer;

use super::Tokenizer;

/// How many already-emitted ids are kept as context, taken from a prompt's tail.
const CONTEXT_IDS: usize = 4;

/// Turns generated ids into text chunks that never split a UTF-8 character.
#[derive(Clone)]
pub struct IncrementalDecoder {
    hf: Arc<HfTokenizer>,
    skip_special: bool,
    /// Already-emitted context ids followed by ids not yet emitted.
    window: Vec<u32>,
    /// How many leading ids of `window` are already emitted.
    emitted: usize,
    /// The decoded text of `window[..emitted]`.
    emitted_text: String,
}

impl IncrementalDecoder {
    pub fn new(tokenizer: &Tokenizer, skip_special: bool) -> Self {
        Self::with_context(tokenizer, &[], skip_special)
    }

    /// A decoder whose output continues `context` (typically the prompt's ids), so
    /// that the first generated token gets the spacing it has mid-text.
    pub fn with_context(tokenizer: &Tokenizer, context: &[u32], skip_special: bool) -> Self {
        let tail = &context[context.len().saturating_sub(CONTEXT_IDS)..];
        let hf = Arc::clone(tokenizer.hf());
        let emitted_text = decode(&hf, tail, skip_special);
        Self {
            hf,
            skip_special,
            window: tail.to_vec(),
            emitted: tail.len(),
            emitted_text,
        }
    }

    /// Adds one id; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Option<String> {
        self.window.push(id);
        let text = decode(&self.hf, &self.window, self.skip_special);
        if text.len() <= self.emitted_text.len() || text.ends_with(char::REPLACEMENT_CHARACTER) {
            return None;
        }
        let chunk = new_suffix(&self.emitted_text, &text).to_owned();
        self.slide();
        Some(chunk)
    }

    /// Flushes ids still waiting for the rest of a character, as lossy text.
    pub fn finish(&mut self) -> Option<String> {
        if self.emitted == self.window.len() {
            return None;
        }
        let text = decode(&self.hf, &self.window, self.skip_special);
        let chunk = new_suffix(&self.emitted_text, &text).to_owned();
        self.slide();
        Some(chunk).filter(|chunk| !chunk.is_empty())
    }

    /// Everything pushed so far is emitted: the pending ids become the new context.
    fn slide(&mut self) {
        self.window.drain(..self.emitted);
        self.emitted = self.window.len();
        self.emitted_text = decode(&self.hf, &self.window, self.skip_special);
    }
}

impl fmt::Debug for IncrementalDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncrementalDecoder")
            .field("skip_special", &self.skip_special)
            .field("window", &self.window)
            .field("emitted", &self.emitted)
            .field("emitted_text", &self.emitted_text)
            .finish_non_exhaustive()
    }
}

fn decode(hf: &HfTokenizer, ids: &[u32], skip_special: bool) -> String {
    hf.decode(ids, skip_special).unwrap_or_default()
}

/// The part of `text` after `emitted`. Decoders normally extend the emitted text; if
/// one rewrites it, emit from the first differing character rather than fail.
fn new_suffix<'t>(emitted: &str, text: &'t str) -> &'t str {
    if let Some(suffix) = text.strip_prefix(emitted) {
        return suffix;
    }
    let common = emitted
        .char_indices()
        .zip(text.chars())
        .find(|((_, a), b)| a != b)
        .map_or(emitted.len().min(text.len()), |((at, _), _)| at);
    &text[common..]
}
