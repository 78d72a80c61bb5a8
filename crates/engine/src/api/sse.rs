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

use super::generation::{ChoiceEvent, ChoiceRun};
use crate::sched::FinishReason;

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

impl ChunkWriter {
    fn role(&self, index: usize) -> Event {
        self.chat_chunk(
            index,
            ChatDelta {
                role: Some("assistant".into()),
                content: Some(String::new()),
            },
            None,
        )
    }

    fn text(&self, index: usize, text: String) -> Event {
        match self.endpoint {
            Endpoint::Completions => self.completion_chunk(index, text, None),
            Endpoint::Chat => self.chat_chunk(
                index,
                ChatDelta {
                    role: None,
                    content: Some(text),
                },
                None,
            ),
        }
    }

    fn finish(&self, index: usize, reason: FinishReason, stop_reason: Option<Value>) -> Event {
        let reason = Some(reason.as_openai().to_owned());
        match self.endpoint {
            Endpoint::Completions => {
                let mut chunk = self.completion_chunk_body(index, String::new(), reason);
                chunk.choices[0].stop_reason = stop_reason;
                json_event(&chunk)
            }
            Endpoint::Chat => self.chat_chunk(index, ChatDelta::default(), reason),
        }
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
            }),
        }
    }

    fn completion_chunk(&self, index: usize, text: String, finish: Option<String>) -> Event {
        json_event(&self.completion_chunk_body(index, text, finish))
    }

    fn completion_chunk_body(
        &self,
        index: usize,
        text: String,
        finish: Option<String>,
    ) -> CompletionChunk {
        CompletionChunk {
            id: self.id.clone(),
            object: TEXT_COMPLETION.into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![CompletionChunkChoice {
                index,
                text,
                logprobs: None,
                finish_reason: finish,
                stop_reason: None,
            }],
            usage: None,
        }
    }

    fn chat_chunk(&self, index: usize, delta: ChatDelta, finish: Option<String>) -> Event {
        json_event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: CHAT_COMPLETION_CHUNK.into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChatChunkChoice {
                index,
                delta,
                logprobs: None,
                finish_reason: finish,
            }],
            usage: None,
        })
    }
}

fn json_event<T: Serialize>(value: &T) -> Event {
    Event::default()
        .json_data(value)
        .unwrap_or_else(|_| Event::default().data(r#"{"error":{"message":"Internal server error","type":"InternalServerError","param":null,"code":500}}"#))
}

fn done_event() -> Event {
    Event::default().data("[DONE]")
}

/// The SSE response for `runs` (one per choice, in index order).
pub fn response(
    writer: ChunkWriter,
    runs: Vec<ChoiceRun>,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    // vLLM sends the role chunks with the first output, after the prefill: clients
    // (and `vllm bench serve`) time the first token by the first chunk.
    let roles_due = match writer.endpoint {
        Endpoint::Chat => runs.len(),
        _ => 0,
    };
    let state = StreamState {
        choices: stream::select_all(runs.into_iter().map(ChoiceRun::into_stream)),
        pending: VecDeque::new(),
        roles_due,
        usage: Vec::new(),
        writer,
        include_usage,
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
    usage: Vec<UsageInfo>,
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
            Some(ChoiceEvent::Text { index, text }) => {
                self.pending.push_back(self.writer.text(index, text));
            }
            Some(ChoiceEvent::Finished {
                index,
                reason,
                stop_reason,
                usage,
                ..
            }) => {
                self.usage.push(usage);
                let event = self.writer.finish(index, reason, stop_reason);
                self.pending.push_back(event);
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
                    let usage = UsageInfo::sum(self.usage.iter().copied());
                    self.pending.push_back(self.writer.usage(usage));
                }
                self.end();
            }
        }
    }

    fn send_roles(&mut self) {
        for index in 0..std::mem::take(&mut self.roles_due) {
            let role = self.writer.role(index);
            self.pending.push_back(role);
        }
    }

    fn end(&mut self) {
        self.pending.push_back(done_event());
        self.done = true;
    }
}
