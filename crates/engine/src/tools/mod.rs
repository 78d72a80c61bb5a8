//! Tool calling, apart from HTTP: the formats models write tool calls in
//! ([`ToolCallFormat`]: `hermes`, `llama3_json`, as vLLM's `--tool-call-parser` names
//! them), pulling calls out of generated text as it streams ([`ToolCallExtractor`]),
//! and the system prompt that offers tools to a model whose chat template has no
//! place for them ([`offer_prompt`]).

mod extract;

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

pub use extract::{Piece, ToolCallExtractor};

/// How a model writes a tool call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ToolCallFormat {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, once per call
    /// (Hermes, Qwen 2.5, SmolLM3 and the default model's family).
    #[default]
    Hermes,
    /// A bare JSON object `{"name": ..., "parameters": {...}}`, optionally after
    /// `<|python_tag|>`, calls separated by `;` (Llama 3.1–3.3).
    Llama3Json,
}

impl ToolCallFormat {
    pub const NAMES: &'static [&'static str] = &["hermes", "llama3_json"];

    pub fn name(self) -> &'static str {
        match self {
            ToolCallFormat::Hermes => "hermes",
            ToolCallFormat::Llama3Json => "llama3_json",
        }
    }
}

impl fmt::Display for ToolCallFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown format name.
#[derive(Debug, thiserror::Error)]
#[error("unknown tool call parser `{0}` (known: hermes, llama3_json)")]
pub struct UnknownFormat(String);

impl FromStr for ToolCallFormat {
    type Err = UnknownFormat;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "hermes" => Ok(ToolCallFormat::Hermes),
            "llama3_json" => Ok(ToolCallFormat::Llama3Json),
            other => Err(UnknownFormat(other.to_owned())),
        }
    }
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

impl ToolCall {
    /// A call from a JSON object with `name` and `arguments` (or Llama's `parameters`).
    fn from_json(value: &Value) -> Option<Self> {
        let object = value.as_object()?;
        let name = object.get("name")?.as_str()?.to_owned();
        let arguments = match object.get("arguments").or_else(|| object.get("parameters")) {
            None => "{}".to_owned(),
            Some(Value::String(text)) => text.clone(),
            Some(value) => value.to_string(),
        };
        Some(Self { name, arguments })
    }
}

/// A system prompt offering `tools` (OpenAI's `{"type": "function", "function": {...}}`
/// objects) and telling the model how to call them in `format`.
pub fn offer_prompt(tools: &[Value], format: ToolCallFormat) -> String {
    let listed: Vec<String> = tools
        .iter()
        .map(|tool| tool.get("function").unwrap_or(tool).to_string())
        .collect();
    let listed = listed.join("\n");
    match format {
        ToolCallFormat::Hermes => format!(
            "You can call functions to help with the user's request. The functions \
             available, as JSON schemas:\n<tools>\n{listed}\n</tools>\nTo call one, \
             answer with its name and arguments as a JSON object inside tags, one \
             call per tag pair:\n<tool_call>\n{{\"name\": <function name>, \
             \"arguments\": <arguments object>}}\n</tool_call>"
        ),
        ToolCallFormat::Llama3Json => format!(
            "You can call functions to help with the user's request. The functions \
             available, as JSON schemas:\n{listed}\nTo call one, answer with only a JSON \
             object of the form {{\"name\": <function name>, \"parameters\": \
             <arguments object>}}."
        ),
    }
}

/// How an earlier assistant turn's calls are written back into the conversation for a
/// template with no place for them.
pub fn written_calls(calls: &[ToolCall], format: ToolCallFormat) -> String {
    let objects = calls.iter().map(|call| {
        let arguments: Value =
            serde_json::from_str(&call.arguments).unwrap_or(Value::String(call.arguments.clone()));
        (call.name.clone(), arguments)
    });
    match format {
        ToolCallFormat::Hermes => objects
            .map(|(name, arguments)| {
                let call = serde_json::json!({"name": name, "arguments": arguments});
                format!("<tool_call>\n{call}\n</tool_call>")
            })
            .collect::<Vec<_>>()
            .join("\n"),
        ToolCallFormat::Llama3Json => objects
            .map(|(name, arguments)| {
                serde_json::json!({"name": name, "parameters": arguments}).to_string()
            })
            .collect::<Vec<_>>()
            .join("; "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn formats_parse_by_vllms_names() {
        assert_eq!(
            "hermes".parse::<ToolCallFormat>().unwrap(),
            ToolCallFormat::Hermes
        );
        assert_eq!(
            "llama3_json".parse::<ToolCallFormat>().unwrap(),
            ToolCallFormat::Llama3Json
        );
        assert!("mistral".parse::<ToolCallFormat>().is_err());
    }

    #[test]
    fn calls_read_arguments_or_parameters() {
        let call = ToolCall::from_json(&json!({"name": "f", "parameters": {"a": 1}})).unwrap();
        assert_eq!(call.arguments, r#"{"a":1}"#);
        let call = ToolCall::from_json(&json!({"name": "f", "arguments": "{\"a\": 1}"})).unwrap();
        assert_eq!(call.arguments, "{\"a\": 1}");
        assert!(ToolCall::from_json(&json!({"arguments": {}})).is_none());
    }

    #[test]
    fn written_calls_read_back_as_the_same_calls() {
        let calls = vec![ToolCall {
            name: "add".into(),
            arguments: r#"{"a":2,"b":3}"#.into(),
        }];
        for format in [ToolCallFormat::Hermes, ToolCallFormat::Llama3Json] {
            let text = written_calls(&calls, format);
            let mut extractor = ToolCallExtractor::auto(format);
            let mut pieces = extractor.push(&text);
            pieces.extend(extractor.finish());
            assert_eq!(
                pieces,
                vec![Piece::Call(calls[0].clone())],
                "{format}: {text}"
            );
        }
    }
}
