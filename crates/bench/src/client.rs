//! One benchmark request, streamed, timed as `vllm bench serve` times it (reference
//! §3.2–3.3): TTFT at the first SSE message with non-empty `choices`, a gap per later
//! choices message, token counts from the final usage chunk. The stream is buffered as
//! bytes and split into events at blank lines (`\n\n` or `\r\n\r\n`); each whole event is
//! decoded as UTF-8, so a character split across network chunks arrives intact.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::stats::RequestRecord;

/// Which endpoint requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Completions,
    Chat,
}

/// One request of a workload.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    pub max_tokens: usize,
}

/// What the requests ask of the server's sampler; each field left out of the request
/// (the server's default) when `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampling {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
}

impl Sampling {
    /// Temperature 0: the same tokens every time.
    pub fn greedy() -> Self {
        Self {
            temperature: Some(0.0),
            ..Self::default()
        }
    }
}

/// How requests are sent.
#[derive(Debug, Clone)]
pub struct Target {
    pub base_url: String,
    pub model: Option<String>,
    pub api: Api,
    pub ignore_eos: bool,
    pub sampling: Sampling,
    pub timeout: Duration,
}

impl Target {
    fn body(&self, prompt: &Prompt) -> Value {
        let mut body = match self.api {
            Api::Completions => json!({"prompt": prompt.text, "max_tokens": prompt.max_tokens}),
            Api::Chat => json!({
                "messages": [{"role": "user", "content": prompt.text}],
                "max_completion_tokens": prompt.max_tokens,
            }),
        };
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        if let Some(model) = &self.model {
            body["model"] = json!(model);
        }
        if self.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        let sampling = &self.sampling;
        if let Some(t) = sampling.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(p) = sampling.top_p {
            body["top_p"] = json!(p);
        }
        if let Some(k) = sampling.top_k {
            body["top_k"] = json!(k);
        }
        body
    }

    fn url(&self) -> String {
        let path = match self.api {
            Api::Completions => "/v1/completions",
            Api::Chat => "/v1/chat/completions",
        };
        format!("{}{path}", self.base_url.trim_end_matches('/'))
    }
}

/// Sends `prompt` and reads its stream; `run_start` anchors `start`.
pub async fn send(
    client: &reqwest::Client,
    target: &Target,
    prompt: &Prompt,
    request_id: &str,
    run_start: Instant,
) -> RequestRecord {
    let sent = Instant::now();
    let mut record = RequestRecord {
        start: sent.duration_since(run_start).as_secs_f64(),
        ..Default::default()
    };
    let result = tokio::time::timeout(
        target.timeout,
        read(client, target, prompt, request_id, sent, &mut record),
    )
    .await;
    match result {
        Ok(Ok(())) => record.ok = true,
        Ok(Err(error)) => record.error = Some(error),
        Err(_) => record.error = Some(format!("no complete answer within {:?}", target.timeout)),
    }
    record
}

async fn read(
    client: &reqwest::Client,
    target: &Target,
    prompt: &Prompt,
    request_id: &str,
    sent: Instant,
    record: &mut RequestRecord,
) -> Result<(), String> {
    let response = client
        .post(target.url())
        .header("x-request-id", request_id)
        .json(&target.body(prompt))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        return Err(format!(
            "HTTP {status}: {}",
            text.chars().take(300).collect::<String>()
        ));
    }
    let mut buffer: Vec<u8> = Vec::new();
    let mut last_choice: Option<Instant> = None;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        buffer.extend_from_slice(&chunk);
        while let Some(event) = next_event(&mut buffer) {
            let now = Instant::now();
            let Some(data) = event_data(&event?) else {
                continue;
            };
            if handle_message(&data, now, sent, &mut last_choice, record, target.api)? {
                return finish(record, last_choice.is_some(), target.api);
            }
        }
    }
    finish(record, last_choice.is_some(), target.api)
}

/// Takes the first whole event (up to a blank line: `\n\n` or `\r\n\r\n`) off
/// `buffer`, decoded; `None` until one has arrived whole.
fn next_event(buffer: &mut Vec<u8>) -> Option<Result<String, String>> {
    let find = |separator: &[u8]| {
        buffer
            .windows(separator.len())
            .position(|w| w == separator)
            .map(|at| (at, separator.len()))
    };
    let (at, len) = match (find(b"\n\n"), find(b"\r\n\r\n")) {
        (Some(lf), Some(crlf)) => {
            if lf.0 < crlf.0 {
                lf
            } else {
                crlf
            }
        }
        (Some(found), None) | (None, Some(found)) => found,
        (None, None) => return None,
    };
    let event: Vec<u8> = buffer.drain(..at + len).take(at).collect();
    Some(String::from_utf8(event).map_err(|e| format!("an event that is not UTF-8: {e}")))
}

/// An event's data: its `data:` lines' values joined by newlines (the SSE rule); `None`
/// for events without data (comments such as `: keep-alive`).
fn event_data(event: &str) -> Option<String> {
    let values: Vec<&str> = event
        .split('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|value| value.strip_prefix(' ').unwrap_or(value))
        .collect();
    (!values.is_empty()).then(|| values.join("\n"))
}

/// Handles one SSE event's data; true at `[DONE]`.
fn handle_message(
    data: &str,
    now: Instant,
    sent: Instant,
    last_choice: &mut Option<Instant>,
    record: &mut RequestRecord,
    api: Api,
) -> Result<bool, String> {
    let data = data.trim();
    if data.is_empty() {
        return Ok(false);
    }
    if data == "[DONE]" {
        return Ok(true);
    }
    let value: Value =
        serde_json::from_str(data).map_err(|e| format!("bad event {data:?}: {e}"))?;
    if let Some(error) = value.get("error") {
        return Err(format!("error event: {error}"));
    }
    let has_choices = value["choices"].as_array().is_some_and(|c| !c.is_empty());
    if has_choices {
        record.text.push_str(choice_text(&value["choices"][0], api));
        match *last_choice {
            None => record.ttft = now.duration_since(sent).as_secs_f64(),
            Some(previous) => record.itls.push(now.duration_since(previous).as_secs_f64()),
        }
        *last_choice = Some(now);
        record.latency = now.duration_since(sent).as_secs_f64();
    } else if api == Api::Chat {
        // vLLM's chat timing counts every data message, the usage chunk included.
        record.latency = now.duration_since(sent).as_secs_f64();
    }
    if let Some(usage) = value.get("usage").filter(|u| u.is_object()) {
        record.output_tokens = usage["completion_tokens"].as_u64().unwrap_or(0) as usize;
        record.prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0) as usize;
    }
    Ok(false)
}

/// The text a streamed choice adds (`text`, or the chat delta's `content`).
fn choice_text(choice: &Value, api: Api) -> &str {
    let text = match api {
        Api::Completions => &choice["text"],
        Api::Chat => &choice["delta"]["content"],
    };
    text.as_str().unwrap_or_default()
}

fn finish(record: &mut RequestRecord, got_choices: bool, api: Api) -> Result<(), String> {
    if api == Api::Completions && !got_choices {
        return Err("Never received a valid chunk to calculate TTFT".into());
    }
    if record.output_tokens == 0 {
        // No usage chunk: count the choices messages.
        record.output_tokens = record.itls.len() + usize::from(got_choices);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` as a stream would, timing event `i` at `times[i]` ms.
    fn read_chunks(chunks: &[&[u8]], times: &[u64], api: Api) -> (RequestRecord, bool) {
        let sent = Instant::now();
        let mut record = RequestRecord::default();
        let mut last = None;
        let mut buffer = Vec::new();
        let mut events = 0;
        for chunk in chunks {
            buffer.extend_from_slice(chunk);
            while let Some(event) = next_event(&mut buffer) {
                let now = sent + Duration::from_millis(times[events]);
                events += 1;
                let Some(data) = event_data(&event.unwrap()) else {
                    continue;
                };
                if handle_message(&data, now, sent, &mut last, &mut record, api).unwrap() {
                    finish(&mut record, last.is_some(), api).unwrap();
                    return (record, true);
                }
            }
        }
        (record, false)
    }

    #[test]
    fn only_the_sampling_fields_given_are_sent() {
        let target = |sampling| Target {
            base_url: "http://127.0.0.1:9".into(),
            model: None,
            api: Api::Completions,
            ignore_eos: false,
            sampling,
            timeout: Duration::from_secs(1),
        };
        let prompt = Prompt {
            text: "hi".into(),
            max_tokens: 4,
        };
        let plain = target(Sampling::default()).body(&prompt);
        for field in ["temperature", "top_p", "top_k"] {
            assert!(plain.get(field).is_none(), "{plain}");
        }
        let body = target(Sampling {
            temperature: Some(0.8),
            top_p: Some(0.95),
            top_k: Some(40),
        })
        .body(&prompt);
        assert_eq!(
            (&body["temperature"], &body["top_p"], &body["top_k"]),
            (&json!(0.8), &json!(0.95), &json!(40))
        );
    }

    #[test]
    fn sse_messages_are_timed_as_vllm_times_them() {
        let stream = concat!(
            ": keep-alive\n\n",
            "data: {\"choices\":[{\"text\":\"a\"}]}\n\n",
            "data: {\"choices\":[{\"text\":\"b\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n",
        );
        let (record, done) = read_chunks(
            &[stream.as_bytes()],
            &[5, 100, 130, 140, 150],
            Api::Completions,
        );
        assert!(done);
        assert!((record.ttft - 0.100).abs() < 1e-9);
        assert_eq!(record.itls.len(), 1);
        assert!(
            (record.latency - 0.130).abs() < 1e-9,
            "completions: last choices chunk"
        );
        assert_eq!((record.prompt_tokens, record.output_tokens), (7, 2));
        assert_eq!(record.text, "ab");
    }

    #[test]
    fn split_characters_and_crlf_separators_arrive_intact() {
        // "é" (C3 A9) and "😀" (F0 9F 98 80) cut across chunks; CRLF and LF separators,
        // the boundary itself cut too.
        let stream = "data: {\"choices\":[{\"text\":\"caf\u{e9}\"}]}\r\n\r\n\
                      data: {\"choices\":[{\"text\":\" \u{1F600}\"}]}\n\n\
                      : ping\r\n\r\n\
                      data: [DONE]\r\n\r\n"
            .as_bytes();
        let e_acute = stream.iter().position(|&b| b == 0xC3).unwrap();
        let emoji = stream.iter().position(|&b| b == 0xF0).unwrap();
        let crlf = stream.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let cuts = [
            e_acute + 1,
            crlf + 2,
            emoji + 1,
            emoji + 3,
            stream.len() - 1,
        ];
        let mut chunks = Vec::new();
        let mut from = 0;
        for cut in cuts {
            chunks.push(&stream[from..cut]);
            from = cut;
        }
        chunks.push(&stream[from..]);
        let (record, done) = read_chunks(&chunks, &[10, 20, 30, 40], Api::Completions);
        assert!(done, "[DONE] after a CRLF boundary");
        assert_eq!(record.text, "café 😀");
        assert_eq!(record.itls.len(), 1);
        assert_eq!(record.output_tokens, 2);
        // Every byte at once gives the same.
        assert_eq!(
            read_chunks(&[stream], &[10, 20, 30, 40], Api::Completions)
                .0
                .text,
            "café 😀"
        );
    }

    #[test]
    fn events_are_split_at_the_first_blank_line_and_data_lines_joined() {
        let mut buffer = b"data: a\r\n\r\ndata: b\n\ndata: c".to_vec();
        assert_eq!(next_event(&mut buffer).unwrap().unwrap(), "data: a");
        assert_eq!(next_event(&mut buffer).unwrap().unwrap(), "data: b");
        assert!(next_event(&mut buffer).is_none(), "c has no end yet");
        assert_eq!(buffer, b"data: c");
        assert_eq!(
            event_data("event: x\r\ndata: {\"a\":\r\ndata:1}").as_deref(),
            Some("{\"a\":\n1}")
        );
        assert_eq!(event_data(": keep-alive"), None);
        let mut invalid = b"data: \xff\n\n".to_vec();
        assert!(next_event(&mut invalid).unwrap().is_err());
    }

    #[test]
    fn error_events_and_empty_streams_fail_the_request() {
        let sent = Instant::now();
        let mut record = RequestRecord::default();
        let mut last = None;
        let error = r#"{"error":{"message":"boom","code":500}}"#;
        assert!(handle_message(error, sent, sent, &mut last, &mut record, Api::Chat).is_err());
        assert!(finish(&mut RequestRecord::default(), false, Api::Completions).is_err());
    }
}
