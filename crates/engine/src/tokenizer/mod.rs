//! Text to token ids and back.
//!
//! [`Tokenizer`] wraps a Hugging Face `tokenizers` tokenizer built either from GGUF
//! metadata ([`Tokenizer::from_gguf`], matching llama.cpp's tokenization) or from a
//! Hugging Face model folder ([`Tokenizer::from_hf_dir`]) or `tokenizer.json` file
//! ([`Tokenizer::from_tokenizer_json`]). It also knows the model's
//! BOS token and the set of tokens that end generation. [`IncrementalDecoder`] turns a
//! stream of generated ids into text chunks that never split a UTF-8 character.

mod bound;
mod gguf;
mod hf;
mod incremental;
mod pre;
mod vocab_bytes;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use tokenizers::Tokenizer as HfTokenizer;

use crate::error::ModelError;

pub use incremental::IncrementalDecoder;
pub use vocab_bytes::TokenBytes;

/// Control tokens that end an assistant turn or a document in common model families.
/// A model's own EOS id is always included as well.
const END_OF_GENERATION_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<EOT>",
    "</s>",
    "<｜end▁of▁sentence｜>",
];

/// A loaded tokenizer plus the special-token facts the engine needs. Cheap to clone.
#[derive(Clone)]
pub struct Tokenizer {
    hf: Arc<HfTokenizer>,
    source: PathBuf,
    bos: Option<u32>,
    eos: Option<u32>,
    end_of_generation: BTreeSet<u32>,
    add_bos_by_default: bool,
    /// The most input bytes one token stands for, when the tokenizer bounds it.
    max_token_bytes: Option<usize>,
}

/// Special-token ids read from a model's metadata, before the tokenizer is assembled.
#[derive(Debug, Default)]
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    /// More ids that end generation (GGUF `eot`/`eom` ids, `generation_config.json`).
    extra_eos: Vec<u32>,
    add_bos_by_default: bool,
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    /// `path` is the GGUF file, used in error messages.
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self, ModelError> {
        gguf::build(content, path)
    }

    /// Reads a GGUF file's metadata and builds its tokenizer.
    pub fn from_gguf_file(path: &Path) -> Result<Self, ModelError> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // Buffered: the metadata is ~100k small reads (one per vocabulary string).
        let content = gguf_file::Content::read(&mut std::io::BufReader::new(file))
            .map_err(|e| ModelError::corrupt(path, "GGUF", e))?;
        Self::from_gguf(&content, path)
    }

    /// Loads `tokenizer.json` from a Hugging Face model folder, with the BOS/EOS tokens
    /// and `add_bos_token` from `tokenizer_config.json` and extra EOS ids from
    /// `generation_config.json` when those files exist.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, ModelError> {
        hf::build(dir)
    }

    /// Loads a `tokenizer.json` file, with `tokenizer_config.json` and
    /// `generation_config.json` from its folder as [`Self::from_hf_dir`] reads them.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self, ModelError> {
        hf::build_from_file(path)
    }

    fn assemble(hf: HfTokenizer, source: PathBuf, ids: SpecialIds) -> Self {
        let end_of_generation = ids
            .eos
            .into_iter()
            .chain(ids.extra_eos)
            .chain(end_of_generation_controls(&hf))
            .collect();
        let max_token_bytes = bound::max_token_bytes(&hf);
        Self {
            hf: Arc::new(hf),
            source,
            bos: ids.bos,
            eos: ids.eos,
            end_of_generation,
            add_bos_by_default: ids.add_bos_by_default,
            max_token_bytes,
        }
    }

    /// Token ids for `text`. Special tokens written in the text (such as
    /// `<|im_start|>`) become their ids. With `add_bos`, the BOS id is prepended when
    /// the model has one.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .hf
            .encode_fast(text, false)
            .map_err(|e| self.error(format!("cannot encode text: {e}")))?;
        let bos = self.bos.filter(|_| add_bos);
        Ok(bos
            .into_iter()
            .chain(encoding.get_ids().iter().copied())
            .collect())
    }

    /// The text for `ids`. Ids outside the vocabulary are skipped; with `skip_special`,
    /// control tokens are left out too. Invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        self.hf.decode(ids, skip_special).unwrap_or_else(|e| {
            tracing::warn!(source = %self.source.display(), "decoding failed: {e}");
            String::new()
        })
    }

    /// A streaming decoder for generated ids.
    pub fn incremental_decoder(&self, skip_special: bool) -> IncrementalDecoder {
        IncrementalDecoder::new(self, skip_special)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// The model's declared EOS id (one member of [`Self::eos_token_ids`]).
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos
    }

    /// Every id that ends generation: the declared EOS plus end-of-turn control tokens.
    pub fn eos_token_ids(&self) -> &BTreeSet<u32> {
        &self.end_of_generation
    }

    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    /// The BOS token's text, for chat templates.
    pub fn bos_token(&self) -> Option<String> {
        self.bos.and_then(|id| self.id_to_token(id))
    }

    /// The EOS token's text, for chat templates.
    pub fn eos_token(&self) -> Option<String> {
        self.eos.and_then(|id| self.id_to_token(id))
    }

    /// Whether the model expects a BOS token in front of a prompt.
    pub fn add_bos_by_default(&self) -> bool {
        self.add_bos_by_default
    }

    /// The most bytes of input text one token can stand for (the longest vocabulary
    /// entry), when this tokenizer has such a bound: text of `B` bytes then needs at
    /// least `B / max_token_bytes` tokens, so it can be refused as too long for a
    /// context without being tokenized.
    pub fn max_token_bytes(&self) -> Option<usize> {
        self.max_token_bytes
    }

    /// How many ids encoding a prompt adds around its text (Hugging Face's
    /// `num_special_tokens_to_add`): 1 when the model expects a BOS token in front;
    /// without a known BOS (a `tokenizer.json` alone), what the tokenizer's own
    /// post-processor adds.
    pub fn num_special_tokens_to_add(&self) -> usize {
        match self.bos {
            Some(_) => usize::from(self.add_bos_by_default),
            None => self.hf.encode_fast("", true).map_or(0, |e| e.len()),
        }
    }

    /// The special tokens' ids (BOS, EOS and the other control tokens: Hugging Face's
    /// `all_special_ids`).
    pub fn special_token_ids(&self) -> BTreeSet<u32> {
        self.hf
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .chain(self.bos)
            .chain(self.eos)
            .collect()
    }

    /// Number of token ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.hf.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.hf.token_to_id(token)
    }

    /// The token's vocabulary entry (byte-level BPE tokens are in their encoded form,
    /// e.g. `Ġthe`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.hf.id_to_token(id)
    }

    /// The file or folder this tokenizer was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    fn hf(&self) -> &Arc<HfTokenizer> {
        &self.hf
    }

    fn error(&self, detail: String) -> ModelError {
        ModelError::Tokenizer {
            path: self.source.clone(),
            detail,
        }
    }
}

impl fmt::Debug for Tokenizer {
    // The vocabulary is far too large to print.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("end_of_generation", &self.end_of_generation)
            .field("add_bos_by_default", &self.add_bos_by_default)
            .finish_non_exhaustive()
    }
}

/// Special added tokens whose text marks the end of a turn or document.
fn end_of_generation_controls(hf: &HfTokenizer) -> Vec<u32> {
    hf.get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, token)| token.special && is_end_of_generation_name(&token.content))
        .map(|(id, _)| id)
        .collect()
}

fn is_end_of_generation_name(token: &str) -> bool {
    END_OF_GENERATION_TOKENS.contains(&token)
}
