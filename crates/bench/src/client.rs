//! One benchmark request, streamed, timed as `vllm bench serve` times it (reference
//! §3.2–3.3): TTFT at the first SSE message with non-empty `choices`, a gap per later
//! choices message, token counts from the final usage chunk.

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

/// How requests are sent.
#[derive(Debug, Clone)]
pub struct Target {
    pub base_url: String,
    pub model: Option<String>,
    pub api: Api,
    pub ignore_eos: bool,
    pub temperature: Option<f64>,
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
        if let Some(t) = self.temperature {
            body["temperature"] = json!(t);
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
    let mut buffer = String::new();
    let mut last_choice: Option<Instant> = None;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let message: String = buffer.drain(..end + 2).collect();
            let now = Instant::now();
            if handle_message(
                message.trim(),
                now,
                sent,
                &mut last_choice,
                record,
                target.api,
            )? {
                return finish(record, last_choice.is_some(), target.api);
            }
        }
    }
    finish(record, last_choice.is_some(), target.api)
}

/// Handles one SSE message; true at `[DONE]`.
fn handle_message(
    message: &str,
    now: Instant,
    sent: Instant,
    last_choice: &mut Option<Instant>,
    record: &mut RequestRecord,
    api: Api,
) -> Result<bool, String> {
    if message.is_empty() || message.starts_with(':') {
        return Ok(false);
    }
    let data = message
        .strip_prefix("data:")
        .map(str::trim)
        .unwrap_or(message);
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

    #[test]
    fn sse_messages_are_timed_as_vllm_times_them() {
        let sent = Instant::now();
        let at = |ms| sent + Duration::from_millis(ms);
        let mut record = RequestRecord::default();
        let mut last = None;
        let events = [
            (": keep-alive", 5),
            (r#"data: {"choices":[{"text":"a"}]}"#, 100),
            (r#"data: {"choices":[{"text":"b"}]}"#, 130),
            (
                r#"data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}"#,
                140,
            ),
        ];
        for (message, ms) in events {
            let done = handle_message(
                message,
                at(ms),
                sent,
                &mut last,
                &mut record,
                Api::Completions,
            )
            .unwrap();
            assert!(!done);
        }
        assert!(
            handle_message(
                "data: [DONE]",
                at(150),
                sent,
                &mut last,
                &mut record,
                Api::Completions
            )
            .unwrap()
        );
        finish(&mut record, true, Api::Completions).unwrap();
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
    fn error_events_and_empty_streams_fail_the_request() {
        let sent = Instant::now();
        let mut record = RequestRecord::default();
        let mut last = None;
        let error = r#"data: {"error":{"message":"boom","code":500}}"#;
        assert!(handle_message(error, sent, sent, &mut last, &mut record, Api::Chat).is_err());
        assert!(finish(&mut RequestRecord::default(), false, Api::Completions).is_err());
    }
}
