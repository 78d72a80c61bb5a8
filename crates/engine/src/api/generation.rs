//! One choice of a request as it runs: engine token events turned into text pieces
//! (incremental detokenization, then stop strings), and the request's metrics
//! (time to first token, inter-token latency, end-to-end latency, token counts,
//! outcome) recorded as it goes.

use std::collections::VecDeque;
use std::time::Instant;

use futures_util::stream::{self, BoxStream, StreamExt};
use serde_json::Value;
use tandem_protocol::openai::UsageInfo;

use super::stop::{StopMatcher, StopOutcome};
use crate::metrics as names;
use crate::sample::TokenLogprobs;
use crate::sched::{FinishReason, GenerationEvent, GenerationStream, SeqId, Usage};
use crate::tokenizer::IncrementalDecoder;
use crate::transfer::Handoff;

/// What a running choice reports, in order: text pieces, then one end.
#[derive(Debug, Clone, PartialEq)]
pub enum ChoiceEvent {
    /// Output text (never empty), with the tokens whose text is now all sent (empty
    /// unless tokens are reported; see [`ChoiceRun::reporting`]).
    Text {
        index: usize,
        text: String,
        tokens: Vec<OutputToken>,
        /// Output tokens so far (for per-chunk usage).
        generated: usize,
    },
    /// The choice is complete.
    Finished {
        index: usize,
        reason: FinishReason,
        /// The stop string or client stop token that ended it (vLLM's `stop_reason`).
        stop_reason: Option<Value>,
        usage: UsageInfo,
        /// Where a prefill leg's KV waits for its decode worker.
        handoff: Option<Handoff>,
        /// The tokens not reported with text yet (the stop token among them).
        tokens: Vec<OutputToken>,
    },
    /// The engine could not run it.
    Failed { index: usize, message: String },
}

/// A submitted choice being read back.
pub struct ChoiceRun {
    index: usize,
    stream: GenerationStream,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    timer: RequestTimer,
    prompt_tokens: usize,
    completion_tokens: usize,
    queued: VecDeque<ChoiceEvent>,
    /// A stop string matched: the text is complete, the engine's end is awaited.
    stopped: bool,
    /// The stop token the engine reported.
    stop_token: Option<u32>,
    ended: bool,
    /// With `return_token_ids` or `logprobs`: the output tokens whose text is not all
    /// sent yet (held for a whole character or a possible stop string). A token is
    /// reported only once its text is out, so a client that resumes from the reported
    /// ids (the router's migration) neither loses nor repeats text.
    report: Option<TokenReport>,
    /// Stop strings are not matched before this many output tokens (vLLM's
    /// `min_tokens`; the sampler holds the end tokens back).
    min_tokens: usize,
    /// `echo`: the prompt's text, sent with the first output (so that the first chunk
    /// still marks the first token, as vLLM sends it).
    echo: Option<String>,
    /// `echo` with `logprobs`: the prompt's ids, reported as tokens before the output's
    /// once their log probabilities come, with this many top tokens each.
    echo_ids: Option<(Vec<u32>, usize)>,
    /// vLLM's `prompt_logprobs`: the prompt's log probabilities, once they come.
    prompt_logprobs: Option<PromptLogprobs>,
}

/// The log probabilities of a prompt's tokens after the first (vLLM's
/// `prompt_logprobs`).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprobs {
    pub ids: Vec<u32>,
    /// `logprobs[i]` is of `ids[i + 1]`, with at most this many top tokens.
    pub top: usize,
    pub logprobs: Vec<TokenLogprobs>,
}

/// An output token as reported beside the text.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputToken {
    pub id: u32,
    /// With `logprobs`.
    pub logprobs: Option<Box<TokenLogprobs>>,
}

/// What a run reports of its tokens.
#[derive(Debug, Clone, Default)]
pub struct TokenReport {
    /// `return_token_ids`: the prompt's ids (the output's go with the text).
    pub prompt_ids: Option<Vec<u32>>,
    /// `logprobs`: each token's log probabilities.
    pub logprobs: bool,
    unsent: Vec<OutputToken>,
}

impl TokenReport {
    pub fn new(prompt_ids: Option<Vec<u32>>, logprobs: bool) -> Option<Self> {
        (prompt_ids.is_some() || logprobs).then_some(Self {
            prompt_ids,
            logprobs,
            unsent: Vec::new(),
        })
    }
}

impl ChoiceRun {
    /// `arrival` is when the HTTP request arrived (the latencies' origin).
    pub fn new(
        index: usize,
        stream: GenerationStream,
        decoder: IncrementalDecoder,
        stop: StopMatcher,
        prompt_tokens: usize,
        arrival: Instant,
    ) -> Self {
        Self {
            index,
            stream,
            decoder,
            stop,
            timer: RequestTimer::new(arrival),
            prompt_tokens,
            completion_tokens: 0,
            queued: VecDeque::new(),
            stopped: false,
            stop_token: None,
            ended: false,
            report: None,
            min_tokens: 0,
            echo: None,
            echo_ids: None,
            prompt_logprobs: None,
        }
    }

    /// Reports the prompt's ids (with their log probabilities) as the first tokens
    /// (`echo` with `logprobs`).
    pub fn echoing_tokens(mut self, prompt_ids: Option<(Vec<u32>, usize)>) -> Self {
        self.echo_ids = prompt_ids;
        self
    }

    /// The engine's id of its sequence.
    pub fn seq_id(&self) -> SeqId {
        self.stream.id()
    }

    /// Keeps the prompt's log probabilities, with `top` top tokens each, for
    /// [`ChoiceRun::take_prompt_logprobs`] (vLLM's `prompt_logprobs`).
    pub fn keeping_prompt_logprobs(mut self, prompt: Option<(Vec<u32>, usize)>) -> Self {
        self.prompt_logprobs = prompt.map(|(ids, top)| PromptLogprobs {
            ids,
            top,
            logprobs: Vec::new(),
        });
        self
    }

    /// The prompt's log probabilities, if kept (complete once the first token came).
    pub fn take_prompt_logprobs(&mut self) -> Option<PromptLogprobs> {
        self.prompt_logprobs.take()
    }

    /// Begins the text with `prompt_text` (`echo`).
    pub fn echoing(mut self, prompt_text: Option<String>) -> Self {
        self.echo = prompt_text.filter(|text| !text.is_empty());
        self
    }

    /// Matches stop strings only from the `min_tokens`-th output token on.
    pub fn with_min_tokens(mut self, min_tokens: usize) -> Self {
        self.min_tokens = min_tokens;
        self
    }

    /// Reports output tokens with the text they make (`return_token_ids`, `logprobs`).
    pub fn reporting(mut self, report: Option<TokenReport>) -> Self {
        self.report = report;
        self
    }

    /// The prompt's ids, when ids are reported.
    pub fn reported_prompt_ids(&self) -> Option<&[u32]> {
        self.report.as_ref()?.prompt_ids.as_deref()
    }

    /// The prompt's length in tokens.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// Whether the output's log probabilities are reported.
    pub fn reports_logprobs(&self) -> bool {
        self.report.as_ref().is_some_and(|report| report.logprobs)
    }

    /// The next event; `None` after the end.
    pub async fn next(&mut self) -> Option<ChoiceEvent> {
        loop {
            if let Some(event) = self.queued.pop_front() {
                return Some(event);
            }
            if self.ended {
                return None;
            }
            let event = self.stream.next().await;
            self.handle(event);
        }
    }

    /// The events as a stream (dropping it cancels the choice).
    pub fn into_stream(self) -> BoxStream<'static, ChoiceEvent> {
        stream::unfold(self, |mut run| async move {
            let event = run.next().await?;
            Some((event, run))
        })
        .boxed()
    }

    fn handle(&mut self, event: Option<GenerationEvent>) {
        match event {
            Some(GenerationEvent::Token(id)) => self.on_token(id, None),
            Some(GenerationEvent::TokenWithLogprobs(id, logprobs)) => {
                self.on_token(id, Some(logprobs))
            }
            Some(GenerationEvent::Finished {
                reason,
                usage,
                handoff,
                stop_token,
                stop_logprobs,
            }) => {
                self.stop_token = stop_token;
                if let (Some(report), Some(id)) = (&mut self.report, stop_token)
                    && !self.stopped
                {
                    // The stop token is generated output (vLLM counts and returns it)
                    // but never comes as a token event.
                    report.unsent.push(OutputToken {
                        id,
                        logprobs: stop_logprobs,
                    });
                }
                self.on_finished(reason, usage, handoff)
            }
            Some(GenerationEvent::PromptLogprobs(logprobs)) => self.on_prompt_logprobs(logprobs),
            Some(GenerationEvent::Failed(message)) => self.fail(message),
            None => self.fail("the engine stopped before the request finished".into()),
        }
    }

    /// The echoed prompt's tokens go first in the report: the first with no log
    /// probability (nothing predicts it), as vLLM reports it.
    fn on_prompt_logprobs(&mut self, logprobs: Vec<TokenLogprobs>) {
        let truncated = |top: usize| {
            logprobs.iter().map(move |lp| TokenLogprobs {
                top: lp.top[..top.min(lp.top.len())].to_vec(),
                ..lp.clone()
            })
        };
        if let Some(kept) = &mut self.prompt_logprobs {
            kept.logprobs = truncated(kept.top).collect();
        }
        let (Some((ids, top)), Some(report)) = (self.echo_ids.take(), &mut self.report) else {
            return;
        };
        let known = std::iter::once(None).chain(truncated(top).map(|lp| Some(Box::new(lp))));
        let tokens = ids
            .into_iter()
            .zip(known)
            .map(|(id, logprobs)| OutputToken { id, logprobs });
        report.unsent.splice(0..0, tokens);
    }

    fn on_token(&mut self, id: u32, logprobs: Option<Box<TokenLogprobs>>) {
        if self.stopped {
            // Generated before the engine heard of the stop: not part of the output.
            return;
        }
        self.completion_tokens += 1;
        self.timer.token();
        if let Some(report) = &mut self.report {
            report.unsent.push(OutputToken { id, logprobs });
        }
        let Some(text) = self.decoder.push(id) else {
            return;
        };
        if self.completion_tokens < self.min_tokens {
            let text = self.stop.pass(&text);
            self.queue_text(text, true);
            return;
        }
        match self.stop.push(&text) {
            StopOutcome::Emit(text) => {
                let all_sent = !self.stop.holds_text();
                self.queue_text(text, all_sent);
            }
            StopOutcome::Stopped(text) => {
                // The engine ends the request as stopped and still reports its usage
                // (and, for a prefill leg, its hand-off).
                self.stream.stop();
                self.stopped = true;
                self.queue_text(text, false);
            }
        }
    }

    fn on_finished(&mut self, reason: FinishReason, mut usage: Usage, handoff: Option<Handoff>) {
        if usage.completion_tokens > 0 {
            // A stop token as the only output never comes as a token event, but it
            // was generated: its time is the request's time to first token.
            self.timer.first_token_if_none();
        }
        if self.stopped {
            usage.completion_tokens = self.completion_tokens;
            self.finish(FinishReason::Stop, usage, handoff);
            return;
        }
        if let Some(rest) = self.decoder.finish()
            && let StopOutcome::Stopped(text) = self.stop.push(&rest)
        {
            self.queue_text(text, false);
            self.finish(FinishReason::Stop, usage, handoff);
            return;
        }
        let rest = self.stop.finish();
        self.queue_text(rest, false);
        self.finish(reason, usage, handoff);
    }

    /// Queues `text`; with `ids_sent`, the ids not yet reported go with it (its text
    /// completes theirs).
    fn queue_text(&mut self, text: String, ids_sent: bool) {
        let text = match self.echo.take() {
            Some(mut prompt) => {
                prompt.push_str(&text);
                prompt
            }
            None => text,
        };
        if text.is_empty() {
            return;
        }
        let tokens = match &mut self.report {
            Some(report) if ids_sent => std::mem::take(&mut report.unsent),
            _ => Vec::new(),
        };
        self.queued.push_back(ChoiceEvent::Text {
            index: self.index,
            text,
            tokens,
            generated: self.completion_tokens,
        });
    }

    fn finish(&mut self, reason: FinishReason, usage: Usage, handoff: Option<Handoff>) {
        // An echoed prompt whose output was empty still comes.
        self.queue_text(String::new(), false);
        self.ended = true;
        self.timer.finished(reason, &usage);
        let tokens = self
            .report
            .as_mut()
            .map(|report| std::mem::take(&mut report.unsent))
            .unwrap_or_default();
        self.queued.push_back(ChoiceEvent::Finished {
            index: self.index,
            reason,
            stop_reason: self.stop.stop_reason(self.stop_token),
            usage: UsageInfo::new(
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.cached_tokens,
            ),
            handoff,
            tokens,
        });
    }

    fn fail(&mut self, message: String) {
        self.ended = true;
        self.timer.recorded = true;
        tracing::warn!("request failed in the engine: {message}");
        self.queued.push_back(ChoiceEvent::Failed {
            index: self.index,
            message,
        });
    }
}

impl Drop for ChoiceRun {
    /// A choice dropped before its end was abandoned by the client.
    fn drop(&mut self) {
        if !self.timer.recorded {
            let usage = Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.completion_tokens,
                cached_tokens: 0,
            };
            self.timer.finished(FinishReason::Aborted, &usage);
        }
    }
}

/// Per-request latency bookkeeping.
struct RequestTimer {
    arrival: Instant,
    last_token: Option<Instant>,
    recorded: bool,
}

impl RequestTimer {
    fn new(arrival: Instant) -> Self {
        Self {
            arrival,
            last_token: None,
            recorded: false,
        }
    }

    fn token(&mut self) {
        let now = Instant::now();
        match self.last_token {
            None => metrics::histogram!(names::TIME_TO_FIRST_TOKEN_SECONDS)
                .record(now.duration_since(self.arrival).as_secs_f64()),
            Some(last) => metrics::histogram!(names::INTER_TOKEN_LATENCY_SECONDS)
                .record(now.duration_since(last).as_secs_f64()),
        }
        self.last_token = Some(now);
    }

    /// Records the time to first token unless a token was already seen.
    fn first_token_if_none(&mut self) {
        if self.last_token.is_none() {
            self.token();
        }
    }

    /// Records the end of a request with the reason its client is told (which a stop
    /// string can decide after the engine already ended it another way), before the
    /// client hears of it, so its next /metrics read includes it.
    fn finished(&mut self, reason: FinishReason, usage: &Usage) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        metrics::histogram!(names::E2E_REQUEST_LATENCY_SECONDS)
            .record(self.arrival.elapsed().as_secs_f64());
        metrics::counter!(names::PROMPT_TOKENS_TOTAL).increment(usage.prompt_tokens as u64);
        metrics::counter!(names::REQUEST_SUCCESS_TOTAL, names::FINISHED_REASON => reason.as_openai())
            .increment(1);
    }
}

/// The outcome of a choice read to its end (non-streaming responses).
#[derive(Debug, Clone, PartialEq)]
pub struct CollectedChoice {
    pub index: usize,
    pub text: String,
    pub finish_reason: FinishReason,
    pub stop_reason: Option<Value>,
    pub usage: UsageInfo,
    pub handoff: Option<Handoff>,
    /// With `return_token_ids`: the prompt's ids and the output's.
    pub prompt_token_ids: Option<Vec<u32>>,
    pub token_ids: Option<Vec<u32>>,
    /// The output's tokens, when their log probabilities are reported.
    pub logprobs: Option<Vec<OutputToken>>,
    /// vLLM's `prompt_logprobs`, when asked for.
    pub prompt_logprobs: Option<PromptLogprobs>,
}

/// The engine failed a request (its message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EngineFailure(pub String);

/// Reads a choice to its end.
pub async fn collect(mut run: ChoiceRun) -> Result<CollectedChoice, EngineFailure> {
    let mut text = String::new();
    let mut all_tokens = Vec::new();
    let prompt_token_ids = run.reported_prompt_ids().map(<[u32]>::to_vec);
    let logprobs = run.reports_logprobs();
    while let Some(event) = run.next().await {
        match event {
            ChoiceEvent::Text {
                text: piece,
                tokens,
                ..
            } => {
                text.push_str(&piece);
                all_tokens.extend(tokens);
            }
            ChoiceEvent::Finished {
                index,
                reason,
                stop_reason,
                usage,
                handoff,
                tokens,
            } => {
                all_tokens.extend(tokens);
                let ids = all_tokens.iter().map(|token| token.id).collect();
                return Ok(CollectedChoice {
                    index,
                    text,
                    finish_reason: reason,
                    stop_reason,
                    usage,
                    handoff,
                    token_ids: prompt_token_ids.is_some().then_some(ids),
                    prompt_token_ids,
                    logprobs: logprobs.then_some(all_tokens),
                    prompt_logprobs: run.take_prompt_logprobs(),
                });
            }
            ChoiceEvent::Failed { message, .. } => return Err(EngineFailure(message)),
        }
    }
    Err(EngineFailure("the request ended without a result".into()))
}
