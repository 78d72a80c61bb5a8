//! Models: configuration, loading from GGUF files or Hugging Face folders, and the
//! forward pass.
//!
//! - `config`: the model's shape, from GGUF metadata or `config.json`.
//! - `source`: reading tensors from GGUF or safetensors shards.
//! - `weights`: assembling and validating the weights.
//! - `dummy`: a preset's shapes with random weights (`--load-format dummy`).
//! - `rope`, `attention`, `llama`: the forward pass.

mod attention;
pub mod config;
pub mod dummy;
pub mod llama;
pub(crate) mod rope;
pub mod source;
pub mod weights;

use std::path::{Path, PathBuf};

pub use config::{ModelConfig, RopeStyle};
pub use llama::{ForwardError, ForwardScratch, Llama, LogitsFor, SeqInput};
pub use weights::LoadOptions;

use crate::error::ModelError;
use source::{GgufSource, SafetensorsSource};
use weights::{LlamaWeights, TensorNames};

/// The on-disk form of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFormat {
    /// A single `.gguf` file.
    Gguf(PathBuf),
    /// A Hugging Face folder: `config.json`, safetensors shards, tokenizer files.
    HfDir(PathBuf),
}

impl ModelFormat {
    /// Tells the format from the path: a folder is a Hugging Face checkpoint, a file is
    /// GGUF.
    pub fn detect(path: &Path) -> Result<Self, ModelError> {
        if path.is_dir() {
            Ok(Self::HfDir(path.into()))
        } else if path.is_file() {
            Ok(Self::Gguf(path.into()))
        } else {
            Err(ModelError::MissingFile {
                path: path.into(),
                what: "model (a .gguf file or a Hugging Face folder)",
            })
        }
    }
}

/// Loads the model weights from a GGUF file.
pub fn load_gguf(
    source: &GgufSource,
    path: &Path,
    options: LoadOptions,
) -> Result<Llama, ModelError> {
    let config = ModelConfig::from_gguf(&source.content, path)?;
    let weights = LlamaWeights::load(source, &TensorNames::GGUF, &config, options)?;
    Ok(Llama::new(config, weights))
}

/// A preset's exact shapes with random weights (`--load-format dummy`).
pub fn load_dummy(
    preset: &dummy::Preset,
    seed: u64,
    options: LoadOptions,
) -> Result<Llama, ModelError> {
    let config = preset.config();
    let source = dummy::DummySource::new(preset, seed);
    let weights = LlamaWeights::load(&source, &TensorNames::HF, &config, options)?;
    Ok(Llama::new(config, weights))
}

/// Loads the model weights from a Hugging Face folder.
pub fn load_hf_dir(dir: &Path, options: LoadOptions) -> Result<Llama, ModelError> {
    let config_path = dir.join("config.json");
    let json = std::fs::read_to_string(&config_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ModelError::MissingFile {
            path: config_path.clone(),
            what: "model config",
        },
        _ => ModelError::io(&config_path, e),
    })?;
    let config = ModelConfig::from_hf_json(&json, &config_path)?;
    let source = SafetensorsSource::open(&safetensors_shards(dir)?)?;
    let weights = LlamaWeights::load(&source, &TensorNames::HF, &config, options)?;
    Ok(Llama::new(config, weights))
}

/// The safetensors files of a checkpoint: those named by
/// `model.safetensors.index.json` if present, else every `*.safetensors` file.
pub(crate) fn safetensors_shards(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        let text =
            std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::corrupt(&index_path, "safetensors index", e))?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                ModelError::corrupt(&index_path, "safetensors index", "no `weight_map` object")
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            return Err(ModelError::MissingFile {
                path: missing.clone(),
                what: "safetensors shard named in model.safetensors.index.json",
            });
        }
        return Ok(files);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::MissingFile {
            path: dir.join("model.safetensors"),
            what: "safetensors weights",
        });
    }
    Ok(files)
}
