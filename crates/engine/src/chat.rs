//! Chat templates: turning a conversation into the prompt text a model was trained on.
//!
//! Templates are the Jinja sources shipped with models (GGUF `tokenizer.chat_template`,
//! `tokenizer_config.json`), rendered with minijinja configured the way Hugging Face
//! `transformers` renders them: `trim_blocks` and `lstrip_blocks`, Python string
//! methods (`.strip()`, `.startswith()`, ...), `raise_exception(msg)` and a `tojson`
//! filter that formats like Python's `json.dumps`.

use std::path::Path;

use candle_core::quantized::gguf_file;
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

const TEMPLATE_NAME: &str = "chat_template";
const GGUF_KEY: &str = "tokenizer.chat_template";

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's tool calls, in OpenAI's shape (for templates that write
    /// them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` turn's call id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

/// A compiled chat template plus the BOS/EOS texts it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Whether the template has a place for `tools` (else they are offered in a
    /// system message; see [`crate::tools::offer_prompt`]).
    takes_tools: bool,
    source: String,
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token` and `eos_token` are the texts the template sees
    /// as `bos_token` and `eos_token`.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ModelError> {
        let mut env = hf_compatible_environment();
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(template_error)?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            takes_tools: source.contains("tools"),
            source: source.to_owned(),
        })
    }

    /// The template in a GGUF file's `tokenizer.chat_template`, if it has one.
    pub fn from_gguf(
        content: &gguf_file::Content,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Option<Self>, ModelError> {
        match content.metadata.get(GGUF_KEY) {
            None => Ok(None),
            Some(gguf_file::Value::String(source)) => {
                Self::new(source, bos_token, eos_token).map(Some)
            }
            Some(other) => Err(ModelError::ChatTemplate {
                detail: format!("`{GGUF_KEY}` is {:?}, not a string", other.value_type()),
            }),
        }
    }

    /// The template in a `tokenizer_config.json` file, if it has one: `chat_template`
    /// is either the source or a list of `{name, template}` of which `default` is used.
    pub fn from_tokenizer_config(
        path: &Path,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Option<Self>, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::corrupt(path, "JSON", e))?;
        Self::from_tokenizer_config_json(&config, bos_token, eos_token)
    }

    /// Like [`Self::from_tokenizer_config`], from already parsed JSON.
    pub fn from_tokenizer_config_json(
        config: &serde_json::Value,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Option<Self>, ModelError> {
        match config_template_source(config)? {
            Some(source) => Self::new(source, bos_token, eos_token).map(Some),
            None => Ok(None),
        }
    }

    /// The prompt for `messages`; with `add_generation_prompt`, ending with the header
    /// of the assistant's turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`Self::render`] with the functions the model may call (OpenAI's `tools`), which
    /// the template sees as `tools`.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        template
            .render(context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(template_error)
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template writes `tools` itself.
    pub fn takes_tools(&self) -> bool {
        self.takes_tools
    }
}

fn hf_compatible_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_filter("tojson", python_tojson);
    env
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `tojson` as `transformers` defines it: `json.dumps(value, ensure_ascii=False,
/// indent=indent)`, so `", "`/`": "` separators and no HTML escaping (minijinja's
/// built-in filter differs on both).
fn python_tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // Accepted for compatibility; output is never ASCII-escaped.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        Some(width) => {
            let indent = " ".repeat(width);
            let formatter = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
            value.serialize(&mut serde_json::Serializer::with_formatter(
                &mut out, formatter,
            ))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PythonCompactFormatter,
        )),
    };
    written.map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON")
            .with_source(e)
    })?;
    let json = String::from_utf8(out).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "JSON is not UTF-8").with_source(e)
    })?;
    Ok(Value::from_safe_string(json))
}

/// Python's default `json.dumps` separators: `", "` between items, `": "` after keys.
struct PythonCompactFormatter;

impl serde_json::ser::Formatter for PythonCompactFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `chat_template` in `tokenizer_config.json`: a string, or named templates of which
/// `default` is the chat template.
fn config_template_source(config: &serde_json::Value) -> Result<Option<&str>, ModelError> {
    let Some(template) = config.get("chat_template") else {
        return Ok(None);
    };
    if let Some(source) = template.as_str() {
        return Ok(Some(source));
    }
    let named = template
        .as_array()
        .ok_or_else(|| ModelError::ChatTemplate {
            detail: "`chat_template` is neither a string nor a list of named templates".into(),
        })?;
    let default = named
        .iter()
        .find(|entry| entry.get("name").and_then(|n| n.as_str()) == Some("default"));
    let Some(default) = default else {
        return Ok(None);
    };
    default
        .get("template")
        .and_then(|t| t.as_str())
        .map(Some)
        .ok_or_else(|| ModelError::ChatTemplate {
            detail: "the `default` chat template has no `template` string".into(),
        })
}

/// The error with its causes: minijinja puts the template location in the message
/// and the failing call's error (such as `raise_exception`'s text) in the detail.
fn template_error(err: minijinja::Error) -> ModelError {
    let mut detail = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        detail.push_str(": ");
        detail.push_str(&cause.to_string());
        source = cause.source();
    }
    ModelError::ChatTemplate { detail }
}
