//! A request's prompt token ids, exactly as the worker will feed them to its model,
//! for KV-aware routing (issue 16): the KV index is keyed by token ids, so the router
//! must know them before it picks a worker.
//!
//! - A completions prompt given as token ids is its own answer; one given as text is
//!   tokenized here when the router has the model's tokenizer (`--tokenizer`), else by
//!   a worker.
//! - A chat request always needs a worker: the chat template is the worker's.
//! - A list of prompts is routed without KV information (no ids).
//!
//! Asking a worker is a `POST /tokenize` (vLLM's endpoint, which `tandem serve` has
//! too) whose body [`tokenize_body`] builds from the client's body, copying only the
//! fields that change the rendered prompt; [`fetch`] sends it with the worker key,
//! a deadline and a bound on the answer's size. [`PromptTokens::for_request`] puts
//! the three together.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header;
use serde_json::{Map, Value};
use tandem_protocol::openai::TokenizeResponse;

use crate::disagg::Endpoint;
use crate::secret::Secret;
use crate::tokens::TokenCounter;

/// Most bytes of a `/tokenize` answer read: ~10 bytes per id, so room for far more
/// ids than any context holds.
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// The fields of a chat body that change the rendered prompt, besides `messages`.
const CHAT_PROMPT_FIELDS: &[&str] = &[
    "add_generation_prompt",
    "continue_final_message",
    "chat_template_kwargs",
    "tools",
];

/// How a request's prompt tokens are learnt.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizePlan {
    /// Known from the body (a prompt given as token ids).
    Known(Vec<u32>),
    /// Text the router's own tokenizer may encode (a completions prompt).
    Text(String),
    /// The body of a worker's `/tokenize`.
    Ask(Map<String, Value>),
    /// Not learnable: a list of prompts, or no prompt the worker would accept.
    Unsupported,
}

/// Why a worker's `/tokenize` gave no ids.
#[derive(Debug, thiserror::Error)]
pub enum PromptTokensError {
    #[error("no answer from /tokenize within {0:?}")]
    Timeout(Duration),
    #[error("calling /tokenize: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("/tokenize answered {status}")]
    Status { status: u16 },
    #[error("the worker key is not a valid header value")]
    BadKey,
    #[error("the /tokenize answer is over {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    #[error("the /tokenize answer is not a tokenize response: {0}")]
    BadBody(#[from] serde_json::Error),
}

/// What to do to learn the prompt tokens of a client's `body` for `endpoint`.
pub fn tokenize_body(endpoint: Endpoint, body: &Map<String, Value>) -> TokenizePlan {
    match endpoint {
        Endpoint::Completions => completion_plan(body.get("prompt")),
        Endpoint::Chat => chat_plan(body),
    }
}

fn completion_plan(prompt: Option<&Value>) -> TokenizePlan {
    match prompt {
        Some(Value::String(text)) => TokenizePlan::Text(text.clone()),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => token_ids(items),
        _ => TokenizePlan::Unsupported,
    }
}

/// A prompt of token ids, when every one is a valid id.
fn token_ids(items: &[Value]) -> TokenizePlan {
    let ids: Option<Vec<u32>> = items
        .iter()
        .map(|item| item.as_u64().and_then(|id| u32::try_from(id).ok()))
        .collect();
    match ids {
        Some(ids) if !ids.is_empty() => TokenizePlan::Known(ids),
        _ => TokenizePlan::Unsupported,
    }
}

fn chat_plan(body: &Map<String, Value>) -> TokenizePlan {
    let Some(messages @ Value::Array(_)) = body.get("messages") else {
        return TokenizePlan::Unsupported;
    };
    let mut ask = Map::new();
    ask.insert("messages".into(), messages.clone());
    for &field in CHAT_PROMPT_FIELDS {
        if let Some(value) = body.get(field) {
            ask.insert(field.into(), value.clone());
        }
    }
    TokenizePlan::Ask(ask)
}

/// The `/tokenize` body for a completions prompt of `text`.
fn prompt_body(text: String) -> Map<String, Value> {
    let mut ask = Map::new();
    ask.insert("prompt".into(), Value::String(text));
    ask
}

/// POSTs `body` to `{worker}/tokenize` and returns the ids; the whole call (answer
/// read included) must end within `timeout`, and at most [`MAX_RESPONSE_BYTES`] of
/// the answer are read. With `worker_key`, the call carries
/// `Authorization: Bearer <worker_key>`.
pub async fn fetch(
    client: &reqwest::Client,
    worker: &str,
    worker_key: Option<&Secret>,
    body: &Map<String, Value>,
    timeout: Duration,
) -> Result<Vec<u32>, PromptTokensError> {
    let call = call_tokenize(client, worker, worker_key, body);
    let bytes = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| PromptTokensError::Timeout(timeout))??;
    let answer: TokenizeResponse = serde_json::from_slice(&bytes)?;
    Ok(answer.tokens)
}

async fn call_tokenize(
    client: &reqwest::Client,
    worker: &str,
    worker_key: Option<&Secret>,
    body: &Map<String, Value>,
) -> Result<Vec<u8>, PromptTokensError> {
    let mut request = client
        .post(format!("{}/tokenize", worker.trim_end_matches('/')))
        .json(body);
    if let Some(key) = worker_key {
        let mut value = header::HeaderValue::from_str(&format!("Bearer {}", key.expose()))
            .map_err(|_| PromptTokensError::BadKey)?;
        value.set_sensitive(true);
        request = request.header(header::AUTHORIZATION, value);
    }
    let response = request.send().await?;
    let status = response.status();
    if !status.is_success() {
        return Err(PromptTokensError::Status {
            status: status.as_u16(),
        });
    }
    read_bounded(response).await
}

/// The body of `response`, refused once it passes [`MAX_RESPONSE_BYTES`].
async fn read_bounded(response: reqwest::Response) -> Result<Vec<u8>, PromptTokensError> {
    if response
        .content_length()
        .is_some_and(|length| length > MAX_RESPONSE_BYTES as u64)
    {
        return Err(PromptTokensError::TooLarge);
    }
    let mut bytes = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(PromptTokensError::TooLarge);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Where a request's prompt tokens come from: the router's tokenizer when it has one,
/// else a worker.
pub struct PromptTokens<'a> {
    /// The router's tokenizer (`--tokenizer`); an estimate counter never tokenizes.
    pub local: &'a TokenCounter,
    pub client: &'a reqwest::Client,
    pub worker_key: Option<&'a Secret>,
    pub timeout: Duration,
}

impl PromptTokens<'_> {
    /// The prompt token ids of a client's `body` for `endpoint`, asking `worker` (a
    /// base URL) when they cannot be known here; `Ok(None)` when the request has no
    /// single prompt to learn (it is routed without KV information).
    pub async fn for_request(
        &self,
        endpoint: Endpoint,
        body: &Map<String, Value>,
        worker: &str,
    ) -> Result<Option<Vec<u32>>, PromptTokensError> {
        let ask = match tokenize_body(endpoint, body) {
            TokenizePlan::Known(ids) => return Ok(Some(ids)),
            TokenizePlan::Unsupported => return Ok(None),
            TokenizePlan::Text(text) => match self.local.encode(&text) {
                Some(ids) => return Ok(Some(ids)),
                None => prompt_body(text),
            },
            TokenizePlan::Ask(ask) => ask,
        };
        let ids = fetch(self.client, worker, self.worker_key, &ask, self.timeout).await?;
        Ok(Some(ids))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn a_text_prompt_is_text_and_nothing_else_travels() {
        let client = body(json!({"model": "m", "prompt": "Hello", "max_tokens": 5,
            "kv_transfer_params": {"do_remote_decode": true}, "stream": true}));
        let plan = tokenize_body(Endpoint::Completions, &client);
        assert_eq!(plan, TokenizePlan::Text("Hello".into()));
        assert_eq!(
            prompt_body("Hello".into()),
            body(json!({"prompt": "Hello"}))
        );
    }

    #[test]
    fn token_id_prompts_need_no_call() {
        let plan = tokenize_body(Endpoint::Completions, &body(json!({"prompt": [1, 2, 3]})));
        assert_eq!(plan, TokenizePlan::Known(vec![1, 2, 3]));
    }

    #[test]
    fn lists_of_prompts_and_odd_prompts_are_unsupported() {
        for prompt in [
            json!(["a", "b"]),
            json!([[1, 2], [3]]),
            json!([]),
            json!([-1]),
            json!([1.5]),
            json!([4294967296u64]),
            json!(5),
            json!(null),
        ] {
            let plan = tokenize_body(Endpoint::Completions, &body(json!({"prompt": prompt})));
            assert_eq!(plan, TokenizePlan::Unsupported, "{prompt}");
        }
        let plan = tokenize_body(Endpoint::Completions, &body(json!({"max_tokens": 1})));
        assert_eq!(plan, TokenizePlan::Unsupported);
    }

    #[test]
    fn chat_copies_messages_and_the_prompt_shaping_fields_only() {
        let messages = json!([{"role": "user", "content": "hi"}]);
        let client = body(json!({
            "model": "m", "messages": messages, "max_tokens": 3, "temperature": 0,
            "stream": true, "user": "u", "kv_transfer_params": {"x": 1},
            "add_generation_prompt": false, "continue_final_message": true,
            "chat_template_kwargs": {"enable_thinking": false},
            "tools": [{"type": "function", "function": {"name": "f"}}],
        }));
        let TokenizePlan::Ask(ask) = tokenize_body(Endpoint::Chat, &client) else {
            panic!("chat asks a worker");
        };
        assert_eq!(
            Value::Object(ask),
            json!({
                "messages": messages,
                "add_generation_prompt": false, "continue_final_message": true,
                "chat_template_kwargs": {"enable_thinking": false},
                "tools": [{"type": "function", "function": {"name": "f"}}],
            })
        );
        let minimal = tokenize_body(Endpoint::Chat, &body(json!({"messages": messages})));
        assert_eq!(
            minimal,
            TokenizePlan::Ask(body(json!({"messages": messages})))
        );
    }

    /// A worker whose `/tokenize` answers `answer` after `delay`.
    async fn fake_worker(answer: &'static str, delay: Duration) -> String {
        let app = axum::Router::new().route(
            "/tokenize",
            axum::routing::post(move || async move {
                tokio::time::sleep(delay).await;
                answer
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}")
    }

    async fn fetch_from(worker: &str, timeout: Duration) -> Result<Vec<u32>, PromptTokensError> {
        let client = reqwest::Client::new();
        let body = prompt_body("hi".into());
        fetch(&client, worker, None, &body, timeout).await
    }

    #[tokio::test]
    async fn answers_are_bounded_in_time_size_and_shape() {
        let good = r#"{"count":2,"max_model_len":8,"tokens":[7,9],"token_strs":null}"#;
        let worker = fake_worker(good, Duration::ZERO).await;
        assert_eq!(
            fetch_from(&worker, Duration::from_secs(5)).await.unwrap(),
            vec![7, 9]
        );

        let slow = fake_worker(good, Duration::from_secs(30)).await;
        let error = fetch_from(&slow, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(error, PromptTokensError::Timeout(_)), "{error}");

        let huge: &'static str = " ".repeat(MAX_RESPONSE_BYTES + 1).leak();
        let worker = fake_worker(huge, Duration::ZERO).await;
        let error = fetch_from(&worker, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(error, PromptTokensError::TooLarge), "{error}");

        let worker = fake_worker(r#"{"tokens":"x"}"#, Duration::ZERO).await;
        let error = fetch_from(&worker, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(error, PromptTokensError::BadBody(_)), "{error}");

        let error = fetch_from(&format!("{worker}/nowhere"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(error, PromptTokensError::Status { status: 404 }),
            "{error}"
        );
    }

    #[test]
    fn chat_without_a_message_list_is_unsupported() {
        for client in [json!({}), json!({"messages": "hi"}), json!({"prompt": "x"})] {
            assert_eq!(
                tokenize_body(Endpoint::Chat, &body(client.clone())),
                TokenizePlan::Unsupported,
                "{client}"
            );
        }
    }
}
