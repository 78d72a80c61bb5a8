//! Checking a request against the served model and turning it into what the engine
//! runs: prompt token ids that fit the context, sampling parameters, a token budget
//! and stop conditions. Every failure is an [`ApiError`] naming the field at fault.

use tandem_protocol::openai::{ApiError, ChatMessage as WireMessage, PromptInput, SamplingFields};

use super::ServedModel;
use crate::chat::{ChatMessage, ChatTemplate};
use crate::constrain::OutputConstraint;
use crate::sample::SamplingParams;
use crate::tokenizer::Tokenizer;
use crate::tools::{ToolCall, ToolCallFormat, offer_prompt, written_calls};
use crate::transfer::KvRole;

/// Roles a chat message may have.
const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// Most stop strings per request, and the longest one, in bytes: each output token
/// is checked against all of them, so they are bounded.
const MAX_STOP_STRINGS: usize = 256;
const MAX_STOP_STRING_BYTES: usize = 4096;

/// Largest |penalty| OpenAI accepts.
const MAX_PENALTY: f64 = 2.0;

/// How the output of a request is produced and ended.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputOptions {
    pub sampling: SamplingParams,
    /// Asked for by the client; `None` lets each prompt use the rest of the context.
    pub max_tokens: Option<usize>,
    pub stop_strings: Vec<String>,
    /// Token ids that end the output: the client's plus, unless `ignore_eos`, the
    /// model's end-of-generation ids.
    pub stop_token_ids: Vec<u32>,
    /// The client's own `stop_token_ids` (reported as `stop_reason` when they match).
    pub requested_stop_token_ids: Vec<u32>,
    /// Choices per prompt (`n`), each sampled on its own.
    pub n: usize,
    /// `best_of` above `n` (completions): the candidates each prompt samples, of which
    /// the `n` most likely are returned.
    pub best_of: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// Every streamed chunk carries the usage so far.
    pub continuous_usage: bool,
    /// vLLM's `return_token_ids`: answers carry the prompt's and the output's ids.
    pub return_token_ids: bool,
    /// vLLM's `include_stop_str_in_output`.
    pub include_stop_string: bool,
    /// vLLM's `skip_special_tokens` (default true).
    pub skip_special_tokens: bool,
    /// `echo` (completions): the prompt's text begins each choice's text.
    pub echo: bool,
    /// The request's part in a KV hand-off (set by the endpoint once it knows the
    /// prompts).
    pub kv: KvRole,
    /// The grammar every choice's output follows (structured output), if any.
    pub constraint: Option<OutputConstraint>,
    /// The engine computes the prompt tokens' log probabilities, with this many top
    /// tokens: the most that [`Self::echo_logprobs`] and
    /// [`Self::reported_prompt_logprobs`] ask for.
    pub prompt_logprobs: Option<usize>,
    /// `echo` with `logprobs` (completions): the echoed tokens' top tokens.
    pub echo_logprobs: Option<usize>,
    /// vLLM's `prompt_logprobs`: reported beside the output, with this many top tokens.
    pub reported_prompt_logprobs: Option<usize>,
}

/// One prompt ready for the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedPrompt {
    pub ids: Vec<u32>,
    /// Most tokens to generate (at least 1, within the context).
    pub max_tokens: usize,
}

/// What the prompt is called in context-length messages.
#[derive(Debug, Clone, Copy)]
pub enum PromptNoun {
    Prompt,
    Messages,
}

impl PromptNoun {
    fn as_str(self) -> &'static str {
        match self {
            PromptNoun::Prompt => "prompt",
            PromptNoun::Messages => "messages",
        }
    }
}

/// The request must name the served model, or none.
pub fn check_model(requested: Option<&str>, served: &ServedModel) -> Result<(), ApiError> {
    match requested {
        Some(name) if name != served.name => Err(ApiError::not_found(format!(
            "The model `{name}` does not exist."
        ))
        .with_param("model")),
        _ => Ok(()),
    }
}

/// Checks the sampling and output fields. `max_tokens` (with the name of the field
/// it came from) is passed apart because chat requests have two names for it.
pub fn output_options(
    fields: &SamplingFields,
    max_tokens: (&str, Option<i64>),
    tokenizer: &Tokenizer,
    model: &ServedModel,
) -> Result<OutputOptions, ApiError> {
    let n = choices_per_prompt(fields.n)?;
    if fields.stream_options.is_some() && !fields.is_stream() {
        // vLLM's check, word for word.
        return Err(ApiError::invalid_param(
            "stream_options",
            "Stream options can only be defined when `stream=True`.",
        ));
    }
    check_penalty("presence_penalty", fields.presence_penalty)?;
    check_penalty("frequency_penalty", fields.frequency_penalty)?;
    let stop_token_ids = stop_token_ids(fields, tokenizer, model)?;
    let stop_strings = fields.stop_strings();
    check_stop_strings(&stop_strings)?;
    let reported_prompt_logprobs =
        prompt_logprobs(fields.prompt_logprobs.as_ref(), fields.is_stream())?;
    Ok(OutputOptions {
        sampling: sampling_params(fields, model.vocab_size)?,
        max_tokens: max_tokens
            .1
            .map(|value| positive_max_tokens(max_tokens.0, value))
            .transpose()?,
        stop_strings,
        stop_token_ids,
        requested_stop_token_ids: fields.stop_token_ids.clone().unwrap_or_default(),
        n,
        best_of: None,
        stream: fields.is_stream(),
        include_usage: fields.include_usage(),
        continuous_usage: fields.continuous_usage(),
        return_token_ids: fields.wants_token_ids(),
        include_stop_string: fields.include_stop_str_in_output.unwrap_or(false),
        skip_special_tokens: fields.skip_special_tokens.unwrap_or(true),
        echo: false,
        kv: KvRole::Local,
        constraint: None,
        prompt_logprobs: reported_prompt_logprobs,
        echo_logprobs: None,
        reported_prompt_logprobs,
    })
}

/// vLLM's `prompt_logprobs`: how many top tokens each prompt token's entry lists. Not
/// streamed (as in vLLM), and not the whole vocabulary (`-1`).
fn prompt_logprobs(
    value: Option<&serde_json::Value>,
    stream: bool,
) -> Result<Option<usize>, ApiError> {
    let invalid = |message: String| ApiError::invalid_param("prompt_logprobs", message);
    let top = match value {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(value) => value.as_i64().ok_or_else(|| {
            invalid(format!(
                "`prompt_logprobs` must be an integer, got {value}."
            ))
        })?,
    };
    if stream {
        return Err(invalid(
            "`prompt_logprobs` are not available when `stream=True`.".into(),
        ));
    }
    match top {
        0.. if top as u64 <= MAX_LOGPROBS => Ok(Some(top as usize)),
        -1 => Err(invalid(format!(
            "prompt_logprobs -1 (the whole vocabulary) is not supported; ask for at most \
             {MAX_LOGPROBS} top tokens."
        ))),
        _ => Err(invalid(format!(
            "`prompt_logprobs` must be between 0 and {MAX_LOGPROBS}, got {top}."
        ))),
    }
}

/// Refuses prompt log probabilities for a request whose prompt KV comes from a prefill
/// worker: they come from computing the prompt.
pub fn check_prompt_computed_here(options: &OutputOptions) -> Result<(), ApiError> {
    if options.prompt_logprobs.is_some() && matches!(options.kv, KvRole::RemotePrefill(_)) {
        return Err(ApiError::invalid_param(
            "kv_transfer_params",
            "prompt log probabilities (prompt_logprobs, or echo with logprobs) need the \
             prompt computed here, not pulled from a prefill worker.",
        ));
    }
    Ok(())
}

fn sampling_params(fields: &SamplingFields, vocab_size: usize) -> Result<SamplingParams, ApiError> {
    let temperature = fields.temperature.unwrap_or(1.0);
    if temperature.is_nan() || temperature < 0.0 {
        return Err(ApiError::invalid_param(
            "temperature",
            format!("temperature must be non-negative, got {temperature}."),
        ));
    }
    let top_p = fields.top_p.unwrap_or(1.0);
    if top_p.is_nan() || top_p <= 0.0 || top_p > 1.0 {
        return Err(ApiError::invalid_param(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}."),
        ));
    }
    let top_k = match fields.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        k => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("top_k must be -1 (disable), or at least 1, got {k}."),
            ));
        }
    };
    Ok(SamplingParams {
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k,
        seed: fields.seed,
        presence_penalty: fields.presence_penalty.unwrap_or(0.0) as f32,
        frequency_penalty: fields.frequency_penalty.unwrap_or(0.0) as f32,
        repetition_penalty: repetition_penalty(fields.repetition_penalty)?,
        min_p: min_p(fields.min_p)?,
        logit_bias: logit_bias(fields.logit_bias.as_ref(), vocab_size)?,
        min_tokens: min_tokens(fields)?,
        // Set by the endpoint: the field's shape differs between them.
        logprobs: None,
    })
}

/// Most top tokens a request may ask log probabilities of (vLLM's default
/// `max_logprobs`).
pub const MAX_LOGPROBS: u64 = 20;

/// `logprobs` of a completions request (`null` or a count of top tokens).
pub fn completion_logprobs(value: Option<&serde_json::Value>) -> Result<Option<usize>, ApiError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(value) => match value.as_u64() {
            Some(k) if k <= MAX_LOGPROBS => Ok(Some(k as usize)),
            _ => Err(ApiError::invalid_param(
                "logprobs",
                format!("logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {value}."),
            )),
        },
    }
}

/// `logprobs` (a flag) and `top_logprobs` (a count) of a chat request.
pub fn chat_logprobs(
    logprobs: Option<&serde_json::Value>,
    top_logprobs: Option<&serde_json::Value>,
) -> Result<Option<usize>, ApiError> {
    let wanted = match logprobs {
        None | Some(serde_json::Value::Null) => false,
        Some(flag) => flag.as_bool().ok_or_else(|| {
            ApiError::invalid_param(
                "logprobs",
                format!("logprobs must be a boolean, got {flag}."),
            )
        })?,
    };
    let top = match top_logprobs {
        None | Some(serde_json::Value::Null) => None,
        Some(value) => match value.as_u64() {
            Some(k) if k <= MAX_LOGPROBS => Some(k as usize),
            _ => {
                return Err(ApiError::invalid_param(
                    "top_logprobs",
                    format!(
                        "top_logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {value}."
                    ),
                ));
            }
        },
    };
    match (wanted, top) {
        (false, Some(k)) if k > 0 => Err(ApiError::invalid_param(
            "top_logprobs",
            "when using `top_logprobs`, `logprobs` must be set to true.",
        )),
        (false, _) => Ok(None),
        (true, top) => Ok(Some(top.unwrap_or(0))),
    }
}

/// Most choices one request may ask for per prompt: each is a sequence of its own.
pub const MAX_CHOICES: i64 = 64;

fn choices_per_prompt(n: Option<i64>) -> Result<usize, ApiError> {
    match n.unwrap_or(1) {
        n @ 1..=MAX_CHOICES => Ok(n as usize),
        n => Err(ApiError::invalid_param(
            "n",
            format!("n must be between 1 and {MAX_CHOICES}, got {n}."),
        )),
    }
}

/// `best_of` (completions): how many candidates each prompt samples when that is more
/// than its `n` choices (`None` when it is not). The best are known only once all have
/// finished, so such a request cannot stream.
pub fn best_of(value: Option<i64>, n: usize, stream: bool) -> Result<Option<usize>, ApiError> {
    let Some(best_of) = value else {
        return Ok(None);
    };
    if !(n as i64..=MAX_CHOICES).contains(&best_of) {
        return Err(ApiError::invalid_param(
            "best_of",
            format!("best_of must be between n ({n}) and {MAX_CHOICES}, got {best_of}."),
        ));
    }
    let candidates = best_of as usize;
    if candidates == n {
        return Ok(None);
    }
    if stream {
        return Err(ApiError::invalid_param(
            "best_of",
            "best_of above n cannot be streamed: the best choices are known only once \
             every candidate has finished.",
        ));
    }
    Ok(Some(candidates))
}

fn repetition_penalty(value: Option<f64>) -> Result<f32, ApiError> {
    match value {
        None => Ok(1.0),
        Some(p) if p.is_finite() && p > 0.0 => Ok(p as f32),
        Some(p) => Err(ApiError::invalid_param(
            "repetition_penalty",
            format!("repetition_penalty must be greater than zero, got {p}."),
        )),
    }
}

fn min_p(value: Option<f64>) -> Result<f32, ApiError> {
    match value {
        None => Ok(0.0),
        Some(p) if (0.0..=1.0).contains(&p) => Ok(p as f32),
        Some(p) => Err(ApiError::invalid_param(
            "min_p",
            format!("min_p must be in [0, 1], got {p}."),
        )),
    }
}

/// OpenAI's range for a logit bias.
const MAX_LOGIT_BIAS: f64 = 100.0;

fn logit_bias(
    biases: Option<&std::collections::BTreeMap<String, f64>>,
    vocab_size: usize,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(biases) = biases else {
        return Ok(Vec::new());
    };
    biases
        .iter()
        .map(|(token, &bias)| {
            let id = token
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < vocab_size)
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "logit_bias",
                        format!(
                            "logit_bias keys must be token ids below {vocab_size}, got {token:?}."
                        ),
                    )
                })?;
            if !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&bias) {
                return Err(ApiError::invalid_param(
                    "logit_bias",
                    format!("logit_bias values must be in [-100, 100], got {bias}."),
                ));
            }
            Ok((id, bias as f32))
        })
        .collect()
}

fn min_tokens(fields: &SamplingFields) -> Result<usize, ApiError> {
    let min = fields.min_tokens.unwrap_or(0);
    let max = fields.max_tokens;
    if min < 0 || max.is_some_and(|max| min > max) {
        return Err(ApiError::invalid_param(
            "min_tokens",
            format!("min_tokens must be at least 0 and at most max_tokens, got {min}."),
        ));
    }
    Ok(usize::try_from(min).unwrap_or(usize::MAX))
}

fn check_penalty(name: &str, value: Option<f64>) -> Result<(), ApiError> {
    match value {
        Some(v) if !(-MAX_PENALTY..=MAX_PENALTY).contains(&v) => Err(ApiError::invalid_param(
            name,
            format!("{name} must be in [-2, 2], got {v}."),
        )),
        _ => Ok(()),
    }
}

fn check_stop_strings(stops: &[String]) -> Result<(), ApiError> {
    if stops.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "At most {MAX_STOP_STRINGS} stop strings are accepted, got {}.",
                stops.len()
            ),
        ));
    }
    if stops.iter().any(|stop| stop.len() > MAX_STOP_STRING_BYTES) {
        return Err(ApiError::invalid_param(
            "stop",
            format!("Stop strings must be at most {MAX_STOP_STRING_BYTES} bytes long."),
        ));
    }
    Ok(())
}

fn positive_max_tokens(field: &str, value: i64) -> Result<usize, ApiError> {
    match usize::try_from(value) {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(ApiError::invalid_param(
            field,
            format!("{field} must be at least 1, got {value}."),
        )),
    }
}

fn stop_token_ids(
    fields: &SamplingFields,
    tokenizer: &Tokenizer,
    model: &ServedModel,
) -> Result<Vec<u32>, ApiError> {
    let requested = fields.stop_token_ids.clone().unwrap_or_default();
    if let Some(&bad) = requested
        .iter()
        .find(|&&id| id as usize >= model.vocab_size)
    {
        return Err(ApiError::invalid_param(
            "stop_token_ids",
            format!(
                "Token id {bad} is out of vocabulary (the model has {} tokens).",
                model.vocab_size
            ),
        ));
    }
    let mut ids = requested;
    if !fields.ignore_eos.unwrap_or(false) {
        ids.extend(tokenizer.eos_token_ids().iter().copied());
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Token ids for one completion prompt: text gets the model's BOS (if it wants one)
/// when `add_special_tokens`; token ids are taken as they are. `/v1/completions` and
/// `/tokenize` both call it, so the two agree by construction.
pub fn completion_prompt_ids(
    input: PromptInput<'_>,
    add_special_tokens: bool,
    tokenizer: &Tokenizer,
    model: &ServedModel,
) -> Result<Vec<u32>, ApiError> {
    let ids = match input {
        PromptInput::Text(text) => {
            if text.is_empty() {
                return Err(empty_prompt());
            }
            check_text_length(
                text.len(),
                tokenizer,
                model.max_model_len,
                PromptNoun::Prompt,
            )?;
            encode(
                tokenizer,
                text,
                add_special_tokens && tokenizer.add_bos_by_default(),
            )?
        }
        PromptInput::Tokens(ids) => {
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= model.vocab_size) {
                return Err(ApiError::invalid_param(
                    "prompt",
                    format!(
                        "Token id {bad} is out of vocabulary (the model has {} tokens).",
                        model.vocab_size
                    ),
                ));
            }
            ids.to_vec()
        }
    };
    if ids.is_empty() {
        return Err(empty_prompt());
    }
    Ok(ids)
}

fn empty_prompt() -> ApiError {
    ApiError::invalid_param("prompt", "The prompt cannot be empty.")
}

/// How a conversation becomes a prompt (vLLM's fields of the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatPromptOptions {
    /// End with the header of the assistant's turn (default true).
    pub add_generation_prompt: bool,
    /// Leave the last message open for the model to continue (default false).
    pub continue_final_message: bool,
    /// Add the BOS token in front whatever the template wrote (default false: the
    /// template writes the special tokens, and a BOS is added only when the model
    /// wants one and the template left it out).
    pub add_special_tokens: bool,
}

impl ChatPromptOptions {
    /// The options from the request's fields, with vLLM's defaults and its refusal of
    /// both `add_generation_prompt` and `continue_final_message`.
    pub fn from_fields(
        add_generation_prompt: Option<bool>,
        continue_final_message: Option<bool>,
        add_special_tokens: Option<bool>,
    ) -> Result<Self, ApiError> {
        let options = Self {
            add_generation_prompt: add_generation_prompt.unwrap_or(true),
            continue_final_message: continue_final_message.unwrap_or(false),
            add_special_tokens: add_special_tokens.unwrap_or(false),
        };
        if options.add_generation_prompt && options.continue_final_message {
            // vLLM's check, word for word.
            return Err(ApiError::invalid_param(
                "continue_final_message",
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            ));
        }
        Ok(options)
    }
}

/// Token ids for a conversation, rendered with the model's chat template as `options`
/// say. `/v1/chat/completions` and `/tokenize` both call it, so the two agree by
/// construction.
///
/// Conversations too long for `max_model_len` tokens whatever their tokens are refused
/// before rendering (their contents alone) and before tokenizing (the rendered text).
pub fn chat_prompt_ids(
    messages: &[WireMessage],
    options: ChatPromptOptions,
    tools: Option<ToolOffer<'_>>,
    template: Option<&ChatTemplate>,
    tokenizer: &Tokenizer,
    max_model_len: usize,
) -> Result<Vec<u32>, ApiError> {
    let template = template.ok_or_else(|| {
        ApiError::bad_request(
            "This model has no chat template; use /v1/completions with a prompt instead.",
        )
    })?;
    let content_bytes = messages
        .iter()
        .filter_map(|message| message.content.as_ref())
        .map(|content| content.text_len())
        .fold(0usize, usize::saturating_add);
    check_text_length(
        content_bytes,
        tokenizer,
        max_model_len,
        PromptNoun::Messages,
    )?;
    let mut conversation = conversation(messages)?;
    let template_tools = match tools {
        Some(offer) if template.takes_tools() => Some(offer.tools),
        Some(offer) => {
            offer_in_system_message(&mut conversation, offer);
            None
        }
        None => None,
    };
    let text = render(template, &conversation, template_tools, options)?;
    check_text_length(text.len(), tokenizer, max_model_len, PromptNoun::Messages)?;
    let starts_with_bos = tokenizer
        .bos_token()
        .is_some_and(|bos| !bos.is_empty() && text.starts_with(&bos));
    let add_bos =
        tokenizer.add_bos_by_default() && (options.add_special_tokens || !starts_with_bos);
    let ids = encode(tokenizer, &text, add_bos)?;
    if ids.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "The conversation renders to an empty prompt.",
        ));
    }
    Ok(ids)
}

/// The prompt text; with `continue_final_message`, cut right after the last
/// message's content (as `transformers` does), so the model continues it.
fn render(
    template: &ChatTemplate,
    conversation: &[ChatMessage],
    tools: Option<&[serde_json::Value]>,
    options: ChatPromptOptions,
) -> Result<String, ApiError> {
    let text = template
        .render_with_tools(conversation, tools, options.add_generation_prompt)
        .map_err(|e| {
            ApiError::invalid_param("messages", format!("Cannot apply the chat template: {e}"))
        })?;
    if !options.continue_final_message {
        return Ok(text);
    }
    let last = conversation
        .last()
        .map(|message| message.content.trim())
        .unwrap_or_default();
    cut_after_final_message(text, last)
}

fn cut_after_final_message(mut text: String, last: &str) -> Result<String, ApiError> {
    let at = (!last.is_empty())
        .then(|| text.rfind(last))
        .flatten()
        .ok_or_else(|| {
            ApiError::invalid_param(
                "continue_final_message",
                "continue_final_message needs a last message with content that the chat \
                 template writes out.",
            )
        })?;
    text.truncate(at + last.len());
    Ok(text)
}

/// Tools to offer in a chat prompt, and the format the model is told to call them in
/// when its template has no place for them.
#[derive(Debug, Clone, Copy)]
pub struct ToolOffer<'a> {
    pub tools: &'a [serde_json::Value],
    pub format: ToolCallFormat,
}

/// For a template without tools: the offer goes first in the system message (one is
/// added if there is none), and earlier assistant calls are written into their turns'
/// text as the model is told to write them.
fn offer_in_system_message(conversation: &mut Vec<ChatMessage>, offer: ToolOffer<'_>) {
    let prompt = offer_prompt(offer.tools, offer.format);
    match conversation.first_mut() {
        Some(first) if first.role == "system" => {
            first.content = format!("{}\n\n{prompt}", first.content);
        }
        _ => conversation.insert(0, ChatMessage::new("system", prompt)),
    }
    for message in conversation.iter_mut() {
        let Some(calls) = message.tool_calls.take() else {
            continue;
        };
        let written = written_calls(&calls_of(&calls), offer.format);
        message.content = [message.content.as_str(), written.as_str()]
            .iter()
            .filter(|part| !part.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("\n");
    }
}

/// The calls of a message's checked `tool_calls`.
fn calls_of(calls: &serde_json::Value) -> Vec<ToolCall> {
    calls
        .as_array()
        .into_iter()
        .flatten()
        .map(|call| {
            let function = &call["function"];
            ToolCall {
                name: function["name"].as_str().unwrap_or_default().to_owned(),
                arguments: match &function["arguments"] {
                    serde_json::Value::String(text) => text.clone(),
                    other => other.to_string(),
                },
            }
        })
        .collect()
}

/// An assistant message's `tool_calls`: a list of `{"function": {"name", "arguments"}}`.
fn check_tool_calls(index: usize, calls: &serde_json::Value) -> Result<(), ApiError> {
    let well_formed = calls.as_array().is_some_and(|calls| {
        calls.iter().all(|call| {
            call["function"]["name"].is_string()
                && (call["function"]["arguments"].is_string()
                    || call["function"]["arguments"].is_object())
        })
    });
    if well_formed {
        Ok(())
    } else {
        Err(ApiError::invalid_param(
            &format!("messages[{index}].tool_calls"),
            "`tool_calls` must be a list of {\"id\", \"type\": \"function\", \"function\": \
             {\"name\", \"arguments\"}}.",
        ))
    }
}

fn conversation(messages: &[WireMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must not be empty.",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(index, message)| {
            if !ROLES.contains(&message.role.as_str()) {
                return Err(ApiError::invalid_param(
                    "messages",
                    format!(
                        "Unknown role `{}`; expected one of {}.",
                        message.role,
                        ROLES.join(", ")
                    ),
                ));
            }
            let content = message
                .content
                .as_ref()
                .map(|c| c.text())
                .unwrap_or_default();
            let tool_calls = message
                .tool_calls
                .clone()
                .filter(|calls| calls.as_array().is_some_and(|calls| !calls.is_empty()));
            if let Some(calls) = &tool_calls {
                check_tool_calls(index, calls)?;
            }
            Ok(ChatMessage {
                tool_calls,
                tool_call_id: message.tool_call_id.clone(),
                ..ChatMessage::new(message.role.as_str(), content)
            })
        })
        .collect()
}

fn encode(tokenizer: &Tokenizer, text: &str, add_bos: bool) -> Result<Vec<u32>, ApiError> {
    tokenizer
        .encode(text, add_bos)
        .map_err(|e| ApiError::bad_request(format!("Cannot tokenize the prompt: {e}")))
}

/// Refuses text of `bytes` bytes that needs at least `max_model_len` tokens whatever
/// it says (see [`Tokenizer::max_token_bytes`]), with the context-overflow error,
/// before it is tokenized.
fn check_text_length(
    bytes: usize,
    tokenizer: &Tokenizer,
    max_model_len: usize,
    noun: PromptNoun,
) -> Result<(), ApiError> {
    match tokenizer.max_token_bytes() {
        Some(per_token) => text_fits(bytes, per_token, max_model_len, noun),
        None => Ok(()),
    }
}

fn text_fits(
    bytes: usize,
    per_token: usize,
    max_model_len: usize,
    noun: PromptNoun,
) -> Result<(), ApiError> {
    let fewest_tokens = bytes.div_ceil(per_token.max(1));
    if fewest_tokens < max_model_len {
        return Ok(());
    }
    let noun = noun.as_str();
    Err(ApiError::invalid_param(
        noun,
        format!(
            "This model's maximum context length is {max_model_len} tokens. However, you \
             requested at least {fewest_tokens} tokens in the {noun} ({bytes} bytes), which \
             leaves no room for output. Please reduce the length of the {noun}."
        ),
    ))
}

/// Checks that `prompt` plus the output fits the context and settles the output's
/// token budget (by default, the rest of the context, as vLLM does).
pub fn fit_to_context(
    ids: Vec<u32>,
    max_tokens: Option<usize>,
    max_model_len: usize,
    noun: PromptNoun,
) -> Result<PreparedPrompt, ApiError> {
    let noun = noun.as_str();
    let prompt_len = ids.len();
    if prompt_len >= max_model_len {
        return Err(ApiError::invalid_param(
            noun,
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, you \
                 requested {prompt_len} tokens in the {noun}, which leaves no room for output. \
                 Please reduce the length of the {noun}."
            ),
        ));
    }
    let room = max_model_len - prompt_len;
    match max_tokens {
        None => Ok(PreparedPrompt {
            ids,
            max_tokens: room,
        }),
        Some(asked) if asked <= room => Ok(PreparedPrompt {
            ids,
            max_tokens: asked,
        }),
        Some(asked) => Err(ApiError::invalid_param(
            "max_tokens",
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, you \
                 requested {} tokens ({prompt_len} in the {noun}, {asked} in the completion). \
                 Please reduce the length of the {noun} or completion.",
                prompt_len.saturating_add(asked)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_budget_is_the_rest_of_the_context() {
        let prepared = fit_to_context(vec![1, 2, 3], None, 10, PromptNoun::Prompt).unwrap();
        assert_eq!(prepared.max_tokens, 7);
        let prepared = fit_to_context(vec![1, 2, 3], Some(7), 10, PromptNoun::Prompt).unwrap();
        assert_eq!(prepared.max_tokens, 7);
    }

    #[test]
    fn context_errors_name_both_lengths() {
        let error = fit_to_context(vec![1; 4], Some(7), 10, PromptNoun::Messages).unwrap_err();
        assert!(
            error
                .message
                .contains("maximum context length is 10 tokens"),
            "{}",
            error.message
        );
        assert!(
            error
                .message
                .contains("requested 11 tokens (4 in the messages, 7 in the completion)")
        );
        let error = fit_to_context(vec![1; 10], None, 10, PromptNoun::Prompt).unwrap_err();
        assert!(
            error.message.contains("requested 10 tokens in the prompt"),
            "{}",
            error.message
        );
        assert_eq!(error.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn text_longer_than_the_context_can_hold_is_refused_untokenized() {
        assert!(text_fits(0, 4, 10, PromptNoun::Prompt).is_ok());
        assert!(text_fits(36, 4, 10, PromptNoun::Prompt).is_ok());
        let error = text_fits(37, 4, 10, PromptNoun::Messages).unwrap_err();
        assert_eq!(error.status(), 400);
        assert_eq!(error.param.as_deref(), Some("messages"));
        assert!(
            error.message.contains(
                "maximum context length is 10 tokens. However, you requested at least 10 \
                 tokens in the messages (37 bytes)"
            ),
            "{}",
            error.message
        );
    }

    fn sampling_params_of(fields: &SamplingFields) -> Result<SamplingParams, ApiError> {
        sampling_params(fields, 1000)
    }

    fn fields(json: &str) -> SamplingFields {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn new_sampling_fields_are_range_checked() {
        for bad in [
            r#"{"min_p": 1.5}"#,
            r#"{"repetition_penalty": 0}"#,
            r#"{"logit_bias": {"1000": 1}}"#,
            r#"{"logit_bias": {"x": 1}}"#,
            r#"{"logit_bias": {"5": 101}}"#,
            r#"{"min_tokens": -1}"#,
            r#"{"min_tokens": 9, "max_tokens": 8}"#,
        ] {
            assert!(sampling_params_of(&fields(bad)).is_err(), "{bad}");
        }
        let params = sampling_params_of(&fields(
            r#"{"min_p": 0.1, "repetition_penalty": 1.2, "logit_bias": {"7": -3}, "min_tokens": 2}"#,
        ))
        .unwrap();
        assert_eq!(params.logit_bias, vec![(7, -3.0)]);
        assert_eq!((params.min_tokens, params.min_p), (2, 0.1));
    }

    #[test]
    fn sampling_ranges_are_checked() {
        assert!(sampling_params_of(&fields(r#"{"temperature": -0.1}"#)).is_err());
        assert!(sampling_params_of(&fields(r#"{"top_p": 0}"#)).is_err());
        assert!(sampling_params_of(&fields(r#"{"top_p": 1.5}"#)).is_err());
        assert!(sampling_params_of(&fields(r#"{"top_k": -2}"#)).is_err());
        let params =
            sampling_params_of(&fields(r#"{"temperature": 0, "top_k": -1, "seed": 3}"#)).unwrap();
        assert_eq!(
            params,
            SamplingParams {
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
                seed: Some(3),
                ..SamplingParams::default()
            }
        );
        assert!(positive_max_tokens("max_tokens", 0).is_err());
        assert!(check_penalty("presence_penalty", Some(2.5)).is_err());
    }

    #[test]
    fn unknown_model_is_404_and_absent_model_is_fine() {
        let served = ServedModel {
            name: "m".into(),
            root: "/m".into(),
            max_model_len: 8,
            vocab_size: 10,
        };
        assert_eq!(check_model(Some("x"), &served).unwrap_err().status(), 404);
        assert!(check_model(Some("m"), &served).is_ok());
        assert!(check_model(None, &served).is_ok());
    }

    #[test]
    fn chat_options_take_vllms_defaults_and_refuse_both_endings() {
        let defaults = ChatPromptOptions::from_fields(None, None, None).unwrap();
        assert!(defaults.add_generation_prompt);
        assert!(!defaults.continue_final_message && !defaults.add_special_tokens);
        let error = ChatPromptOptions::from_fields(None, Some(true), None).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("continue_final_message"));
        assert!(ChatPromptOptions::from_fields(Some(false), Some(true), None).is_ok());
    }

    #[test]
    fn continuing_cuts_after_the_last_message() {
        let text = "<user>hi</user><assistant>Once upon</assistant>".to_owned();
        assert_eq!(
            cut_after_final_message(text.clone(), "Once upon").unwrap(),
            "<user>hi</user><assistant>Once upon"
        );
        assert!(cut_after_final_message(text.clone(), "").is_err());
        assert!(cut_after_final_message(text, "absent").is_err());
    }

    #[test]
    fn empty_conversations_and_unknown_roles_are_refused() {
        assert!(conversation(&[]).is_err());
        let message = |role: &str| WireMessage {
            role: role.into(),
            content: None,
            name: None,
            tool_calls: None,
            tool_call_id: None,
        };
        assert!(conversation(&[message("wizard")]).is_err());
        assert_eq!(
            conversation(&[message("assistant")]).unwrap(),
            vec![ChatMessage::new("assistant", "")]
        );
    }

    #[test]
    fn tools_go_first_in_the_system_message_and_calls_into_their_turns() {
        let tools = [serde_json::json!({"type": "function", "function": {"name": "add"}})];
        let offer = ToolOffer {
            tools: &tools,
            format: ToolCallFormat::Hermes,
        };
        let calls = serde_json::json!([{"id": "1", "type": "function",
            "function": {"name": "add", "arguments": "{\"a\": 1}"}}]);
        let mut conversation = vec![
            ChatMessage::new("user", "1 + 1?"),
            ChatMessage {
                tool_calls: Some(calls),
                ..ChatMessage::new("assistant", "")
            },
        ];
        offer_in_system_message(&mut conversation, offer);
        assert_eq!(conversation[0].role, "system");
        assert!(conversation[0].content.contains(r#"{"name":"add"}"#));
        let written = conversation[2].content.as_str();
        let call = written
            .strip_prefix("<tool_call>\n")
            .and_then(|rest| rest.strip_suffix("\n</tool_call>"))
            .expect("one call in tags");
        let call: serde_json::Value = serde_json::from_str(call).unwrap();
        assert_eq!(
            call,
            serde_json::json!({"name": "add", "arguments": {"a": 1}})
        );
        assert_eq!(conversation[2].tool_calls, None);
        let mut with_system = vec![ChatMessage::new("system", "Be brief.")];
        offer_in_system_message(&mut with_system, offer);
        assert!(with_system[0].content.starts_with("Be brief.\n\n"));
    }
}
