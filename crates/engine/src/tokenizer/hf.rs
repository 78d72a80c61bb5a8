//! Loading a tokenizer from a Hugging Face model folder: `tokenizer.json`, plus the
//! special tokens in `tokenizer_config.json` and `generation_config.json`.

use std::path::Path;
use std::str::FromStr;

use serde_json::Value;
use tokenizers::Tokenizer as HfTokenizer;

use super::{SpecialIds, Tokenizer};
use crate::error::ModelError;

pub(super) fn build(dir: &Path) -> Result<Tokenizer, ModelError> {
    build_from_file(&dir.join("tokenizer.json"))
}

/// A `tokenizer.json` file (by any name), with the special-token files beside it.
pub(super) fn build_from_file(tokenizer_path: &Path) -> Result<Tokenizer, ModelError> {
    let dir = tokenizer_path.parent().unwrap_or(Path::new("."));
    let hf = read_tokenizer_json(tokenizer_path)?;
    let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
    let generation = read_optional_json(&dir.join("generation_config.json"))?;
    let ids = special_ids(&hf, config.as_ref(), generation.as_ref());
    Ok(Tokenizer::assemble(hf, tokenizer_path.to_path_buf(), ids))
}

fn read_tokenizer_json(path: &Path) -> Result<HfTokenizer, ModelError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
                what: "tokenizer.json",
            });
        }
        Err(e) => return Err(ModelError::io(path, e)),
    };
    HfTokenizer::from_str(&text).map_err(|e| ModelError::corrupt(path, "tokenizer.json", e))
}

/// A JSON file that may be absent; present but unreadable or malformed is an error.
fn read_optional_json(path: &Path) -> Result<Option<Value>, ModelError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ModelError::io(path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::corrupt(path, "JSON", e))
}

fn special_ids(hf: &HfTokenizer, config: Option<&Value>, generation: Option<&Value>) -> SpecialIds {
    let id_of = |key: &str| {
        config
            .and_then(|c| token_text(c.get(key)?))
            .and_then(|text| hf.token_to_id(text))
    };
    let bos = id_of("bos_token");
    let add_bos_by_default = config
        .and_then(|c| c.get("add_bos_token")?.as_bool())
        .unwrap_or_else(|| post_processor_adds(hf, bos));
    SpecialIds {
        bos,
        eos: id_of("eos_token"),
        extra_eos: generation.map(eos_ids).unwrap_or_default(),
        add_bos_by_default,
    }
}

/// A special token in `tokenizer_config.json`: a string or an added-token object.
fn token_text(value: &Value) -> Option<&str> {
    match value {
        Value::String(text) => Some(text),
        Value::Object(token) => token.get("content")?.as_str(),
        _ => None,
    }
}

/// Whether the tokenizer's own post-processor puts BOS in front (as Llama 3's does).
fn post_processor_adds(hf: &HfTokenizer, bos: Option<u32>) -> bool {
    let Some(bos) = bos else { return false };
    hf.encode_fast("", true)
        .is_ok_and(|encoding| encoding.get_ids().first() == Some(&bos))
}

/// `eos_token_id` in `generation_config.json`: one id or a list.
fn eos_ids(generation: &Value) -> Vec<u32> {
    let as_id = |v: &Value| v.as_u64().and_then(|id| u32::try_from(id).ok());
    match generation.get("eos_token_id") {
        Some(Value::Array(ids)) => ids.iter().filter_map(as_id).collect(),
        Some(id) => as_id(id).into_iter().collect(),
        None => Vec::new(),
    }
}
