//! A model's KV arithmetic without loading it (`tandem kv`): the shape that sets its KV
//! size — layers, KV heads, head dimension — from a preset, a GGUF file, or a Hugging
//! Face `config.json` of any architecture (not only the ones the engine runs), and the
//! nominal link bandwidths a request's KV is set against; and the longest request a
//! worker's KV cache lets it accept ([`max_model_len`]).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::KvLayout;
use crate::error::ModelError;
use crate::model::ModelConfig;
use crate::model::dummy::{PRESETS, Preset};

/// The KV-relevant shape of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvShape {
    pub name: String,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Known for model files, not for presets.
    pub vocab_size: Option<usize>,
}

/// Presets beyond the engine's ([`PRESETS`], the shapes `--load-format dummy` serves):
/// (name, layers, KV heads, head dim), from published configs.
const KV_ONLY_PRESETS: &[(&str, usize, usize, usize)] = &[("qwen3-0.6b", 28, 8, 128)];

/// Nominal one-way bandwidths, bytes per second (line rates: real transfers are slower).
pub const LINKS: &[(&str, f64)] = &[
    ("TCP, 10 GbE", 1.25e9),
    ("TCP, 25 GbE", 3.125e9),
    ("TCP, 100 GbE", 12.5e9),
    ("RoCE, 100 Gb/s", 12.5e9),
    ("RoCE, 200 Gb/s", 25e9),
    ("RoCE, 400 Gb/s", 50e9),
    ("PCIe 5.0 x16", 64e9),
    ("NVLink 4 (H100, per direction)", 450e9),
];

#[derive(Debug, thiserror::Error)]
pub enum KvSizingError {
    #[error("`{model}` is neither a model file or folder nor a preset ({presets})")]
    Unknown { model: String, presets: String },
    #[error("reading {}: a Hugging Face model folder holds its config.json", path.display())]
    NoConfigJson { path: PathBuf },
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not JSON: {source}", path.display())]
    NotJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: `{key}` is {value}, not a count", path.display())]
    NotACount {
        path: PathBuf,
        key: String,
        value: String,
    },
    #[error("{}: no `{key}`", path.display())]
    Missing { path: PathBuf, key: &'static str },
    #[error("{}: neither `num_key_value_heads` nor `num_attention_heads`", path.display())]
    NoKvHeads { path: PathBuf },
    #[error("{}: no `head_dim`, and no `num_attention_heads` to derive it", path.display())]
    NoHeadDim { path: PathBuf },
    #[error("{}: `{key}` is 0, so the KV cache would take 0 bytes per token", path.display())]
    Zero { path: PathBuf, key: &'static str },
    #[error(
        "{name}: {layers} layers × {kv_heads} KV heads × head dim {head_dim} is 0 bytes per token"
    )]
    Empty {
        name: String,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
    },
    #[error("reading {model}: {source}")]
    Model {
        model: String,
        #[source]
        source: ModelError,
    },
}

/// Every preset name [`KvShape::of`] knows.
pub fn preset_names() -> Vec<&'static str> {
    let engine = PRESETS.iter().map(|p| p.name);
    engine.chain(KV_ONLY_PRESETS.iter().map(|p| p.0)).collect()
}

/// The Hugging Face `config.json` that `path` is, or holds (a folder).
pub fn hf_config_file(path: &Path) -> Option<PathBuf> {
    if path.is_dir() {
        return Some(path.join("config.json"));
    }
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    is_json.then(|| path.to_owned())
}

/// The folder of a model given as a folder or as its `config.json`.
pub fn model_folder(path: &Path) -> &Path {
    if path.is_dir() {
        path
    } else {
        path.parent().unwrap_or(Path::new("."))
    }
}

impl KvShape {
    /// The shape of `model`: a preset name, a `.gguf` file, or a Hugging Face folder or
    /// its `config.json`.
    pub fn of(model: &str) -> Result<Self, KvSizingError> {
        if let Ok(preset) = Preset::find(model) {
            let config = preset.config();
            return Ok(Self {
                name: preset.name.into(),
                layers: config.num_layers,
                kv_heads: config.num_kv_heads,
                head_dim: config.head_dim,
                vocab_size: None,
            });
        }
        if let Some(&(name, layers, kv_heads, head_dim)) =
            KV_ONLY_PRESETS.iter().find(|(name, ..)| *name == model)
        {
            return Ok(Self {
                name: name.into(),
                layers,
                kv_heads,
                head_dim,
                vocab_size: None,
            });
        }
        let path = Path::new(model);
        if !path.exists() {
            return Err(KvSizingError::Unknown {
                model: model.into(),
                presets: preset_names().join(", "),
            });
        }
        if let Some(config) = hf_config_file(path) {
            return Self::from_hf_config(&config);
        }
        let config = ModelConfig::read(path).map_err(|source| KvSizingError::Model {
            model: model.into(),
            source,
        })?;
        Ok(Self {
            name: config.name.clone(),
            layers: config.num_layers,
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            vocab_size: Some(config.vocab_size),
        })
    }

    /// The shape from a Hugging Face `config.json`, of any architecture: layers
    /// (`num_hidden_layers`), KV heads (`num_key_value_heads`, else
    /// `num_attention_heads`: no grouping) and head dim (`head_dim`, else `hidden_size /
    /// num_attention_heads`), from the top level or from `text_config` (multimodal
    /// models).
    pub fn from_hf_config(file: &Path) -> Result<Self, KvSizingError> {
        let text = std::fs::read_to_string(file).map_err(|source| {
            let is_folders_config = file.file_name().is_some_and(|n| n == "config.json");
            if is_folders_config && !file.exists() {
                KvSizingError::NoConfigJson { path: file.into() }
            } else {
                KvSizingError::Read {
                    path: file.into(),
                    source,
                }
            }
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|source| KvSizingError::NotJson {
            path: file.into(),
            source,
        })?;
        let config = if json.get("num_hidden_layers").is_none() {
            json.get("text_config").unwrap_or(&json)
        } else {
            &json
        };
        let fields = ConfigFields { file, config };
        let layers = fields.required("num_hidden_layers")?;
        let heads = fields.count("num_attention_heads")?;
        let kv_heads = match fields.count("num_key_value_heads")? {
            Some(n) => n,
            None => heads.ok_or_else(|| KvSizingError::NoKvHeads { path: file.into() })?,
        };
        let head_dim = match fields.count("head_dim")? {
            Some(d) => d,
            None => match heads {
                Some(h) if h > 0 => fields.required("hidden_size")? / h,
                _ => return Err(KvSizingError::NoHeadDim { path: file.into() }),
            },
        };
        for (key, value) in [
            ("num_hidden_layers", layers),
            ("num_key_value_heads", kv_heads),
            ("head_dim", head_dim),
        ] {
            if value == 0 {
                return Err(KvSizingError::Zero {
                    path: file.into(),
                    key,
                });
            }
        }
        let name = model_folder(file)
            .canonicalize()
            .ok()
            .as_deref()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Ok(Self {
            name,
            layers,
            kv_heads,
            head_dim,
            vocab_size: fields.count("vocab_size")?,
        })
    }

    /// Bytes one token's keys and values take at `element_bytes` per value; refused
    /// when the shape makes it 0.
    pub fn bytes_per_token(&self, element_bytes: usize) -> Result<usize, KvSizingError> {
        match 2 * self.layers * self.kv_heads * self.head_dim * element_bytes {
            0 => Err(KvSizingError::Empty {
                name: self.name.clone(),
                layers: self.layers,
                kv_heads: self.kv_heads,
                head_dim: self.head_dim,
            }),
            bytes => Ok(bytes),
        }
    }
}

/// The counts of one `config.json` object.
struct ConfigFields<'a> {
    file: &'a Path,
    config: &'a Value,
}

impl ConfigFields<'_> {
    fn count(&self, key: &str) -> Result<Option<usize>, KvSizingError> {
        match self.config.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => {
                value
                    .as_u64()
                    .map(|v| Some(v as usize))
                    .ok_or_else(|| KvSizingError::NotACount {
                        path: self.file.into(),
                        key: key.into(),
                        value: value.to_string(),
                    })
            }
        }
    }

    fn required(&self, key: &'static str) -> Result<usize, KvSizingError> {
        self.count(key)?.ok_or_else(|| KvSizingError::Missing {
            path: self.file.into(),
            key,
        })
    }
}

/// A request length limit that cannot be served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestLengthError {
    #[error("--max-model-len must be at least 1")]
    Zero,
    #[error("--max-model-len {asked} is longer than the model's context ({context} tokens)")]
    BeyondContext { asked: usize, context: usize },
}

/// The longest request (prompt plus output) a worker accepts: `asked`
/// (`--max-model-len`), else the model's `context` lowered to what a KV cache of
/// `kv_bytes` holds (with a warning). `kv_bytes` is `None` for a cache sized only once
/// the engine starts (a GPU's memory fraction); the engine then refuses to start if
/// the cache cannot hold the limit, as vLLM does.
pub fn max_model_len(
    context: usize,
    layout: &KvLayout,
    kv_bytes: Option<usize>,
    asked: Option<usize>,
) -> Result<usize, RequestLengthError> {
    if let Some(asked) = asked {
        return match asked {
            0 => Err(RequestLengthError::Zero),
            _ if asked > context => Err(RequestLengthError::BeyondContext { asked, context }),
            _ => Ok(asked),
        };
    }
    let Some(kv_bytes) = kv_bytes else {
        return Ok(context);
    };
    let kv_tokens = (kv_bytes / layout.bytes_per_block().max(1))
        .max(1)
        .saturating_mul(layout.block_size);
    if kv_tokens < context {
        tracing::warn!(
            "the KV cache holds {kv_tokens} tokens, fewer than the model's context \
             ({context}); max_model_len is {kv_tokens} (raise --kv-cache-memory for more)"
        );
        return Ok(kv_tokens);
    }
    Ok(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_3_1_8b_in_bf16_is_128_kib_per_token() {
        let shape = KvShape::of("llama-3.1-8b").unwrap();
        assert_eq!(shape.bytes_per_token(2).unwrap(), 128 << 10);
        assert!(KvShape::of("qwen3-0.6b").is_ok());
    }

    fn shape_of(config: &str) -> Result<KvShape, KvSizingError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.json");
        std::fs::write(&file, config).unwrap();
        KvShape::from_hf_config(&file)
    }

    #[test]
    fn configs_of_any_architecture_give_their_kv_shape() {
        // Qwen3-0.6B: head_dim 128 given (not hidden_size / heads = 64).
        let qwen = shape_of(
            r#"{"architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024,
                "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                "num_hidden_layers": 28, "vocab_size": 151936}"#,
        )
        .unwrap();
        assert_eq!((qwen.layers, qwen.kv_heads, qwen.head_dim), (28, 8, 128));
        assert_eq!(qwen.vocab_size, Some(151_936));
        // No KV heads or head_dim: one KV head per head, hidden_size / heads.
        let mha =
            shape_of(r#"{"hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12}"#)
                .unwrap();
        assert_eq!((mha.kv_heads, mha.head_dim, mha.vocab_size), (12, 64, None));
        // A multimodal config keeps the language model's in text_config.
        let nested = shape_of(
            r#"{"text_config": {"num_hidden_layers": 4, "num_key_value_heads": 2,
                "head_dim": 32}}"#,
        )
        .unwrap();
        assert_eq!(
            (nested.layers, nested.kv_heads, nested.head_dim),
            (4, 2, 32)
        );
    }

    #[test]
    fn configs_without_a_kv_size_are_refused() {
        let zero =
            shape_of(r#"{"num_hidden_layers": 2, "num_key_value_heads": 0, "head_dim": 64}"#);
        let err = zero.err().unwrap().to_string();
        assert!(err.contains("`num_key_value_heads` is 0"), "{err}");
        let missing = shape_of(r#"{"num_attention_heads": 2}"#).err().unwrap();
        assert!(missing.to_string().contains("no `num_hidden_layers`"));
        let wrong = shape_of(r#"{"num_hidden_layers": "many"}"#).err().unwrap();
        assert!(wrong.to_string().contains("not a count"), "{wrong}");
        let no_head_dim = shape_of(r#"{"num_hidden_layers": 2, "num_key_value_heads": 2}"#)
            .err()
            .unwrap();
        assert!(
            matches!(no_head_dim, KvSizingError::NoHeadDim { .. }),
            "{no_head_dim}"
        );
        let dir = tempfile::tempdir().unwrap();
        let folder = KvShape::from_hf_config(&dir.path().join("config.json"))
            .err()
            .unwrap();
        assert!(
            folder.to_string().contains("folder holds its config.json"),
            "{folder}"
        );
    }

    #[test]
    fn unknown_models_are_named_in_the_error() {
        let err = KvShape::of("llama-9").err().unwrap().to_string();
        assert!(
            err.contains("llama-9") && err.contains("qwen3-0.6b"),
            "{err}"
        );
    }

    /// Llama-3.1-8B's KV cache: 128 KiB a token in f16 (32 layers × 8 KV heads × 128 ×
    /// 2 × 2 bytes, as its published config gives), so 1 GiB holds 8,192 tokens.
    fn llama_8b_layout() -> KvLayout {
        KvLayout {
            num_layers: 32,
            num_kv_heads: 8,
            head_dim: 128,
            block_size: 16,
            dtype: crate::kv::KvDtype::F16,
        }
    }

    #[test]
    fn the_request_limit_is_the_context_lowered_to_what_the_cache_holds() {
        let layout = llama_8b_layout();
        assert_eq!(
            max_model_len(131_072, &layout, Some(1 << 30), None),
            Ok(8192)
        );
        assert_eq!(max_model_len(4096, &layout, Some(1 << 30), None), Ok(4096));
        // A cache smaller than one block still holds one block.
        assert_eq!(max_model_len(4096, &layout, Some(1), None), Ok(16));
        // Sized at start (a GPU): the context, which the engine then checks.
        assert_eq!(max_model_len(131_072, &layout, None, None), Ok(131_072));
    }

    #[test]
    fn an_asked_limit_is_taken_within_the_context_and_refused_beyond_it() {
        let layout = llama_8b_layout();
        // Asking is taken even above what the cache holds: the engine refuses to start.
        assert_eq!(
            max_model_len(131_072, &layout, Some(1 << 30), Some(20_000)),
            Ok(20_000)
        );
        assert_eq!(
            max_model_len(4096, &layout, None, Some(4097)),
            Err(RequestLengthError::BeyondContext {
                asked: 4097,
                context: 4096
            })
        );
        assert_eq!(
            max_model_len(4096, &layout, None, Some(0)),
            Err(RequestLengthError::Zero)
        );
    }
}
