//! A model ready to serve: weights, tokenizer and chat template, loaded together from
//! one path (a `.gguf` file or a Hugging Face folder).

use std::path::{Path, PathBuf};

use crate::chat::ChatTemplate;
use crate::error::ModelError;
use crate::exec::{Device, Model, WeightFormat};
use crate::model::source::GgufSource;
use crate::model::{self, LoadOptions, ModelFormat};
use crate::tokenizer::Tokenizer;

/// Where and how to load a model's weights.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    pub device: Device,
    /// GPU weight type and quantization.
    pub weights: WeightFormat,
    /// CPU loading options.
    pub options: LoadOptions,
}

impl Default for Placement {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            weights: WeightFormat::default(),
            options: LoadOptions::default(),
        }
    }
}

impl From<LoadOptions> for Placement {
    fn from(options: LoadOptions) -> Self {
        Self {
            options,
            ..Self::default()
        }
    }
}

/// Loading a model onto a device failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("loading onto {device}: {detail}")]
    Device { device: Device, detail: String },
}

pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// `None` when the model ships no chat template.
    pub chat_template: Option<ChatTemplate>,
    pub path: PathBuf,
}

/// The seed of every dummy model's weights: workers with the same preset hold the same
/// model (and can hand KV to each other).
pub const DUMMY_SEED: u64 = 0;

impl LoadedModel {
    /// Loads the model at `path` for the CPU.
    pub fn load(path: &Path, options: LoadOptions) -> Result<Self, ModelError> {
        let loaded = match ModelFormat::detect(path)? {
            ModelFormat::Gguf(file) => Self::load_gguf(&file, options)?,
            ModelFormat::HfDir(dir) => Self::load_hf_dir(&dir, options)?,
        };
        loaded.check_vocabulary()?;
        Ok(loaded)
    }

    /// Loads the model at `path` onto `placement.device`.
    pub fn load_on(path: &Path, placement: Placement) -> Result<Self, LoadError> {
        match placement.device {
            Device::Cpu => Ok(Self::load(path, placement.options)?),
            Device::Cuda(ordinal) => {
                let model = load_cuda(path, ordinal, placement.weights)?;
                // Tokenizer and template from the same files, without the CPU weights.
                let mut loaded = match ModelFormat::detect(path)? {
                    ModelFormat::Gguf(file) => Self::text_from_gguf(&file, model)?,
                    ModelFormat::HfDir(dir) => Self::text_from_hf_dir(&dir, model)?,
                };
                loaded.path = path.into();
                loaded.check_vocabulary()?;
                Ok(loaded)
            }
        }
    }

    /// The CPU model (tests, `generate` and the benchmarks run on the CPU).
    pub fn cpu(&self) -> &crate::model::Llama {
        self.model.cpu().expect("this model was loaded for the CPU")
    }

    /// A preset's shapes with random weights (`--load-format dummy`), with the default
    /// model's tokenizer and chat template (`tokenizer_gguf`): text in, ids within any
    /// preset's vocabulary; what comes out is meaningless.
    pub fn dummy(
        preset: &str,
        tokenizer_gguf: &Path,
        placement: Placement,
    ) -> Result<Self, LoadError> {
        let preset = crate::model::dummy::Preset::find(preset)?;
        let model = match placement.device {
            Device::Cpu => crate::model::load_dummy(preset, DUMMY_SEED, placement.options)?.into(),
            Device::Cuda(ordinal) => dummy_cuda(preset, ordinal, placement.weights)?,
        };
        let source = GgufSource::open(tokenizer_gguf)?;
        let tokenizer = Tokenizer::from_gguf(&source.content, tokenizer_gguf)?;
        let (bos, eos) = special_strings(&tokenizer);
        let chat_template = ChatTemplate::from_gguf(&source.content, &bos, &eos)?;
        let loaded = Self {
            model,
            tokenizer,
            chat_template,
            path: PathBuf::from(format!("dummy:{}", preset.name)),
        };
        loaded.check_vocabulary()?;
        Ok(loaded)
    }

    fn load_gguf(path: &Path, options: LoadOptions) -> Result<Self, ModelError> {
        let source = GgufSource::open(path)?;
        let model = model::load_gguf(&source, path, options)?;
        Self::text_from_gguf(path, model.into())
    }

    /// `model` with the tokenizer and chat template of the GGUF file at `path`.
    fn text_from_gguf(path: &Path, model: Model) -> Result<Self, ModelError> {
        let source = GgufSource::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&source.content, path)?;
        let (bos, eos) = special_strings(&tokenizer);
        let chat_template = ChatTemplate::from_gguf(&source.content, &bos, &eos)?;
        Ok(Self {
            model,
            tokenizer,
            chat_template,
            path: path.into(),
        })
    }

    fn load_hf_dir(dir: &Path, options: LoadOptions) -> Result<Self, ModelError> {
        let model = model::load_hf_dir(dir, options)?;
        Self::text_from_hf_dir(dir, model.into())
    }

    /// `model` with the tokenizer and chat template of the Hugging Face folder `dir`.
    fn text_from_hf_dir(dir: &Path, model: Model) -> Result<Self, ModelError> {
        let tokenizer = Tokenizer::from_hf_dir(dir)?;
        let (bos, eos) = special_strings(&tokenizer);
        let config_path = dir.join("tokenizer_config.json");
        let chat_template = if config_path.is_file() {
            ChatTemplate::from_tokenizer_config(&config_path, &bos, &eos)?
        } else {
            None
        };
        Ok(Self {
            model,
            tokenizer,
            chat_template,
            path: dir.into(),
        })
    }

    /// Every id the tokenizer can produce must have an embedding row.
    fn check_vocabulary(&self) -> Result<(), ModelError> {
        let model_vocab = self.model.config().vocab_size;
        let tokenizer_vocab = self.tokenizer.vocab_size();
        if tokenizer_vocab > model_vocab {
            return Err(ModelError::Tokenizer {
                path: self.tokenizer.source().into(),
                detail: format!(
                    "the tokenizer has {tokenizer_vocab} tokens but the model only {model_vocab} embeddings"
                ),
            });
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
fn load_cuda(path: &Path, ordinal: usize, format: WeightFormat) -> Result<Model, LoadError> {
    use crate::cuda::weights::LoadError as GpuLoadError;
    match crate::cuda::CudaModel::load(path, ordinal, format) {
        Ok(model) => Ok(Model::Cuda(std::sync::Arc::new(model))),
        Err(GpuLoadError::Model(err)) => Err(err.into()),
        Err(GpuLoadError::Gpu(err)) => Err(LoadError::Device {
            device: Device::Cuda(ordinal),
            detail: err.to_string(),
        }),
    }
}

#[cfg(feature = "cuda")]
fn dummy_cuda(
    preset: &crate::model::dummy::Preset,
    ordinal: usize,
    format: WeightFormat,
) -> Result<Model, LoadError> {
    use crate::cuda::weights::LoadError as GpuLoadError;
    match crate::cuda::CudaModel::dummy(preset, DUMMY_SEED, ordinal, format) {
        Ok(model) => Ok(Model::Cuda(std::sync::Arc::new(model))),
        Err(GpuLoadError::Model(err)) => Err(err.into()),
        Err(GpuLoadError::Gpu(err)) => Err(LoadError::Device {
            device: Device::Cuda(ordinal),
            detail: err.to_string(),
        }),
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda(ordinal: usize) -> LoadError {
    LoadError::Device {
        device: Device::Cuda(ordinal),
        detail: "this tandem was built without GPU support; build it with \
                 `cargo build --release --features tandem-cli/cuda` (see docs/gpu.md)"
            .into(),
    }
}

#[cfg(not(feature = "cuda"))]
fn load_cuda(_: &Path, ordinal: usize, _: WeightFormat) -> Result<Model, LoadError> {
    Err(no_cuda(ordinal))
}

#[cfg(not(feature = "cuda"))]
fn dummy_cuda(
    _: &crate::model::dummy::Preset,
    ordinal: usize,
    _: WeightFormat,
) -> Result<Model, LoadError> {
    Err(no_cuda(ordinal))
}

fn special_strings(tokenizer: &Tokenizer) -> (String, String) {
    (
        tokenizer.bos_token().unwrap_or_default(),
        tokenizer.eos_token().unwrap_or_default(),
    )
}
