//! Pulling tool calls out of generated text as it streams: text that is not part of a
//! call goes out as soon as it cannot be the start of one; a call goes out whole once
//! its end is seen (or at the end of the output).

use serde_json::Value;

use super::{ToolCall, ToolCallFormat};

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";

/// A part of the output, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Ordinary text (the message's content).
    Content(String),
    Call(ToolCall),
}

/// What the output is expected to hold.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// Text, with calls in `format` wherever the model chooses.
    Auto(ToolCallFormat),
    /// A JSON array of `{"name", "parameters"}` objects (forced by a grammar).
    Required,
    /// The arguments of the one named function, as JSON (forced by a grammar).
    Named(String),
}

/// Splits one choice's output into content and tool calls.
#[derive(Debug, Clone)]
pub struct ToolCallExtractor {
    mode: Mode,
    /// Text not yet given out.
    held: String,
    /// Hermes: inside `<tool_call>` (its text is in `held`).
    in_call: bool,
    /// Llama 3 JSON: the output is a call (decided by its first non-blank text).
    json_output: Option<bool>,
    calls: usize,
}

impl ToolCallExtractor {
    /// Calls in `format` anywhere in the text (`tool_choice: "auto"`).
    pub fn auto(format: ToolCallFormat) -> Self {
        Self::new(Mode::Auto(format))
    }

    /// A JSON array of calls (`tool_choice: "required"`).
    pub fn required() -> Self {
        Self::new(Mode::Required)
    }

    /// The named function's arguments (`tool_choice` naming a function).
    pub fn named(name: &str) -> Self {
        Self::new(Mode::Named(name.to_owned()))
    }

    fn new(mode: Mode) -> Self {
        Self {
            mode,
            held: String::new(),
            in_call: false,
            json_output: None,
            calls: 0,
        }
    }

    /// Whether any call was given out.
    pub fn made_calls(&self) -> bool {
        self.calls > 0
    }

    /// Whether the output was forced to a named function (OpenAI ends such answers
    /// with `stop`, not `tool_calls`).
    pub fn is_named(&self) -> bool {
        matches!(self.mode, Mode::Named(_))
    }

    /// The pieces `text` completes.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.held.push_str(text);
        let pieces = match self.mode.clone() {
            Mode::Auto(ToolCallFormat::Hermes) => self.hermes(),
            Mode::Auto(ToolCallFormat::Llama3Json) => self.llama_json(),
            Mode::Required | Mode::Named(_) => Vec::new(),
        };
        self.count(pieces)
    }

    /// The rest, at the end of the output.
    pub fn finish(&mut self) -> Vec<Piece> {
        let held = std::mem::take(&mut self.held);
        let pieces = match &self.mode {
            Mode::Auto(ToolCallFormat::Hermes) if self.in_call => match parse_call(held.trim()) {
                Some(call) => vec![Piece::Call(call)],
                None => vec![Piece::Content(format!("{HERMES_OPEN}{held}"))],
            },
            Mode::Auto(ToolCallFormat::Llama3Json) if self.json_output != Some(false) => {
                llama_calls(&held).unwrap_or_else(|| vec![Piece::Content(held)])
            }
            Mode::Auto(_) => vec![Piece::Content(held)],
            Mode::Required => required_calls(&held).unwrap_or_else(|| vec![Piece::Content(held)]),
            Mode::Named(name) => vec![Piece::Call(ToolCall {
                name: name.clone(),
                arguments: held.trim().to_owned(),
            })],
        };
        let pieces = pieces
            .into_iter()
            .filter(|piece| !matches!(piece, Piece::Content(text) if text.is_empty()))
            .collect();
        self.count(pieces)
    }

    fn count(&mut self, pieces: Vec<Piece>) -> Vec<Piece> {
        self.calls += pieces
            .iter()
            .filter(|p| matches!(p, Piece::Call(_)))
            .count();
        pieces
    }

    fn hermes(&mut self) -> Vec<Piece> {
        let mut pieces = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.held.find(HERMES_CLOSE) else {
                    return pieces;
                };
                let body: String = self.held.drain(..end + HERMES_CLOSE.len()).collect();
                let body = &body[..end];
                pieces.push(match parse_call(body.trim()) {
                    Some(call) => Piece::Call(call),
                    None => Piece::Content(format!("{HERMES_OPEN}{body}{HERMES_CLOSE}")),
                });
                self.in_call = false;
                continue;
            }
            if let Some(start) = self.held.find(HERMES_OPEN) {
                let before: String = self.held.drain(..start + HERMES_OPEN.len()).collect();
                push_content(&mut pieces, &before[..start]);
                self.in_call = true;
                continue;
            }
            // Keep back what could be the start of a tag.
            let keep = partial_suffix(&self.held, HERMES_OPEN);
            let out: String = self.held.drain(..self.held.len() - keep).collect();
            push_content(&mut pieces, &out);
            return pieces;
        }
    }

    fn llama_json(&mut self) -> Vec<Piece> {
        if self.json_output.is_none() {
            let start = self.held.trim_start();
            if start.is_empty() || (PYTHON_TAG.starts_with(start) && start.len() < PYTHON_TAG.len())
            {
                return Vec::new();
            }
            self.json_output = Some(start.starts_with('{') || start.starts_with(PYTHON_TAG));
        }
        if self.json_output == Some(true) {
            return Vec::new();
        }
        let out = std::mem::take(&mut self.held);
        let mut pieces = Vec::new();
        push_content(&mut pieces, &out);
        pieces
    }
}

fn push_content(pieces: &mut Vec<Piece>, text: &str) {
    if !text.is_empty() {
        pieces.push(Piece::Content(text.to_owned()));
    }
}

/// The length of the longest suffix of `text` that begins `tag` (a char boundary).
fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&len| {
            text.is_char_boundary(text.len() - len) && tag.starts_with(&text[text.len() - len..])
        })
        .unwrap_or(0)
}

fn parse_call(text: &str) -> Option<ToolCall> {
    ToolCall::from_json(&serde_json::from_str::<Value>(text).ok()?)
}

/// Llama 3's calls: JSON objects separated by `;`, maybe after `<|python_tag|>`.
fn llama_calls(text: &str) -> Option<Vec<Piece>> {
    let text = text.trim_start();
    let text = text.strip_prefix(PYTHON_TAG).unwrap_or(text);
    let mut calls = Vec::new();
    for part in split_top_level(text, ';') {
        if part.trim().is_empty() {
            continue;
        }
        calls.push(Piece::Call(parse_call(part.trim())?));
    }
    (!calls.is_empty()).then_some(calls)
}

/// `text` split at `separator` where it is outside JSON strings and brackets.
fn split_top_level(text: &str, separator: char) -> Vec<&str> {
    let (mut parts, mut start, mut depth) = (Vec::new(), 0, 0i32);
    let (mut in_string, mut escaped) = (false, false);
    for (at, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            '{' | '[' if !in_string => depth += 1,
            '}' | ']' if !in_string => depth -= 1,
            c if c == separator && !in_string && depth == 0 => {
                parts.push(&text[start..at]);
                start = at + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// A forced array of `{"name", "parameters"}`.
fn required_calls(text: &str) -> Option<Vec<Piece>> {
    let list: Vec<Value> = serde_json::from_str(text.trim()).ok()?;
    list.iter()
        .map(|item| ToolCall::from_json(item).map(Piece::Call))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, arguments: &str) -> Piece {
        Piece::Call(ToolCall {
            name: name.into(),
            arguments: arguments.into(),
        })
    }

    /// Everything `extractor` gives out for `chunks`, adjacent content merged.
    fn run(mut extractor: ToolCallExtractor, chunks: &[&str]) -> Vec<Piece> {
        let mut pieces: Vec<Piece> = chunks.iter().flat_map(|c| extractor.push(c)).collect();
        pieces.extend(extractor.finish());
        let mut merged: Vec<Piece> = Vec::new();
        for piece in pieces {
            match (merged.last_mut(), piece) {
                (Some(Piece::Content(a)), Piece::Content(b)) => a.push_str(&b),
                (_, piece) => merged.push(piece),
            }
        }
        merged
    }

    #[test]
    fn hermes_calls_are_cut_out_of_text_however_it_is_chunked() {
        let text = "Let me add.<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 2}}\n</tool_call> Done <b>";
        let expected = vec![
            Piece::Content("Let me add.".into()),
            call("add", r#"{"a":2}"#),
            Piece::Content(" Done <b>".into()),
        ];
        for size in [1, 2, 3, 5, 8, 100] {
            let chunks: Vec<String> = text
                .chars()
                .collect::<Vec<_>>()
                .chunks(size)
                .map(|c| c.iter().collect())
                .collect();
            let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
            assert_eq!(
                run(ToolCallExtractor::auto(ToolCallFormat::Hermes), &chunks),
                expected,
                "{size}"
            );
        }
    }

    #[test]
    fn hermes_text_goes_out_as_soon_as_it_cannot_open_a_call() {
        let mut extractor = ToolCallExtractor::auto(ToolCallFormat::Hermes);
        assert_eq!(
            extractor.push("Hello <to"),
            vec![Piece::Content("Hello ".into())]
        );
        assert_eq!(extractor.push("day"), vec![Piece::Content("<today".into())]);
        assert!(!extractor.made_calls());
    }

    #[test]
    fn broken_or_unclosed_calls_stay_text_or_are_read_at_the_end() {
        let broken = "<tool_call>{not json}</tool_call>";
        assert_eq!(
            run(ToolCallExtractor::auto(ToolCallFormat::Hermes), &[broken]),
            vec![Piece::Content(broken.into())]
        );
        let unclosed = ["<tool_call>{\"name\": \"f\", \"arguments\": {}}"];
        assert_eq!(
            run(ToolCallExtractor::auto(ToolCallFormat::Hermes), &unclosed),
            vec![call("f", "{}")]
        );
    }

    #[test]
    fn llama_json_calls_or_plain_text() {
        let calls = [
            "<|python_tag|>{\"name\": \"a\", \"parameters\": {\"x\": \"1;2\"}}; ",
            "{\"name\": \"b\", \"parameters\": {}}",
        ];
        assert_eq!(
            run(ToolCallExtractor::auto(ToolCallFormat::Llama3Json), &calls),
            vec![call("a", r#"{"x":"1;2"}"#), call("b", "{}")]
        );
        let mut text = ToolCallExtractor::auto(ToolCallFormat::Llama3Json);
        assert_eq!(
            text.push("  The answer"),
            vec![Piece::Content("  The answer".into())]
        );
        assert_eq!(
            run(
                ToolCallExtractor::auto(ToolCallFormat::Llama3Json),
                &["{oops"]
            ),
            vec![Piece::Content("{oops".into())]
        );
    }

    #[test]
    fn forced_outputs_become_calls() {
        let required = [
            "[{\"name\": \"a\", \"parameters\": {\"x\": 1}},",
            " {\"name\": \"b\", \"parameters\": {}}]",
        ];
        assert_eq!(
            run(ToolCallExtractor::required(), &required),
            vec![call("a", r#"{"x":1}"#), call("b", "{}")]
        );
        let named = ToolCallExtractor::named("get_weather");
        assert!(named.is_named());
        assert_eq!(
            run(named, &["{\"city\": ", "\"Paris\"} "]),
            vec![call("get_weather", "{\"city\": \"Paris\"}")]
        );
    }
}
