//! Building a tokenizer from GGUF `tokenizer.ggml.*` metadata the way llama.cpp reads
//! it: byte-level BPE (`gpt2`) with llama.cpp's pre-tokenizer regexes, and
//! SentencePiece-style BPE (`llama`) with byte fallback.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer as HfTokenizer,
};

use super::{SpecialIds, Tokenizer, is_end_of_generation_name, pre};
use crate::error::ModelError;

const MODEL: &str = "tokenizer.ggml.model";
const PRE: &str = "tokenizer.ggml.pre";
const TOKENS: &str = "tokenizer.ggml.tokens";
const TOKEN_TYPES: &str = "tokenizer.ggml.token_type";
const SCORES: &str = "tokenizer.ggml.scores";
const MERGES: &str = "tokenizer.ggml.merges";
const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
const EOM_ID: &str = "tokenizer.ggml.eom_token_id";
const UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";

/// SentencePiece's visible space.
const SPACE_MARK: &str = "\u{2581}";

pub(super) fn build(content: &Content, path: &Path) -> Result<Tokenizer, ModelError> {
    let meta = Metadata { content, path };
    let model = meta.required_string(MODEL)?;
    let vocab = GgufVocab::read(&meta)?;
    let (mut hf, adds_bos_by_default) = match model {
        "gpt2" => (byte_level_bpe(&meta, &vocab)?, false),
        "llama" => (sentencepiece_bpe(&meta, &vocab)?, true),
        other => {
            return Err(meta.tokenizer_error(format!(
                "unsupported tokenizer model `{other}` in `{MODEL}` \
                 (supported: gpt2 = byte-level BPE, llama = SentencePiece BPE)"
            )));
        }
    };
    register_added_tokens(&mut hf, &vocab)
        .map_err(|e| meta.tokenizer_error(format!("cannot register special tokens: {e}")))?;
    let ids = special_ids(&meta, &vocab, adds_bos_by_default)?;
    Ok(Tokenizer::assemble(hf, path.to_path_buf(), ids))
}

/// llama.cpp token types (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_code(code: i64) -> Self {
        match code {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// The token list and token types, indexed by id.
struct GgufVocab {
    tokens: Vec<String>,
    types: Vec<TokenType>,
    ids: Vocab,
}

impl GgufVocab {
    fn read(meta: &Metadata) -> Result<Self, ModelError> {
        let mut tokens = meta.required_strings(TOKENS)?;
        // llama.cpp renames empty tokens so that every id keeps a distinct entry.
        for (id, token) in tokens.iter_mut().enumerate() {
            if token.is_empty() {
                *token = format!("[EMPTY_{id}]");
            }
        }
        let types = match meta.ints(TOKEN_TYPES)? {
            Some(codes) if codes.len() == tokens.len() => {
                codes.into_iter().map(TokenType::from_code).collect()
            }
            Some(codes) => {
                return Err(meta.invalid(
                    TOKEN_TYPES,
                    format!("{} types for {} tokens", codes.len(), tokens.len()),
                ));
            }
            None => vec![TokenType::Normal; tokens.len()],
        };
        let ids = token_ids(&tokens);
        Ok(Self { tokens, types, ids })
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }

    fn contains_id(&self, id: u32) -> bool {
        (id as usize) < self.len()
    }

    /// Tokens matched verbatim in text before BPE, with whether they are control tokens.
    fn added_tokens(&self) -> impl Iterator<Item = (&str, bool)> {
        self.tokens
            .iter()
            .zip(&self.types)
            .filter_map(|(token, kind)| match kind {
                TokenType::Control | TokenType::Unknown => Some((token.as_str(), true)),
                // llama.cpp treats end-of-turn tokens as control even when mislabelled.
                _ if is_end_of_generation_name(token) => Some((token.as_str(), true)),
                TokenType::UserDefined => Some((token.as_str(), false)),
                _ => None,
            })
    }
}

fn token_ids(tokens: &[String]) -> Vocab {
    let ids: Vocab = tokens.iter().cloned().zip(0u32..).collect();
    if ids.len() != tokens.len() {
        tracing::warn!(
            "tokenizer vocabulary has {} duplicate entries; the later id wins",
            tokens.len() - ids.len()
        );
    }
    ids
}

fn byte_level_bpe(meta: &Metadata, vocab: &GgufVocab) -> Result<HfTokenizer, ModelError> {
    let pre_name = meta.string(PRE)?;
    let spec = pre::spec_for(pre_name).ok_or_else(|| {
        meta.tokenizer_error(format!(
            "unsupported pre-tokenizer `{}` in `{PRE}` (supported: {})",
            pre_name.unwrap_or_default(),
            pre::SUPPORTED
        ))
    })?;
    let merges = parse_merges(meta, &meta.required_strings(MERGES)?)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.ids.clone(), known_merges(vocab, merges))
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| meta.tokenizer_error(format!("cannot build BPE model: {e}")))?;
    let mut hf = HfTokenizer::new(bpe);
    hf.with_pre_tokenizer(Some(split_then_byte_level(meta, spec.regexes)?));
    hf.with_decoder(Some(ByteLevel::default()));
    Ok(hf)
}

fn split_then_byte_level(
    meta: &Metadata,
    regexes: &[&str],
) -> Result<PreTokenizerWrapper, ModelError> {
    let mut steps = Vec::with_capacity(regexes.len() + 1);
    for regex in regexes {
        let split = Split::new(
            SplitPattern::Regex((*regex).to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| meta.tokenizer_error(format!("bad pre-tokenizer regex {regex:?}: {e}")))?;
        steps.push(PreTokenizerWrapper::from(split));
    }
    // The regexes already split the text; ByteLevel only maps bytes to symbols.
    steps.push(ByteLevel::new(false, false, false).into());
    Ok(PreTokenizerSequence::new(steps).into())
}

fn sentencepiece_bpe(meta: &Metadata, vocab: &GgufVocab) -> Result<HfTokenizer, ModelError> {
    let merges = match meta.strings(MERGES)? {
        Some(merges) => parse_merges(meta, &merges)?,
        None => merges_from_scores(meta, vocab)?,
    };
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab.ids.clone(), known_merges(vocab, merges))
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = meta.id(UNK_ID)?.filter(|&id| vocab.contains_id(id)) {
        builder = builder.unk_token(vocab.tokens[unk as usize].clone());
    }
    let bpe = builder
        .build()
        .map_err(|e| meta.tokenizer_error(format!("cannot build BPE model: {e}")))?;
    let add_space_prefix = meta.flag(ADD_SPACE_PREFIX)?.unwrap_or(true);
    let mut hf = HfTokenizer::new(bpe);
    hf.with_normalizer(Some(space_marking_normalizer(meta, add_space_prefix)?))
        .map_err(|e| meta.tokenizer_error(format!("cannot set normalizer: {e}")))?;
    hf.with_decoder(Some(space_marking_decoder(meta, add_space_prefix)?));
    Ok(hf)
}

/// Spaces become `▁`, plus one in front of the text when the model asks for it.
fn space_marking_normalizer(
    meta: &Metadata,
    add_space_prefix: bool,
) -> Result<NormalizerWrapper, ModelError> {
    let mut steps: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        steps.push(Prepend::new(SPACE_MARK.to_owned()).into());
    }
    steps.push(replace(meta, " ", SPACE_MARK)?.into());
    Ok(NormalizerSequence::new(steps).into())
}

/// `▁` back to spaces, `<0xNN>` tokens to bytes, and the prefix space dropped.
fn space_marking_decoder(
    meta: &Metadata,
    add_space_prefix: bool,
) -> Result<DecoderWrapper, ModelError> {
    let mut steps: Vec<DecoderWrapper> = vec![
        replace(meta, SPACE_MARK, " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    Ok(DecoderSequence::new(steps).into())
}

fn replace(meta: &Metadata, from: &str, to: &str) -> Result<Replace, ModelError> {
    Replace::new(from, to).map_err(|e| meta.tokenizer_error(format!("replace {from:?}: {e}")))
}

/// SentencePiece BPE merges the adjacent pair whose union has the highest score; as
/// ranked merges, that is every split of every piece into two known pieces, best
/// union score first.
fn merges_from_scores(meta: &Metadata, vocab: &GgufVocab) -> Result<Merges, ModelError> {
    let scores = meta.floats(SCORES)?.ok_or_else(|| meta.missing(SCORES))?;
    if scores.len() != vocab.len() {
        return Err(meta.invalid(
            SCORES,
            format!("{} scores for {} tokens", scores.len(), vocab.len()),
        ));
    }
    let ids = &vocab.ids;
    let mut candidates: Vec<(f32, u32, u32, &str, &str)> = Vec::new();
    for (id, piece) in vocab.tokens.iter().enumerate() {
        if vocab.types[id] != TokenType::Normal && vocab.types[id] != TokenType::UserDefined {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                candidates.push((scores[id], l, r, left, right));
            }
        }
    }
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    Ok(candidates
        .into_iter()
        .map(|(_, _, _, l, r)| (l.to_owned(), r.to_owned()))
        .collect())
}

/// Splits `"left right"` merge entries; the separator is the first space after the
/// first character, as llama.cpp reads them.
fn parse_merges(meta: &Metadata, entries: &[String]) -> Result<Merges, ModelError> {
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let first_len = entry.chars().next().map_or(0, char::len_utf8);
            let space = entry[first_len..].find(' ').map(|at| first_len + at);
            space
                .map(|at| (entry[..at].to_owned(), entry[at + 1..].to_owned()))
                .ok_or_else(|| meta.invalid(MERGES, format!("entry {i} {entry:?} has no space")))
        })
        .collect()
}

/// Drops merges whose parts or result are not tokens: they can never fire in
/// llama.cpp either, and the BPE builder rejects them.
fn known_merges(vocab: &GgufVocab, merges: Merges) -> Merges {
    let ids = &vocab.ids;
    let before = merges.len();
    let kept: Merges = merges
        .into_iter()
        .filter(|(l, r)| {
            ids.contains_key(l) && ids.contains_key(r) && ids.contains_key(&format!("{l}{r}"))
        })
        .collect();
    if kept.len() != before {
        tracing::warn!("ignoring {} merges of unknown tokens", before - kept.len());
    }
    kept
}

fn register_added_tokens(hf: &mut HfTokenizer, vocab: &GgufVocab) -> tokenizers::Result<()> {
    let (control, user): (Vec<_>, Vec<_>) = vocab.added_tokens().partition(|(_, control)| *control);
    let as_added = |tokens: Vec<(&str, bool)>| -> Vec<AddedToken> {
        tokens
            .into_iter()
            .map(|(text, special)| AddedToken::from(text, special).normalized(false))
            .collect()
    };
    hf.add_special_tokens(as_added(control))?;
    hf.add_tokens(as_added(user))?;
    Ok(())
}

fn special_ids(
    meta: &Metadata,
    vocab: &GgufVocab,
    adds_bos_by_default: bool,
) -> Result<SpecialIds, ModelError> {
    let id = |key: &str| -> Result<Option<u32>, ModelError> {
        let id = meta.id(key)?;
        if let Some(bad) = id.filter(|&id| !vocab.contains_id(id)) {
            tracing::warn!(
                "ignoring `{key}` = {bad}: vocabulary has {} tokens",
                vocab.len()
            );
        }
        Ok(id.filter(|&id| vocab.contains_id(id)))
    };
    Ok(SpecialIds {
        bos: id(BOS_ID)?,
        eos: id(EOS_ID)?,
        extra_eos: [id(EOT_ID)?, id(EOM_ID)?].into_iter().flatten().collect(),
        add_bos_by_default: meta.flag(ADD_BOS)?.unwrap_or(adds_bos_by_default),
    })
}

/// Typed access to GGUF metadata, with errors that name the file and key.
struct Metadata<'a> {
    content: &'a Content,
    path: &'a Path,
}

impl Metadata<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn string(&self, key: &str) -> Result<Option<&str>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(key, "a string", other)),
        }
    }

    fn required_string(&self, key: &str) -> Result<&str, ModelError> {
        self.string(key)?.ok_or_else(|| self.missing(key))
    }

    fn array(&self, key: &str) -> Result<Option<&[Value]>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(other) => Err(self.wrong_type(key, "an array", other)),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>, ModelError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        let strings = items.iter().map(|item| match item {
            Value::String(s) => Ok(s.clone()),
            other => Err(self.wrong_type(key, "an array of strings", other)),
        });
        strings.collect::<Result<_, _>>().map(Some)
    }

    fn required_strings(&self, key: &str) -> Result<Vec<String>, ModelError> {
        self.strings(key)?.ok_or_else(|| self.missing(key))
    }

    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>, ModelError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        let ints = items.iter().map(|item| {
            as_i64(item).ok_or_else(|| self.wrong_type(key, "an array of integers", item))
        });
        ints.collect::<Result<_, _>>().map(Some)
    }

    fn floats(&self, key: &str) -> Result<Option<Vec<f32>>, ModelError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        let floats = items.iter().map(|item| match item {
            Value::F32(v) => Ok(*v),
            Value::F64(v) => Ok(*v as f32),
            other => Err(self.wrong_type(key, "an array of floats", other)),
        });
        floats.collect::<Result<_, _>>().map(Some)
    }

    fn id(&self, key: &str) -> Result<Option<u32>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => as_i64(value)
                .and_then(|v| u32::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a token id", value)),
        }
    }

    fn flag(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong_type(key, "a bool", other)),
        }
    }

    fn missing(&self, key: &str) -> ModelError {
        ModelError::MissingKey {
            path: self.path.to_path_buf(),
            key: key.to_owned(),
        }
    }

    fn invalid(&self, key: &str, detail: String) -> ModelError {
        ModelError::InvalidConfig {
            path: self.path.to_path_buf(),
            key: key.to_owned(),
            detail,
        }
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> ModelError {
        self.invalid(
            key,
            format!("expected {expected}, found {:?}", found.value_type()),
        )
    }

    fn tokenizer_error(&self, detail: String) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.to_path_buf(),
            detail,
        }
    }
}

fn as_i64(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(v) => Some(v.into()),
        Value::I8(v) => Some(v.into()),
        Value::U16(v) => Some(v.into()),
        Value::I16(v) => Some(v.into()),
        Value::U32(v) => Some(v.into()),
        Value::I32(v) => Some(v.into()),
        Value::U64(v) => i64::try_from(v).ok(),
        Value::I64(v) => Some(v),
        _ => None,
    }
}
