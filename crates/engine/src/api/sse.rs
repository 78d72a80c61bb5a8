//! Streamed responses as server-sent events, in vLLM's order: (chat only) a first
//! chunk per choice with the assistant role, sent with the first output (after the
//! prefill, so the first chunk marks the first token), text chunks as tokens decode, a chunk per
//! choice with its `finish_reason`, then (with `include_usage`) a usage chunk with no
//! choices, then `data: [DONE]`. An engine failure mid-stream is an in-band
//! `data: {"error":...}` event followed by `[DONE]`.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use futures_util::stream::{self, BoxStream, SelectAll, Stream, StreamExt};
use serde::Serialize;
use serde_json::Value;
use tandem_protocol::openai::response::{CHAT_COMPLETION_CHUNK, TEXT_COMPLETION};
use tandem_protocol::openai::{
    ApiError, ChatChunkChoice, ChatCompletionChunk, ChatDelta, CompletionChunk,
    CompletionChunkChoice, UsageInfo,
};

use super::generation::{ChoiceEvent, ChoiceRun, OutputToken};
use super::logprobs::LogprobsWriter;
use crate::tools::{Piece, ToolCall, ToolCallExtractor};

/// Which endpoint's chunks to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// Writes one response's chunks: the fields every chunk repeats.
#[derive(Debug, Clone)]
pub struct ChunkWriter {
    pub endpoint: Endpoint,
    /// `cmpl-…` or `chatcmpl-…`.
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// What a text or finish chunk says about one choice.
struct ChoiceDelta {
    index: usize,
    text: String,
    finish_reason: Option<String>,
    stop_reason: Option<Value>,
    /// `Some` when token ids are reported.
    token_ids: Option<Vec<u32>>,
    /// The prompt's ids, on a completions choice's first chunk.
    prompt_token_ids: Option<Vec<u32>>,
    /// The chunk's tokens' log probabilities, in the endpoint's shape.
    logprobs: Option<Value>,
    /// `continuous_usage_stats`: the choice's usage so far.
    usage: Option<UsageInfo>,
}

impl ChunkWriter {
    /// Chat's first chunk of a choice; `prompt_token_ids` when ids are reported.
    fn role(&self, index: usize, prompt_token_ids: Option<Vec<u32>>) -> Event {
        let choice = ChatChunkChoice {
            index,
            delta: ChatDelta {
                role: Some("assistant".into()),
                content: Some(String::new()),
                tool_calls: None,
            },
            logprobs: None,
            finish_reason: None,
            token_ids: None,
        };
        self.chat_chunk(choice, prompt_token_ids, None)
    }

    fn chat_chunk(
        &self,
        choice: ChatChunkChoice,
        prompt_token_ids: Option<Vec<u32>>,
        usage: Option<UsageInfo>,
    ) -> Event {
        json_event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: CHAT_COMPLETION_CHUNK.into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![choice],
            usage,
            prompt_token_ids,
        })
    }

    fn delta(&self, delta: ChoiceDelta) -> Event {
        match self.endpoint {
            Endpoint::Completions => json_event(&CompletionChunk {
                id: self.id.clone(),
                object: TEXT_COMPLETION.into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChunkChoice {
                    index: delta.index,
                    text: delta.text,
                    logprobs: delta.logprobs,
                    finish_reason: delta.finish_reason,
                    stop_reason: delta.stop_reason,
                    prompt_token_ids: delta.prompt_token_ids,
                    token_ids: delta.token_ids,
                }],
                usage: delta.usage,
            }),
            Endpoint::Chat => {
                // vLLM's chat finish chunk has an empty delta.
                let content = Some(delta.text).filter(|text| !text.is_empty());
                let choice = ChatChunkChoice {
                    index: delta.index,
                    delta: ChatDelta {
                        role: None,
                        content,
                        tool_calls: None,
                    },
                    logprobs: delta.logprobs,
                    finish_reason: delta.finish_reason,
                    token_ids: delta.token_ids,
                };
                self.chat_chunk(choice, None, delta.usage)
            }
        }
    }

    /// A chat chunk with one whole tool call, the choice's `call_index`th.
    fn tool_call(&self, index: usize, call: &ToolCall, call_index: usize) -> Event {
        let choice = ChatChunkChoice {
            index,
            delta: ChatDelta {
                role: None,
                content: None,
                tool_calls: Some(vec![tool_call_json(call, Some(call_index))]),
            },
            logprobs: None,
            finish_reason: None,
            token_ids: None,
        };
        self.chat_chunk(choice, None, None)
    }

    fn usage(&self, usage: UsageInfo) -> Event {
        match self.endpoint {
            Endpoint::Completions => json_event(&CompletionChunk {
                id: self.id.clone(),
                object: TEXT_COMPLETION.into(),
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(usage),
            }),
            Endpoint::Chat => json_event(&ChatCompletionChunk {
                id: self.id.clone(),
                object: CHAT_COMPLETION_CHUNK.into(),
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(usage),
                prompt_token_ids: None,
            }),
        }
    }
}

fn json_event<T: Serialize>(value: &T) -> Event {
    Event::default()
        .json_data(value)
        .unwrap_or_else(|_| Event::default().data(r#"{"error":{"message":"Internal server error","type":"InternalServerError","param":null,"code":500}}"#))
}

/// A tool call in OpenAI's shape, with a fresh id (`index` in streamed deltas).
pub fn tool_call_json(call: &ToolCall, index: Option<usize>) -> Value {
    let id: u128 = rand::random();
    let mut value = serde_json::json!({
        "id": format!("chatcmpl-tool-{id:032x}"),
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    });
    if let Some(index) = index {
        value["index"] = index.into();
    }
    value
}

/// The content and the calls among `pieces`.
pub fn split_pieces(pieces: Vec<Piece>) -> (String, Vec<ToolCall>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Content(text) => content.push_str(&text),
            Piece::Call(call) => calls.push(call),
        }
    }
    (content, calls)
}

fn done_event() -> Event {
    Event::default().data("[DONE]")
}

/// How a streamed answer is told, beyond its chunks' shared fields.
pub struct StreamShape {
    /// Choices per prompt.
    pub n: usize,
    pub include_usage: bool,
    /// `continuous_usage_stats`: every chunk carries its choice's usage so far.
    pub continuous_usage: bool,
    /// With `logprobs`: how they are written.
    pub logprobs: Option<LogprobsWriter>,
    /// Chat with tools: reads calls out of each choice's output.
    pub tool_calls: Option<ToolCallExtractor>,
}

/// The SSE response for `runs` (one per choice, in index order).
pub fn response(
    writer: ChunkWriter,
    runs: Vec<ChoiceRun>,
    shape: StreamShape,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    // vLLM sends the role chunks with the first output, after the prefill: clients
    // (and `vllm bench serve`) time the first token by the first chunk.
    let roles_due = match writer.endpoint {
        Endpoint::Chat => runs.len(),
        _ => 0,
    };
    let prompt_ids: Vec<Option<Vec<u32>>> = runs
        .iter()
        .map(|run| run.reported_prompt_ids().map(<[u32]>::to_vec))
        .collect();
    let report_ids = prompt_ids.iter().any(Option::is_some);
    let prompt_tokens = shape
        .continuous_usage
        .then(|| runs.iter().map(ChoiceRun::prompt_tokens).collect());
    let tool_calls = shape
        .tool_calls
        .map(|extractor| ToolCalls::new(extractor, runs.len()));
    let state = StreamState {
        choices: stream::select_all(runs.into_iter().map(ChoiceRun::into_stream)),
        pending: VecDeque::new(),
        roles_due,
        text_offsets: vec![0; prompt_ids.len()],
        prompt_tokens,
        prompt_ids,
        report_ids,
        logprobs: shape.logprobs,
        tool_calls,
        usage: Vec::new(),
        n: shape.n,
        writer,
        include_usage: shape.include_usage,
        done: false,
    };
    Sse::new(stream::unfold(state, |mut state| async move {
        let event = state.next_event().await?;
        Some((Ok(event), state))
    }))
}

/// The merged choices of a streamed response and the events not yet sent.
struct StreamState {
    choices: SelectAll<BoxStream<'static, ChoiceEvent>>,
    pending: VecDeque<Event>,
    /// Chat: the choices whose role chunk goes out before the first output.
    roles_due: usize,
    /// Per choice, the prompt's ids until its first chunk carries them.
    prompt_ids: Vec<Option<Vec<u32>>>,
    /// `return_token_ids`: chunks carry their tokens' ids.
    report_ids: bool,
    /// `logprobs`: chunks carry their tokens' log probabilities.
    logprobs: Option<LogprobsWriter>,
    /// Per choice, where the next chunk's text starts (completions' `text_offset`).
    text_offsets: Vec<usize>,
    /// `continuous_usage_stats`: each choice's prompt length.
    prompt_tokens: Option<Vec<usize>>,
    /// Chat with tools: each choice's call reader.
    tool_calls: Option<ToolCalls>,
    /// Each finished choice's usage, by index.
    usage: Vec<(usize, UsageInfo)>,
    /// Choices per prompt.
    n: usize,
    writer: ChunkWriter,
    include_usage: bool,
    done: bool,
}

impl StreamState {
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            let next = self.choices.next().await;
            self.handle(next);
        }
    }

    fn handle(&mut self, event: Option<ChoiceEvent>) {
        if matches!(
            event,
            Some(ChoiceEvent::Text { .. } | ChoiceEvent::Finished { .. })
        ) {
            self.send_roles();
        }
        match event {
            Some(ChoiceEvent::Text {
                index,
                text,
                tokens,
                generated,
            }) => {
                let (text, calls) = match self.tool_calls.as_mut() {
                    Some(reader) => reader.push(index, &text),
                    None => (text, Vec::new()),
                };
                let reports = self.report_ids || self.logprobs.is_some();
                if !text.is_empty() || reports || self.tool_calls.is_none() {
                    let mut delta = self.choice_delta(index, text, None, None, tokens);
                    delta.usage = self.usage_so_far(index, generated);
                    self.pending.push_back(self.writer.delta(delta));
                }
                self.send_tool_calls(index, calls);
            }
            Some(ChoiceEvent::Finished {
                index,
                reason,
                stop_reason,
                usage,
                tokens,
                ..
            }) => {
                self.usage.push((index, usage));
                let mut reason = reason.as_openai();
                if let Some((text, calls)) = self.tool_calls.as_mut().map(|r| r.finish(index)) {
                    if !text.is_empty() {
                        let delta = self.choice_delta(index, text, None, None, Vec::new());
                        self.pending.push_back(self.writer.delta(delta));
                    }
                    self.send_tool_calls(index, calls);
                }
                if let Some(reader) = &self.tool_calls {
                    reason = reader.finish_reason(index, reason);
                }
                let reason = Some(reason.to_owned());
                let mut delta =
                    self.choice_delta(index, String::new(), reason, stop_reason, tokens);
                delta.usage = self.usage_so_far(index, usage.completion_tokens);
                self.pending.push_back(self.writer.delta(delta));
            }
            Some(ChoiceEvent::Failed { message, .. }) => {
                // The other choices are dropped, which cancels them.
                self.choices = SelectAll::new();
                let error = ApiError::internal(message);
                self.pending.push_back(json_event(&error.body()));
                self.end();
            }
            None => {
                if self.include_usage {
                    let usage = super::total_usage(self.usage.iter().copied(), self.n);
                    self.pending.push_back(self.writer.usage(usage));
                }
                self.end();
            }
        }
    }

    fn choice_delta(
        &mut self,
        index: usize,
        text: String,
        finish_reason: Option<String>,
        stop_reason: Option<Value>,
        tokens: Vec<OutputToken>,
    ) -> ChoiceDelta {
        // Chat's role chunk carried the prompt's ids already.
        let prompt_token_ids = match self.writer.endpoint {
            Endpoint::Completions => self.prompt_ids.get_mut(index).and_then(Option::take),
            Endpoint::Chat => None,
        };
        ChoiceDelta {
            index,
            text,
            finish_reason,
            stop_reason,
            token_ids: self
                .report_ids
                .then(|| tokens.iter().map(|token| token.id).collect()),
            prompt_token_ids,
            logprobs: self.logprobs_of(index, &tokens),
            usage: None,
        }
    }

    /// With `continuous_usage_stats`: choice `index`'s usage after `generated` tokens.
    fn usage_so_far(&self, index: usize, generated: usize) -> Option<UsageInfo> {
        let prompt = *self.prompt_tokens.as_ref()?.get(index)?;
        Some(UsageInfo::new(prompt, generated, 0))
    }

    fn logprobs_of(&mut self, index: usize, tokens: &[OutputToken]) -> Option<Value> {
        let writer = self.logprobs.as_ref()?;
        Some(match self.writer.endpoint {
            Endpoint::Completions => writer.completion(tokens, &mut self.text_offsets[index]),
            Endpoint::Chat => writer.chat(tokens),
        })
    }

    fn send_tool_calls(&mut self, index: usize, calls: Vec<ToolCall>) {
        for call in calls {
            let Some(reader) = self.tool_calls.as_mut() else {
                return;
            };
            let call_index = reader.next_call_index(index);
            let event = self.writer.tool_call(index, &call, call_index);
            self.pending.push_back(event);
        }
    }

    fn send_roles(&mut self) {
        for index in 0..std::mem::take(&mut self.roles_due) {
            let prompt_ids = self.prompt_ids.get_mut(index).and_then(Option::take);
            let role = self.writer.role(index, prompt_ids);
            self.pending.push_back(role);
        }
    }

    fn end(&mut self) {
        self.pending.push_back(done_event());
        self.done = true;
    }
}

/// Chat with tools: one call reader per choice, and how many calls each has sent.
struct ToolCalls {
    readers: Vec<ToolCallExtractor>,
    sent: Vec<usize>,
}

impl ToolCalls {
    fn new(extractor: ToolCallExtractor, choices: usize) -> Self {
        Self {
            readers: vec![extractor; choices],
            sent: vec![0; choices],
        }
    }

    /// Choice `index`'s content and calls that `text` completes.
    fn push(&mut self, index: usize, text: &str) -> (String, Vec<ToolCall>) {
        match self.readers.get_mut(index) {
            Some(reader) => split_pieces(reader.push(text)),
            None => (text.to_owned(), Vec::new()),
        }
    }

    /// The rest of choice `index`'s output.
    fn finish(&mut self, index: usize) -> (String, Vec<ToolCall>) {
        match self.readers.get_mut(index) {
            Some(reader) => split_pieces(reader.finish()),
            None => (String::new(), Vec::new()),
        }
    }

    /// `tool_calls` for a choice that stopped after calling (unless the call was
    /// forced by name, which OpenAI ends with `stop`).
    fn finish_reason(&self, index: usize, reason: &'static str) -> &'static str {
        match self.readers.get(index) {
            Some(reader) if reason == "stop" && reader.made_calls() && !reader.is_named() => {
                "tool_calls"
            }
            _ => reason,
        }
    }

    fn next_call_index(&mut self, index: usize) -> usize {
        let sent = &mut self.sent[index];
        *sent += 1;
        *sent - 1
    }
}
