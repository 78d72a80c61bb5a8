//! A model ready to serve: weights, tokenizer and chat template, loaded together from
//! one path (a `.gguf` file or a Hugging Face folder).

use std::path::{Path, PathBuf};

use crate::chat::ChatTemplate;
use crate::error::ModelError;
use crate::model::source::GgufSource;
use crate::model::{self, Llama, LoadOptions, ModelFormat};
use crate::tokenizer::Tokenizer;

pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// `None` when the model ships no chat template.
    pub chat_template: Option<ChatTemplate>,
    pub path: PathBuf,
}

/// The seed of every dummy model's weights: workers with the same preset hold the same
/// model (and can hand KV to each other).
pub const DUMMY_SEED: u64 = 0;

impl LoadedModel {
    pub fn load(path: &Path, options: LoadOptions) -> Result<Self, ModelError> {
        let loaded = match ModelFormat::detect(path)? {
            ModelFormat::Gguf(file) => Self::load_gguf(&file, options)?,
            ModelFormat::HfDir(dir) => Self::load_hf_dir(&dir, options)?,
        };
        loaded.check_vocabulary()?;
        Ok(loaded)
    }

    /// A preset's shapes with random weights (`--load-format dummy`), with the default
    /// model's tokenizer and chat template (`tokenizer_gguf`): text in, ids within any
    /// preset's vocabulary; what comes out is meaningless.
    pub fn dummy(
        preset: &str,
        tokenizer_gguf: &Path,
        options: LoadOptions,
    ) -> Result<Self, ModelError> {
        let preset = crate::model::dummy::Preset::find(preset)?;
        let model = crate::model::load_dummy(preset, DUMMY_SEED, options)?;
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

fn special_strings(tokenizer: &Tokenizer) -> (String, String) {
    (
        tokenizer.bos_token().unwrap_or_default(),
        tokenizer.eos_token().unwrap_or_default(),
    )
}
