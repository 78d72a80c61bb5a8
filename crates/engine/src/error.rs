//! Errors the engine reports to its callers. Every variant names what went wrong and,
//! where a file is involved, which file.

use std::path::PathBuf;

/// An error while loading a model, its tokenizer or its chat template.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: missing file ({what})")]
    MissingFile { path: PathBuf, what: &'static str },
    #[error("{path}: not a valid {format} file: {detail}")]
    Corrupt {
        path: PathBuf,
        format: &'static str,
        detail: String,
    },
    #[error("{path}: unsupported architecture `{arch}` (supported: llama, mistral)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("{path}: tensor `{tensor}` has unsupported type {dtype}")]
    UnsupportedDType {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: missing metadata or config key `{key}`")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: invalid value for `{key}`: {detail}")]
    InvalidConfig {
        path: PathBuf,
        key: String,
        detail: String,
    },
    #[error("no model preset `{name}` for --load-format dummy; presets: {known}")]
    UnknownPreset { name: String, known: String },
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{path}: tokenizer: {detail}")]
    Tokenizer { path: PathBuf, detail: String },
    #[error("chat template: {detail}")]
    ChatTemplate { detail: String },
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(
        path: impl Into<PathBuf>,
        format: &'static str,
        detail: impl ToString,
    ) -> Self {
        Self::Corrupt {
            path: path.into(),
            format,
            detail: detail.to_string(),
        }
    }
}
