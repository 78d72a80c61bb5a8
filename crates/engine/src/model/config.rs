//! The shape of a Llama-family model, read from GGUF metadata or a Hugging Face
//! `config.json`, validated once so the forward pass can trust it.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::error::ModelError;

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])`: llama.cpp's layout for GGUF Llama weights,
    /// whose Q/K rows the converter permuted.
    Interleaved,
    /// Pairs `(x[i], x[i + d/2])`: Hugging Face's `rotate_half` layout.
    HalfSplit,
}

/// Llama 3.1-style frequency scaling for long contexts (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// A short name for the model (GGUF `general.name`, or the HF folder name).
    pub name: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Longest context the model supports (after any sliding-window cap).
    pub max_position_embeddings: usize,
}

impl ModelConfig {
    /// Query heads that share one KV head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Width of the K (or V) projection output.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Width of the Q projection output.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Reads just the config of the model at `path` (a `.gguf` file, or a Hugging Face
    /// folder's `config.json`), without its weights.
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        if path.is_dir() {
            let file = path.join("config.json");
            let json = std::fs::read_to_string(&file).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => ModelError::MissingFile {
                    path: file.clone(),
                    what: "Hugging Face config",
                },
                _ => ModelError::io(&file, e),
            })?;
            return Self::from_hf_json(&json, path);
        }
        let source = super::source::GgufSource::open(path)?;
        Self::from_gguf(&source.content, path)
    }

    /// Reads the config from GGUF metadata (`{arch}.*` keys).
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self, ModelError> {
        let meta = GgufMeta { content, path };
        let arch = meta.string("general.architecture")?;
        if arch != "llama" && arch != "mistral" {
            return Err(ModelError::UnsupportedArchitecture {
                path: path.into(),
                arch,
            });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = meta.usize(&key("embedding_length"))?;
        let num_heads = meta.usize(&key("attention.head_count"))?;
        let num_kv_heads = meta
            .opt_usize(&key("attention.head_count_kv"))?
            .unwrap_or(num_heads);
        let head_dim = match meta.opt_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let vocab_size = match meta.opt_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => meta.array_len("tokenizer.ggml.tokens")?,
        };
        let config = Self {
            name: meta
                .opt_string("general.name")
                .unwrap_or_else(|| file_stem(path)),
            hidden_size,
            intermediate_size: meta.usize(&key("feed_forward_length"))?,
            num_layers: meta.usize(&key("block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: meta
                .opt_f32(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: meta.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_style: RopeStyle::Interleaved,
            // GGUF carries Llama 3 scaling as a `rope_freqs.weight` tensor instead.
            rope_scaling: None,
            max_position_embeddings: meta.opt_usize(&key("context_length"))?.unwrap_or(4096),
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Reads the config from a Hugging Face `config.json`.
    pub fn from_hf_json(json: &str, path: &Path) -> Result<Self, ModelError> {
        let raw: HfConfig =
            serde_json::from_str(json).map_err(|e| ModelError::corrupt(path, "config.json", e))?;
        let arch = raw.architectures.first().cloned().unwrap_or_default();
        if !matches!(arch.as_str(), "LlamaForCausalLM" | "MistralForCausalLM") {
            return Err(ModelError::UnsupportedArchitecture {
                path: path.into(),
                arch,
            });
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1));
        let rope_scaling = match raw.rope_scaling {
            None => None,
            Some(scaling) => Some(scaling.into_llama3(path)?),
        };
        let mut max_position_embeddings = raw.max_position_embeddings.unwrap_or(4096);
        if let Some(window) = raw.sliding_window {
            // Capping the context at the window makes sliding-window attention and full
            // attention identical, so the model runs correctly, just with less context.
            if window < max_position_embeddings {
                tracing::warn!(
                    window,
                    "sliding-window attention is not implemented; context capped at the window"
                );
                max_position_embeddings = window;
            }
        }
        let name = path
            .parent()
            .and_then(|dir| dir.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let config = Self {
            name,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-5),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_style: RopeStyle::HalfSplit,
            rope_scaling,
            max_position_embeddings,
        };
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ModelError> {
        let invalid = |key: &str, detail: String| ModelError::InvalidConfig {
            path: path.into(),
            key: key.into(),
            detail,
        };
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be positive".into()));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(invalid(
                "num_kv_heads",
                format!(
                    "{} query heads are not a multiple of {} KV heads",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(invalid("head_dim", format!("{} is odd", self.head_dim)));
        }
        // Written so that NaN fails too.
        let theta_ok = self.rope_theta > 0.0 && self.rope_theta.is_finite();
        let eps_ok = self.rms_norm_eps >= 0.0 && self.rms_norm_eps.is_finite();
        if !theta_ok || !eps_ok {
            return Err(invalid(
                "rope_theta/rms_norm_eps",
                "must be finite and positive".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    sliding_window: Option<usize>,
}

#[derive(Deserialize)]
struct HfRopeScaling {
    #[serde(alias = "type")]
    rope_type: String,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

impl HfRopeScaling {
    fn into_llama3(self, path: &Path) -> Result<Llama3RopeScaling, ModelError> {
        let unsupported = |detail: String| ModelError::InvalidConfig {
            path: path.into(),
            key: "rope_scaling".into(),
            detail,
        };
        if self.rope_type != "llama3" {
            return Err(unsupported(format!(
                "rope_type `{}` is not supported (supported: llama3)",
                self.rope_type
            )));
        }
        match (
            self.factor,
            self.low_freq_factor,
            self.high_freq_factor,
            self.original_max_position_embeddings,
        ) {
            (Some(factor), Some(low), Some(high), Some(original)) if high > low => {
                Ok(Llama3RopeScaling {
                    factor,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: original,
                })
            }
            _ => Err(unsupported(
                "llama3 scaling needs factor, low_freq_factor < high_freq_factor and \
                 original_max_position_embeddings"
                    .into(),
            )),
        }
    }
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// Typed access to GGUF metadata with errors that name the file and the key.
pub(crate) struct GgufMeta<'a> {
    pub content: &'a gguf_file::Content,
    pub path: &'a Path,
}

impl GgufMeta<'_> {
    fn get(&self, key: &str) -> Result<&gguf_file::Value, ModelError> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| ModelError::MissingKey {
                path: self.path.into(),
                key: key.into(),
            })
    }

    fn wrong_type(&self, key: &str, err: candle_core::Error) -> ModelError {
        ModelError::InvalidConfig {
            path: self.path.into(),
            key: key.into(),
            detail: err.to_string(),
        }
    }

    pub fn string(&self, key: &str) -> Result<String, ModelError> {
        self.get(key)?
            .to_string()
            .cloned()
            .map_err(|e| self.wrong_type(key, e))
    }

    pub fn opt_string(&self, key: &str) -> Option<String> {
        self.string(key).ok()
    }

    pub fn usize(&self, key: &str) -> Result<usize, ModelError> {
        let value = self.get(key)?;
        let as_u64 = match value {
            gguf_file::Value::U64(v) => Ok(*v),
            gguf_file::Value::I64(v) => u64::try_from(*v).map_err(|_| "negative".to_string()),
            gguf_file::Value::I32(v) => u64::try_from(*v).map_err(|_| "negative".to_string()),
            other => other.to_u32().map(u64::from).map_err(|e| e.to_string()),
        };
        as_u64
            .map(|v| v as usize)
            .map_err(|detail| ModelError::InvalidConfig {
                path: self.path.into(),
                key: key.into(),
                detail,
            })
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        if self.content.metadata.contains_key(key) {
            self.usize(key).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>, ModelError> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(value) => value
                .to_f32()
                .map(Some)
                .map_err(|e| self.wrong_type(key, e)),
        }
    }

    pub fn array_len(&self, key: &str) -> Result<usize, ModelError> {
        self.get(key)?
            .to_vec()
            .map(|v| v.len())
            .map_err(|e| self.wrong_type(key, e))
    }
}
