//! Request migration, the pure part: which requests can move to another worker
//! mid-stream, what the router learns of a streamed answer as it relays it, how it
//! rewrites the answer's events, and the request that continues it elsewhere.
//!
//! A streamed answer is relayed event by event through a [`StreamLedger`]. The worker
//! was asked for token ids (vLLM's `return_token_ids`), so the ledger knows the
//! prompt's ids and every id whose text the client has. When the worker fails
//! mid-stream, [`StreamLedger::next_step`] says what to do: send the prompt plus the
//! ids already streamed to another worker as a completions request with what is left
//! of `max_tokens` (its events are then rewritten to look like the first worker's:
//! same `id`, `created`, endpoint shape, usage counted over the whole answer), end
//! the stream when the answer was complete already, or give up.
//!
//! What moves is exact for greedy decoding. Sampling continues from the request's
//! seed restarted at the seam, penalties see only the tokens after it as output, and
//! a stop string split across the seam is not matched; these are documented in
//! docs/router.md. Requests whose output depends on state the prompt cannot carry
//! (several choices, log probabilities, tools, structured output) are not migrated.

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value, json};

use crate::disagg::Endpoint;

/// The field that asks a worker for token ids.
pub const RETURN_TOKEN_IDS: &str = "return_token_ids";

/// Fields of a chat request that a completions continuation keeps: sampling and
/// output controls both endpoints share. Everything else in a chat body shapes the
/// prompt, whose ids the continuation carries, or rules migration out.
const CHAT_FIELDS_KEPT: &[&str] = &[
    "model",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "bad_words",
    "allowed_token_ids",
    "min_tokens",
    "stream_options",
    "user",
    "priority",
    "cache_salt",
];

/// Fields whose output a continuation could not reproduce: any value but `null`,
/// `false` (or an empty list) rules migration out.
const NOT_RESUMABLE: &[&str] = &[
    "echo",
    "logprobs",
    "prompt_logprobs",
    "tools",
    "functions",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "suffix",
];

/// Whether a request's streamed answer could continue on another worker.
pub fn resumable(endpoint: Endpoint, body: &Map<String, Value>) -> bool {
    let streamed = crate::disagg::streamed(body);
    let one_choice = ["n", "best_of"]
        .iter()
        .all(|field| body.get(*field).is_none_or(|v| v.is_null() || v == 1));
    let plain_text = body
        .get("response_format")
        .is_none_or(|format| format.is_null() || format.get("type") == Some(&json!("text")));
    let one_prompt = match endpoint {
        Endpoint::Chat => true,
        Endpoint::Completions => body.get("prompt").is_some_and(is_one_prompt),
    };
    streamed
        && one_choice
        && plain_text
        && one_prompt
        && NOT_RESUMABLE
            .iter()
            .all(|field| !asks_for_something(body.get(*field)))
}

fn asks_for_something(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(items)) => !items.is_empty(),
        Some(_) => true,
    }
}

/// A prompt that makes one choice: text, token ids, or a list of one of those.
fn is_one_prompt(prompt: &Value) -> bool {
    match prompt {
        Value::String(_) => true,
        Value::Array(items) => {
            items.iter().all(Value::is_u64)
                || (items.len() == 1 && (items[0].is_string() || items[0].is_array()))
        }
        _ => false,
    }
}

/// The identity of the client's answer, which continued events keep.
#[derive(Debug, Clone, Deserialize)]
struct AnswerIdentity {
    #[serde(default)]
    id: Value,
    #[serde(default)]
    created: Value,
    #[serde(default)]
    model: Value,
}

/// Which worker's events are being relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Segment {
    /// The first worker's, in the client's endpoint shape.
    Original,
    /// A continuation's completions events, after `carried` output tokens.
    Continuation { carried: usize },
}

/// What to do after the worker of a streamed answer failed.
#[derive(Debug, Clone, PartialEq)]
pub enum NextStep {
    /// Send `body` to `path` on another worker and relay its events.
    Resume {
        path: &'static str,
        body: Map<String, Value>,
        /// The ids the new worker's prompt holds (for routing).
        prompt_ids: Vec<u32>,
    },
    /// The answer is complete (or its token budget spent): send these events and end.
    Finish(Vec<u8>),
    /// The answer cannot continue; why.
    GiveUp(&'static str),
}

/// What the router knows of one streamed answer, and how it rewrites its events.
#[derive(Debug)]
pub struct StreamLedger {
    endpoint: Endpoint,
    /// The client asked for token ids itself: they stay in the events.
    client_wants_ids: bool,
    include_usage: bool,
    /// Bytes of an event not complete yet.
    partial: Vec<u8>,
    identity: Option<AnswerIdentity>,
    prompt_ids: Option<Vec<u32>>,
    /// The ids of the output the client has.
    generated: Vec<u32>,
    /// A chunk with a `finish_reason` was relayed.
    finished: bool,
    usage_relayed: bool,
    /// `data: [DONE]` was relayed.
    done: bool,
    /// The last output was not plain content (a tool call, reasoning): a completions
    /// continuation would not produce the same kind of delta.
    special_output: bool,
    segment: Segment,
}

impl StreamLedger {
    /// A ledger for a request whose body is `client_body`; `client_wants_ids` when the
    /// client itself asked for token ids (the router asks for them anyway).
    pub fn new(
        endpoint: Endpoint,
        client_body: &Map<String, Value>,
        client_wants_ids: bool,
    ) -> Self {
        let include_usage = client_body
            .get("stream_options")
            .and_then(|options| options.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Self {
            endpoint,
            client_wants_ids,
            include_usage,
            partial: Vec::new(),
            identity: None,
            prompt_ids: None,
            generated: Vec::new(),
            finished: false,
            usage_relayed: false,
            done: false,
            special_output: false,
            segment: Segment::Original,
        }
    }

    /// Whether `[DONE]` was relayed (the answer ended properly).
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// How many output tokens the client has.
    pub fn generated_tokens(&self) -> usize {
        self.generated.len()
    }

    /// Takes bytes of the worker's stream; returns the events to send the client, each
    /// complete (a partial event waits for its rest).
    pub fn relay(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.partial.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(end) = find_event_end(&self.partial[start..]) {
            let event = std::mem::take(&mut self.partial);
            self.relay_event(&event[start..start + end.content], &mut out);
            self.partial = event;
            start += end.next;
        }
        self.partial.drain(..start);
        out
    }

    fn relay_event(&mut self, event: &[u8], out: &mut Vec<u8>) {
        let Some(data) = event_data(event) else {
            // A comment or a field this relay does not read: as it came.
            out.extend_from_slice(event);
            out.extend_from_slice(b"\n\n");
            return;
        };
        if data.trim() == "[DONE]" {
            self.done = true;
            out.extend_from_slice(b"data: [DONE]\n\n");
            return;
        }
        let Ok(view) = serde_json::from_str::<ChunkView>(&data) else {
            out.extend_from_slice(event);
            out.extend_from_slice(b"\n\n");
            return;
        };
        if view.error.is_some() {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(data.as_bytes());
            out.extend_from_slice(b"\n\n");
            return;
        }
        if self.identity.is_none() && self.segment == Segment::Original {
            self.identity = serde_json::from_str(&data).ok();
        }
        self.record(view);
        match self.segment {
            // The common case, kept cheap: the worker's text as it came, less the ids
            // the client did not ask for.
            Segment::Original => {
                out.extend_from_slice(b"data: ");
                if self.client_wants_ids {
                    out.extend_from_slice(data.as_bytes());
                } else {
                    out.extend_from_slice(without_id_arrays(&data).as_bytes());
                }
                out.extend_from_slice(b"\n\n");
            }
            Segment::Continuation { carried } => {
                let Ok(Value::Object(mut chunk)) = serde_json::from_str::<Value>(&data) else {
                    return;
                };
                self.rewrite_continued(&mut chunk, carried);
                write_data(out, &Value::Object(chunk));
            }
        }
    }

    /// Learns what a chunk says: the prompt's ids, output ids, the end, the usage.
    fn record(&mut self, chunk: ChunkView<'_>) {
        if self.segment == Segment::Original
            && let Some(ids) = chunk.prompt_token_ids
        {
            self.prompt_ids = Some(ids);
        }
        for choice in chunk.choices {
            if self.segment == Segment::Original
                && let Some(ids) = choice.prompt_token_ids
            {
                self.prompt_ids = Some(ids);
            }
            if let Some(ids) = choice.token_ids {
                self.generated.extend(ids);
            }
            if let Some(delta) = choice.delta {
                self.note_delta(&delta);
            }
            if choice.finish_reason.is_some() {
                self.finished = true;
            }
        }
        if chunk.usage.is_some() && self.finished {
            self.usage_relayed = true;
        }
    }

    fn note_delta(&mut self, delta: &DeltaView<'_>) {
        if delta.tool_calls.is_some()
            || delta.reasoning.is_some()
            || delta.reasoning_content.is_some()
        {
            self.special_output = true;
        } else if delta
            .content
            .as_deref()
            .is_some_and(|text| !text.is_empty())
        {
            self.special_output = false;
        }
    }

    /// Makes a continuation's chunk what the client expects: the first answer's
    /// identity and endpoint shape, token ids only if it asked for them (never the
    /// continuation's prompt), usage over the whole answer.
    fn rewrite_continued(&self, chunk: &mut Map<String, Value>, carried: usize) {
        chunk.remove("prompt_token_ids");
        if let Some(choices) = chunk.get_mut("choices").and_then(Value::as_array_mut) {
            for choice in choices.iter_mut().filter_map(Value::as_object_mut) {
                choice.remove("prompt_token_ids");
                if !self.client_wants_ids {
                    choice.remove("token_ids");
                }
            }
        }
        if let Some(identity) = &self.identity {
            chunk.insert("id".into(), identity.id.clone());
            chunk.insert("created".into(), identity.created.clone());
            chunk.insert("model".into(), identity.model.clone());
        }
        if self.endpoint == Endpoint::Chat {
            as_chat_chunk(chunk);
        }
        if let Some(usage) = chunk.get_mut("usage").and_then(Value::as_object_mut) {
            count_carried_as_output(usage, carried);
        }
    }

    /// What to do now that the worker failed; `migrations_left` continuations may
    /// still be made. The client's body gives the sampling fields and the budget.
    pub fn next_step(&self, client_body: &Map<String, Value>, migrations_left: u32) -> NextStep {
        if self.finished {
            return NextStep::Finish(self.tail(None));
        }
        if self.special_output {
            return NextStep::GiveUp("the output was a tool call or reasoning");
        }
        let budget = max_tokens(self.endpoint, client_body);
        if budget.is_some_and(|max| self.generated.len() as u64 >= max) {
            return NextStep::Finish(self.tail(Some("length")));
        }
        if migrations_left == 0 {
            return NextStep::GiveUp("the migration limit is reached");
        }
        let Some(prompt) = &self.prompt_ids else {
            return NextStep::GiveUp("the worker did not report the prompt's token ids");
        };
        let mut ids = prompt.clone();
        ids.extend_from_slice(&self.generated);
        let body = continuation_body(
            self.endpoint,
            client_body,
            &ids,
            budget.map(|max| max - self.generated.len() as u64),
            self.generated.len(),
        );
        NextStep::Resume {
            path: Endpoint::Completions.path(),
            body,
            prompt_ids: ids,
        }
    }

    /// From now on the events are a continuation's (a partial event of the failed
    /// worker is dropped: its tokens were not recorded either).
    pub fn begin_continuation(&mut self) {
        self.partial.clear();
        let carried = self.generated.len();
        self.segment = Segment::Continuation { carried };
    }

    /// The events that end an answer whose worker failed after its last token: a
    /// finish chunk when `finish` says why, the usage when the client asked for it,
    /// `[DONE]`.
    fn tail(&self, finish: Option<&str>) -> Vec<u8> {
        let mut out = Vec::new();
        let identity = self.identity.clone().unwrap_or(AnswerIdentity {
            id: Value::Null,
            created: Value::Null,
            model: Value::Null,
        });
        let (object, choice) = match self.endpoint {
            Endpoint::Chat => (
                "chat.completion.chunk",
                json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish}),
            ),
            Endpoint::Completions => (
                "text_completion",
                json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish,
                       "stop_reason": null}),
            ),
        };
        let chunk = |choices: Value| {
            json!({"id": identity.id, "object": object, "created": identity.created,
                   "model": identity.model, "choices": choices})
        };
        if finish.is_some() {
            write_data(&mut out, &chunk(json!([choice])));
        }
        if self.include_usage
            && !self.usage_relayed
            && let Some(prompt) = &self.prompt_ids
        {
            let mut usage = chunk(json!([]));
            let (prompt, output) = (prompt.len(), self.generated.len());
            usage["usage"] = json!({"prompt_tokens": prompt, "completion_tokens": output,
                                    "total_tokens": prompt + output});
            write_data(&mut out, &usage);
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        out
    }
}

/// What the ledger reads of a chunk (the rest is relayed untouched).
#[derive(Deserialize)]
struct ChunkView<'a> {
    #[serde(default)]
    prompt_token_ids: Option<Vec<u32>>,
    #[serde(default, borrow)]
    choices: Vec<ChoiceView<'a>>,
    #[serde(default)]
    usage: Option<IgnoredAny>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(default)]
    prompt_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    token_ids: Option<Vec<u32>>,
    #[serde(default)]
    finish_reason: Option<IgnoredAny>,
    #[serde(default, borrow)]
    delta: Option<DeltaView<'a>>,
}

#[derive(Deserialize)]
struct DeltaView<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<IgnoredAny>,
    #[serde(default)]
    reasoning: Option<IgnoredAny>,
    #[serde(default)]
    reasoning_content: Option<IgnoredAny>,
}

/// `json` (one serialized object) without its `token_ids` and `prompt_token_ids`
/// members, wherever they are, as text: no parse and re-serialization on the path
/// every chunk takes. Only a member name can be followed by `:`, and a quote inside a
/// string is escaped, so the pattern cannot match inside a value.
fn without_id_arrays(json: &str) -> std::borrow::Cow<'_, str> {
    if !json.contains("token_ids\"") {
        return std::borrow::Cow::Borrowed(json);
    }
    let bytes = json.as_bytes();
    let mut out = String::with_capacity(json.len());
    let mut copied = 0;
    let mut at = 0;
    while let Some(found) = json[at..].find('"').map(|i| at + i) {
        let Some(member_end) = id_member_end(bytes, found) else {
            at = found + 1;
            continue;
        };
        // Drop the member with one separating comma: the one before it, or, for a
        // first member, the one after it.
        let before = json[copied..found].trim_end();
        let (keep_until, skip_to) = if let Some(stripped) = before.strip_suffix(',') {
            (copied + stripped.len(), member_end)
        } else {
            let rest = &json[member_end..];
            let next = rest
                .trim_start()
                .strip_prefix(',')
                .map_or(0, |after| rest.len() - after.trim_start().len());
            (found, member_end + next)
        };
        out.push_str(&json[copied..keep_until]);
        copied = skip_to;
        at = skip_to;
    }
    out.push_str(&json[copied..]);
    std::borrow::Cow::Owned(out)
}

/// Where a `"token_ids"` or `"prompt_token_ids"` member starting at `start` (its
/// opening quote) ends: after its `null` or its array of numbers.
fn id_member_end(bytes: &[u8], start: usize) -> Option<usize> {
    let rest = &bytes[start..];
    let name = [&b"\"token_ids\""[..], &b"\"prompt_token_ids\""[..]]
        .into_iter()
        .find(|name| rest.starts_with(name))?;
    let mut at = start + name.len();
    let skip_space = |at: &mut usize| {
        while bytes.get(*at).is_some_and(u8::is_ascii_whitespace) {
            *at += 1;
        }
    };
    skip_space(&mut at);
    if bytes.get(at) != Some(&b':') {
        return None;
    }
    at += 1;
    skip_space(&mut at);
    if bytes[at..].starts_with(b"null") {
        return Some(at + 4);
    }
    if bytes.get(at) != Some(&b'[') {
        return None;
    }
    let close = bytes[at..].iter().position(|&b| b == b']')?;
    let inside = &bytes[at + 1..at + close];
    inside
        .iter()
        .all(|b| b.is_ascii_digit() || *b == b',' || b.is_ascii_whitespace())
        .then_some(at + close + 1)
}

/// The request that continues an answer on another worker: a streamed completions
/// request whose prompt is `ids` (the prompt's and the output's so far), with the
/// client's sampling fields, `remaining` tokens to go and ids reported.
fn continuation_body(
    endpoint: Endpoint,
    client_body: &Map<String, Value>,
    ids: &[u32],
    remaining: Option<u64>,
    generated: usize,
) -> Map<String, Value> {
    let mut body = match endpoint {
        Endpoint::Completions => client_body.clone(),
        Endpoint::Chat => CHAT_FIELDS_KEPT
            .iter()
            .filter_map(|field| Some(((*field).to_owned(), client_body.get(*field)?.clone())))
            .collect(),
    };
    body.insert("prompt".into(), json!(ids));
    body.remove("max_completion_tokens");
    body.remove("max_tokens");
    if let Some(remaining) = remaining {
        body.insert("max_tokens".into(), json!(remaining));
    }
    if let Some(min) = body.get("min_tokens").and_then(Value::as_u64) {
        body.insert(
            "min_tokens".into(),
            json!(min.saturating_sub(generated as u64)),
        );
    }
    body.insert("stream".into(), json!(true));
    body.insert(RETURN_TOKEN_IDS.into(), json!(true));
    body
}

/// The client's output budget, if it set one.
fn max_tokens(endpoint: Endpoint, body: &Map<String, Value>) -> Option<u64> {
    let field = |name: &str| body.get(name).and_then(Value::as_u64);
    match endpoint {
        Endpoint::Chat => field("max_completion_tokens").or_else(|| field("max_tokens")),
        Endpoint::Completions => field("max_tokens"),
    }
}

/// A completions chunk turned into a chat chunk: `text` becomes the delta's content.
fn as_chat_chunk(chunk: &mut Map<String, Value>) {
    chunk.insert("object".into(), json!("chat.completion.chunk"));
    let Some(choices) = chunk.get_mut("choices").and_then(Value::as_array_mut) else {
        return;
    };
    for choice in choices.iter_mut().filter_map(Value::as_object_mut) {
        let text = choice.remove("text");
        let delta = match text.as_ref().and_then(Value::as_str) {
            Some(text) if !text.is_empty() => json!({"content": text}),
            _ => json!({}),
        };
        choice.insert("delta".into(), delta);
    }
}

/// Usage of a continuation counted over the whole answer: its prompt held `carried`
/// output tokens.
fn count_carried_as_output(usage: &mut Map<String, Value>, carried: usize) {
    let carried = carried as u64;
    let get = |usage: &Map<String, Value>, key: &str| usage.get(key).and_then(Value::as_u64);
    if let Some(prompt) = get(usage, "prompt_tokens") {
        let prompt = prompt.saturating_sub(carried);
        usage.insert("prompt_tokens".into(), json!(prompt));
        if let Some(cached) = usage
            .get_mut("prompt_tokens_details")
            .and_then(Value::as_object_mut)
            && let Some(tokens) = cached.get("cached_tokens").and_then(Value::as_u64)
        {
            cached.insert("cached_tokens".into(), json!(tokens.min(prompt)));
        }
    }
    if let Some(output) = get(usage, "completion_tokens") {
        usage.insert("completion_tokens".into(), json!(output + carried));
    }
}

/// Where an event ends: its content, and where the next one starts.
struct EventEnd {
    content: usize,
    next: usize,
}

/// The end of the first complete event (a blank line, `\n\n` or `\r\n\r\n`).
fn find_event_end(bytes: &[u8]) -> Option<EventEnd> {
    let lf = find(bytes, b"\n\n").map(|at| EventEnd {
        content: at,
        next: at + 2,
    });
    let crlf = find(bytes, b"\r\n\r\n").map(|at| EventEnd {
        content: at,
        next: at + 4,
    });
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.content <= b.content { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The `data:` of an event (several data lines joined by newlines), if it has one.
fn event_data(event: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    let text = std::str::from_utf8(event).ok()?;
    let mut lines = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| data.strip_prefix(' ').unwrap_or(data));
    let first = lines.next()?;
    match lines.next() {
        None => Some(std::borrow::Cow::Borrowed(first)),
        Some(second) => {
            let mut joined = format!("{first}\n{second}");
            for line in lines {
                joined.push('\n');
                joined.push_str(line);
            }
            Some(std::borrow::Cow::Owned(joined))
        }
    }
}

fn write_data(out: &mut Vec<u8>, value: &Value) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(value.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    fn events(bytes: &[u8]) -> Vec<Value> {
        String::from_utf8(bytes.to_vec())
            .unwrap()
            .split("\n\n")
            .filter_map(|event| event.strip_prefix("data: "))
            .map(|data| serde_json::from_str(data).unwrap_or(json!(data)))
            .collect()
    }

    #[test]
    fn only_single_choice_plain_streams_are_resumable() {
        let chat = |extra: Value| {
            let mut b = body(json!({"messages": [], "stream": true}));
            b.extend(body(extra));
            resumable(Endpoint::Chat, &b)
        };
        assert!(chat(json!({})));
        assert!(chat(json!({"n": 1, "logprobs": false, "tools": []})));
        assert!(chat(json!({"response_format": {"type": "text"}})));
        assert!(!chat(json!({"stream": false})));
        assert!(!chat(json!({"n": 2})));
        assert!(!chat(json!({"logprobs": true})));
        assert!(!chat(json!({"tools": [{"type": "function"}]})));
        assert!(!chat(json!({"response_format": {"type": "json_object"}})));
        assert!(!chat(json!({"guided_regex": "a+"})));
        let completions = |prompt: Value| {
            resumable(
                Endpoint::Completions,
                &body(json!({"prompt": prompt, "stream": true})),
            )
        };
        assert!(completions(json!("hi")));
        assert!(completions(json!([1, 2, 3])));
        assert!(completions(json!([[1, 2]])));
        assert!(!completions(json!(["a", "b"])));
        assert!(!completions(json!([[1], [2]])));
        let echo = body(json!({"prompt": "hi", "stream": true, "echo": true}));
        assert!(!resumable(Endpoint::Completions, &echo));
        let logprobs_zero = body(json!({"prompt": "hi", "stream": true, "logprobs": 0}));
        assert!(!resumable(Endpoint::Completions, &logprobs_zero));
    }

    /// vLLM's shapes (../shared/reference/vllm-pd-protocol.md §4.2) with
    /// `return_token_ids`.
    fn chat_stream() -> Vec<u8> {
        let chunks = [
            json!({"id": "chatcmpl-A", "object": "chat.completion.chunk", "created": 7,
                   "model": "m", "prompt_token_ids": [1, 2, 3],
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "logprobs": null, "finish_reason": null}]}),
            json!({"id": "chatcmpl-A", "object": "chat.completion.chunk", "created": 7,
                   "model": "m", "choices": [{"index": 0, "delta": {"content": " Hello"},
                   "logprobs": null, "finish_reason": null, "token_ids": [10]}]}),
        ];
        let mut out = Vec::new();
        for chunk in chunks {
            write_data(&mut out, &chunk);
        }
        out
    }

    #[test]
    fn events_split_anywhere_come_out_whole_without_ids_the_client_did_not_ask_for() {
        let client = body(json!({"messages": [], "stream": true, "max_tokens": 5}));
        let mut ledger = StreamLedger::new(Endpoint::Chat, &client, false);
        let stream = chat_stream();
        let mut out = Vec::new();
        for piece in stream.chunks(7) {
            out.extend(ledger.relay(piece));
        }
        let events = events(&out);
        assert_eq!(events.len(), 2);
        assert!(events[0].get("prompt_token_ids").is_none());
        assert!(events[1]["choices"][0].get("token_ids").is_none());
        assert_eq!(events[1]["choices"][0]["delta"]["content"], " Hello");
        assert_eq!(ledger.generated, vec![10]);
        assert_eq!(ledger.prompt_ids, Some(vec![1, 2, 3]));

        let mut ledger = StreamLedger::new(Endpoint::Chat, &client, true);
        let events = super::tests::events(&ledger.relay(&stream));
        assert_eq!(events[0]["prompt_token_ids"], json!([1, 2, 3]));
        assert_eq!(events[1]["choices"][0]["token_ids"], json!([10]));
    }

    #[test]
    fn a_chat_stream_continues_as_completions_in_the_first_answers_shape() {
        let client = body(json!({"messages": [{"role": "user", "content": "x"}],
            "stream": true, "max_completion_tokens": 5, "temperature": 0,
            "stream_options": {"include_usage": true}, "tools": [], "min_tokens": 3}));
        let mut ledger = StreamLedger::new(Endpoint::Chat, &client, false);
        ledger.relay(&chat_stream());
        let NextStep::Resume {
            path,
            body,
            prompt_ids,
        } = ledger.next_step(&client, 1)
        else {
            panic!("expected a continuation");
        };
        assert_eq!(path, "/v1/completions");
        assert_eq!(prompt_ids, vec![1, 2, 3, 10]);
        assert_eq!(
            Value::Object(body),
            json!({"prompt": [1, 2, 3, 10], "stream": true, "max_tokens": 4,
                   "temperature": 0, "stream_options": {"include_usage": true},
                   "min_tokens": 2, "return_token_ids": true})
        );
        ledger.begin_continuation();
        let mut continued = Vec::new();
        for chunk in [
            json!({"id": "cmpl-B", "object": "text_completion", "created": 9, "model": "m",
                   "choices": [{"index": 0, "text": " world", "logprobs": null,
                   "finish_reason": null, "prompt_token_ids": [1, 2, 3, 10],
                   "token_ids": [11]}]}),
            json!({"id": "cmpl-B", "object": "text_completion", "created": 9, "model": "m",
                   "choices": [{"index": 0, "text": "", "logprobs": null,
                   "finish_reason": "stop", "token_ids": [2]}]}),
            json!({"id": "cmpl-B", "object": "text_completion", "created": 9, "model": "m",
                   "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2,
                   "total_tokens": 6, "prompt_tokens_details": {"cached_tokens": 4}}}),
        ] {
            write_data(&mut continued, &chunk);
        }
        continued.extend_from_slice(b"data: [DONE]\n\n");
        let events = events(&ledger.relay(&continued));
        assert_eq!(
            events[0],
            json!({"id": "chatcmpl-A", "object": "chat.completion.chunk", "created": 7,
                   "model": "m", "choices": [{"index": 0, "delta": {"content": " world"},
                   "logprobs": null, "finish_reason": null}]})
        );
        assert_eq!(events[1]["choices"][0]["delta"], json!({}));
        assert_eq!(events[1]["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            events[2]["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                   "prompt_tokens_details": {"cached_tokens": 3}})
        );
        assert_eq!(events[3], json!("[DONE]"));
        assert!(ledger.is_done());
        assert_eq!(ledger.generated_tokens(), 3);
    }

    #[test]
    fn a_completions_stream_keeps_the_clients_fields_and_its_prompt_becomes_ids() {
        let client = body(json!({"prompt": "The", "stream": true, "max_tokens": 3,
                                 "seed": 4, "stop": ["\n"]}));
        let mut ledger = StreamLedger::new(Endpoint::Completions, &client, false);
        let mut stream = Vec::new();
        write_data(
            &mut stream,
            &json!({"id": "cmpl-A", "object": "text_completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "text": " cat", "logprobs": null,
                    "finish_reason": null, "prompt_token_ids": [5],
                    "token_ids": [6, 7]}]}),
        );
        ledger.relay(&stream);
        let NextStep::Resume { body, .. } = ledger.next_step(&client, 3) else {
            panic!("expected a continuation");
        };
        assert_eq!(
            Value::Object(body),
            json!({"prompt": [5, 6, 7], "stream": true, "max_tokens": 1, "seed": 4,
                   "stop": ["\n"], "return_token_ids": true})
        );
        assert_eq!(
            ledger.next_step(&client, 0),
            NextStep::GiveUp("the migration limit is reached")
        );
    }

    #[test]
    fn a_failure_after_the_last_token_ends_the_stream_instead_of_migrating() {
        let client = body(json!({"messages": [], "stream": true, "max_tokens": 1,
                                 "stream_options": {"include_usage": true}}));
        let mut ledger = StreamLedger::new(Endpoint::Chat, &client, false);
        ledger.relay(&chat_stream());
        let NextStep::Finish(tail) = ledger.next_step(&client, 1) else {
            panic!("the budget is spent");
        };
        let events = events(&tail);
        assert_eq!(events[0]["choices"][0]["finish_reason"], "length");
        assert_eq!(events[0]["id"], "chatcmpl-A");
        assert_eq!(
            events[1]["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})
        );
        assert_eq!(events[2], json!("[DONE]"));
    }

    #[test]
    fn no_prompt_ids_or_a_tool_call_in_progress_cannot_continue() {
        let client = body(json!({"messages": [], "stream": true}));
        let mut ledger = StreamLedger::new(Endpoint::Chat, &client, false);
        let mut stream = Vec::new();
        write_data(
            &mut stream,
            &json!({"id": "x", "choices": [{"index": 0, "delta": {"content": "a"}}]}),
        );
        ledger.relay(&stream);
        assert!(matches!(ledger.next_step(&client, 1), NextStep::GiveUp(_)));
        let mut ledger = StreamLedger::new(Endpoint::Chat, &client, false);
        ledger.relay(&chat_stream());
        let mut tool = Vec::new();
        write_data(
            &mut tool,
            &json!({"id": "x", "choices": [{"index": 0,
                    "delta": {"tool_calls": [{"index": 0}]}, "token_ids": [3]}]}),
        );
        ledger.relay(&tool);
        assert!(matches!(
            ledger.next_step(&client, 1),
            NextStep::GiveUp("the output was a tool call or reasoning")
        ));
    }

    #[test]
    fn id_members_are_cut_from_the_text_wherever_they_are() {
        let cases = [
            (r#"{"a":1,"token_ids":[1,2]}"#, r#"{"a":1}"#),
            (r#"{"token_ids":[1, 2] , "a":1}"#, r#"{"a":1}"#),
            (r#"{"token_ids":[]}"#, r#"{}"#),
            (
                r#"{"prompt_token_ids": null,"choices":[{"text":"x","token_ids":[3]}]}"#,
                r#"{"choices":[{"text":"x"}]}"#,
            ),
            // In a string, the quotes are escaped: left alone.
            (
                r#"{"text":"say \"token_ids\":[1]","token_ids":[4]}"#,
                r#"{"text":"say \"token_ids\":[1]"}"#,
            ),
            (r#"{"text":"token_ids"}"#, r#"{"text":"token_ids"}"#),
            (r#"{"my_token_ids":[1]}"#, r#"{"my_token_ids":[1]}"#),
        ];
        for (json, expected) in cases {
            let cut = without_id_arrays(json);
            assert_eq!(cut, expected, "{json}");
            let parsed: Value = serde_json::from_str(&cut).unwrap();
            let mut original: Value = serde_json::from_str(json).unwrap();
            strip_ids(&mut original);
            assert_eq!(parsed, original, "{json}");
        }
    }

    fn strip_ids(value: &mut Value) {
        match value {
            Value::Object(map) => {
                map.remove("token_ids");
                map.remove("prompt_token_ids");
                map.values_mut().for_each(strip_ids);
            }
            Value::Array(items) => items.iter_mut().for_each(strip_ids),
            _ => {}
        }
    }

    #[test]
    fn comments_errors_and_unparsed_events_pass_through() {
        let client = body(json!({"messages": [], "stream": true}));
        let mut ledger = StreamLedger::new(Endpoint::Chat, &client, false);
        let out =
            ledger.relay(b": ping\n\ndata: {\"error\": {\"message\": \"x\"}}\n\ndata: oops\n\n");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            ": ping\n\ndata: {\"error\": {\"message\": \"x\"}}\n\ndata: oops\n\n"
        );
    }
}
