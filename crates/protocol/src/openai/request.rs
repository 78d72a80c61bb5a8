//! Request bodies of `/v1/completions` and `/v1/chat/completions`.
//!
//! Fields are parsed leniently about what is absent (every field but the prompt or
//! the messages is optional) and strictly about types; unknown fields are ignored, as
//! vLLM does. Integers that users get wrong by sign (`max_tokens`, `n`, `top_k`) are
//! parsed as signed so that validation can say what was wrong instead of failing in
//! the parser. Range checks are the server's job.

use serde::Deserialize;
use serde_json::Value;

/// Sampling and output fields shared by both endpoints.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct SamplingFields {
    /// vLLM's `prompt_logprobs`: the prompt tokens' log probabilities, with this many
    /// top tokens each.
    pub prompt_logprobs: Option<Value>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// `-1` or `0`: no limit.
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<StopStrings>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// vLLM's: 1 is off.
    pub repetition_penalty: Option<f64>,
    /// vLLM's: 0 is off.
    pub min_p: Option<f64>,
    /// Token id (as a string) to a bias added to its logit.
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// vLLM's: end tokens cannot come before this many output tokens.
    pub min_tokens: Option<i64>,
    /// vLLM's: a matched stop string stays at the end of the text.
    pub include_stop_str_in_output: Option<bool>,
    /// vLLM's: special tokens are left out of the text (default true).
    pub skip_special_tokens: Option<bool>,
    pub ignore_eos: Option<bool>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Not supported: any value but `null`/`false` is refused.
    pub logprobs: Option<Value>,
    pub user: Option<String>,
    /// vLLM's extension: answers carry the prompt's and the output's token ids.
    pub return_token_ids: Option<bool>,
    /// vLLM's prefill/decode hand-off (see [`crate::pd`]).
    pub kv_transfer_params: Option<crate::pd::KvTransferParams>,
    /// Structured output, OpenAI's way: `{"type": "text" | "json_object" |
    /// "json_schema", "json_schema": {"name", "schema", "strict"}}`.
    pub response_format: Option<Value>,
    /// Structured output, vLLM's way: one of `json`, `regex`, `choice`, `grammar`,
    /// `json_object`, with layout options.
    pub structured_outputs: Option<Value>,
    /// vLLM's older structured output fields, one per kind.
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    pub guided_whitespace_pattern: Option<Value>,
    pub guided_decoding_backend: Option<Value>,
}

impl SamplingFields {
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether a streamed response ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|options| options.include_usage)
            .unwrap_or(false)
    }

    /// Whether every streamed chunk carries the usage so far (needs `include_usage`).
    pub fn continuous_usage(&self) -> bool {
        self.include_usage()
            && self
                .stream_options
                .as_ref()
                .and_then(|options| options.continuous_usage_stats)
                .unwrap_or(false)
    }

    /// The stop strings, as a list (empty when none).
    pub fn stop_strings(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(StopStrings::One(stop)) => vec![stop.clone()],
            Some(StopStrings::Many(stops)) => stops.clone(),
        }
    }

    pub fn wants_token_ids(&self) -> bool {
        self.return_token_ids.unwrap_or(false)
    }

    /// Whether `logprobs` asks for log probabilities (unsupported).
    pub fn wants_logprobs(&self) -> bool {
        is_set(self.logprobs.as_ref())
    }
}

/// Whether an optional JSON value asks for something (not absent, `null` or `false`).
fn is_set(value: Option<&Value>) -> bool {
    !matches!(value, None | Some(Value::Null) | Some(Value::Bool(false)))
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    /// With `include_usage`: every chunk carries the usage so far (vLLM's).
    pub continuous_usage_stats: Option<bool>,
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum StopStrings {
    One(String),
    Many(Vec<String>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: Prompt,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// The prompt's text (and, with `logprobs`, tokens) before each choice's output.
    #[serde(default)]
    pub echo: Option<Value>,
    /// Candidates per prompt, of which the `n` most likely are returned.
    #[serde(default)]
    pub best_of: Option<i64>,
    /// Whether a text prompt gets the tokenizer's special tokens (BOS); default true.
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
}

impl CompletionRequest {
    pub fn wants_echo(&self) -> bool {
        is_set(self.echo.as_ref())
    }
}

/// `prompt`: text or token ids, one prompt or a list of them (one choice each).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// One prompt of a [`Prompt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptInput<'a> {
    Text(&'a str),
    Tokens(&'a [u32]),
}

impl Prompt {
    /// The prompts in order (an empty list for `[]`).
    pub fn inputs(&self) -> Vec<PromptInput<'_>> {
        match self {
            Prompt::Text(text) => vec![PromptInput::Text(text)],
            Prompt::Texts(texts) => texts.iter().map(|t| PromptInput::Text(t)).collect(),
            Prompt::Tokens(ids) => vec![PromptInput::Tokens(ids)],
            Prompt::TokenLists(lists) => lists.iter().map(|ids| PromptInput::Tokens(ids)).collect(),
        }
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatCompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    /// The newer name of `max_tokens`; wins when both are given.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// Not supported when true.
    #[serde(default)]
    pub top_logprobs: Option<Value>,
    /// Whether the prompt ends with the header of the assistant's turn (default true).
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    /// Whether the last message is left open for the model to continue (default false).
    #[serde(default)]
    pub continue_final_message: Option<bool>,
    /// Functions the model may call: `[{"type": "function", "function": {"name",
    /// "description", "parameters"}}]`.
    #[serde(default)]
    pub tools: Option<Value>,
    /// `"none"`, `"auto"`, `"required"` or `{"type": "function", "function": {"name"}}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Whether `required` may produce several calls (default true).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

impl ChatCompletionRequest {
    /// `max_completion_tokens`, else `max_tokens`.
    pub fn max_tokens(&self) -> Option<i64> {
        self.max_completion_tokens.or(self.sampling.max_tokens)
    }

    /// The name of the field [`Self::max_tokens`] comes from, for error messages.
    pub fn max_tokens_field(&self) -> &'static str {
        if self.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        }
    }

    pub fn wants_logprobs(&self) -> bool {
        self.sampling.wants_logprobs() || is_set(self.top_logprobs.as_ref())
    }
}

/// One message of a conversation (other fields are refused before parsing).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    #[serde(default)]
    pub name: Option<String>,
    /// An assistant turn's calls: `[{"id", "type": "function", "function": {"name",
    /// "arguments"}}]`.
    #[serde(default)]
    pub tool_calls: Option<Value>,
    /// A `tool` turn: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// `content`: a string or a list of typed parts (only text parts are supported).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    /// The text, with parts joined by newlines (as vLLM joins text parts).
    pub fn text(&self) -> String {
        match self {
            MessageContent::Text(text) => text.clone(),
            MessageContent::Parts(parts) => parts
                .iter()
                .map(|ContentPart::Text { text }| text.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    /// The length in bytes of [`Self::text`], without building it.
    pub fn text_len(&self) -> usize {
        match self {
            MessageContent::Text(text) => text.len(),
            MessageContent::Parts(parts) => {
                let joined: usize = parts
                    .iter()
                    .map(|ContentPart::Text { text }| text.len())
                    .sum();
                joined + parts.len().saturating_sub(1)
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(json: &str) -> CompletionRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn prompt_takes_the_four_openai_forms() {
        let cases = [
            (r#""hi""#, 1),
            (r#"["a", "b"]"#, 2),
            ("[1, 2, 3]", 1),
            ("[[1, 2], [3]]", 2),
        ];
        for (prompt, count) in cases {
            let request = completion(&format!(r#"{{"prompt": {prompt}}}"#));
            assert_eq!(request.prompt.inputs().len(), count, "{prompt}");
        }
        let request = completion(r#"{"prompt": [5, 6]}"#);
        assert_eq!(request.prompt.inputs(), vec![PromptInput::Tokens(&[5, 6])]);
    }

    #[test]
    fn sampling_fields_and_unknown_fields() {
        let request = completion(
            r#"{"model": "m", "prompt": "x", "max_tokens": 5, "temperature": 0,
                "top_p": 0.9, "top_k": -1, "seed": 7, "stop": "\n", "ignore_eos": true,
                "stream": true, "stream_options": {"include_usage": true},
                "best_of": 1, "whatever": {"nested": [1]}}"#,
        );
        let sampling = &request.sampling;
        assert_eq!(request.model.as_deref(), Some("m"));
        assert_eq!(sampling.max_tokens, Some(5));
        assert_eq!(sampling.temperature, Some(0.0));
        assert_eq!(sampling.top_k, Some(-1));
        assert_eq!(sampling.seed, Some(7));
        assert_eq!(sampling.stop_strings(), vec!["\n".to_owned()]);
        assert!(sampling.is_stream() && sampling.include_usage());
        assert_eq!(sampling.ignore_eos, Some(true));
    }

    #[test]
    fn wrong_types_are_parse_errors() {
        for body in [
            r#"{"prompt": 5}"#,
            r#"{"prompt": "x", "max_tokens": "5"}"#,
            r#"{"prompt": "x", "temperature": "hot"}"#,
            r#"{"prompt": "x", "stop": [1]}"#,
            r#"{"prompt": [-1]}"#,
            r#"{"max_tokens": 5}"#,
        ] {
            assert!(
                serde_json::from_str::<CompletionRequest>(body).is_err(),
                "{body}"
            );
        }
    }

    #[test]
    fn echo_and_logprobs_count_only_when_set() {
        assert!(!completion(r#"{"prompt": "x", "echo": false, "logprobs": null}"#).wants_echo());
        let request = completion(r#"{"prompt": "x", "echo": true, "logprobs": 2}"#);
        assert!(request.wants_echo() && request.sampling.wants_logprobs());
    }

    #[test]
    fn chat_messages_take_strings_or_text_parts() {
        let request: ChatCompletionRequest = serde_json::from_str(
            r#"{"messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null}
            ], "max_tokens": 3, "max_completion_tokens": 4}"#,
        )
        .unwrap();
        let texts: Vec<_> = request
            .messages
            .iter()
            .map(|m| m.content.as_ref().map(MessageContent::text))
            .collect();
        assert_eq!(
            texts,
            vec![Some("be brief".into()), Some("a\nb".into()), None]
        );
        assert_eq!(request.max_tokens(), Some(4));
        assert_eq!(request.max_tokens_field(), "max_completion_tokens");
    }

    #[test]
    fn image_parts_are_parse_errors() {
        let body = r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}"#;
        assert!(serde_json::from_str::<ChatCompletionRequest>(body).is_err());
    }
}
