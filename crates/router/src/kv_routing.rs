//! The dispatcher's side of KV-aware routing: what it needs per request beyond the
//! policy. It owns
//!
//! - [`KvRouting`]: the view of the workers' caches ([`PrefixLookup`]) and where a
//!   request's token ids come from;
//! - the check of predictions against what workers report: a policy predicts how many
//!   prompt tokens the chosen worker holds ([`Pick`](crate::policy::Pick)); the worker's
//!   answer says how many it found (`usage.prompt_tokens_details.cached_tokens`, which
//!   tandem workers always send and vLLM sends with `--enable-prompt-tokens-details`).
//!   Both go to counters, so that `predicted / actual` shows how well the router's view
//!   matches the caches.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::disagg::Endpoint;
use crate::metrics as names;
use crate::policy::{PrefixLookup, reusable_part};
use crate::prompt_tokens::PromptTokens;
use crate::registry::Worker;
use crate::throttle::Throttle;
use crate::tokens::TokenCounter;

/// What KV-aware routing needs in the dispatcher.
#[derive(Debug)]
pub struct KvRouting {
    /// The workers' caches, from their KV events.
    pub lookup: Arc<dyn PrefixLookup>,
    /// Tokenizes completions text prompts here when the router has the model's
    /// tokenizer (`--tokenizer`).
    counter: TokenCounter,
    /// The longest wait for a worker's `/tokenize`.
    timeout: Duration,
    /// Which worker tokenizes next.
    rotation: AtomicUsize,
}

/// "No token ids for kv_aware", at most every 10 s.
static TOKENIZE_WARNING: Throttle = Throttle::new(Duration::from_secs(10));

impl KvRouting {
    pub fn new(lookup: Arc<dyn PrefixLookup>, counter: TokenCounter, timeout: Duration) -> Self {
        Self {
            lookup,
            counter,
            timeout,
            rotation: AtomicUsize::new(0),
        }
    }

    /// The request's prompt as the workers tokenize it, chat template applied: from
    /// the prompt itself (ids), the local tokenizer (text, with `--tokenizer`) or one
    /// of `workers` (`POST /tokenize`, taken in turn). `None`, counted, when it cannot
    /// be had: the request is then routed without the cache.
    pub async fn prompt_token_ids(
        &self,
        client: &reqwest::Client,
        endpoint: Endpoint,
        body: &Map<String, Value>,
        workers: &[Arc<Worker>],
    ) -> Option<Vec<u32>> {
        let worker = match workers.len() {
            0 => "",
            n => &workers[self.rotation.fetch_add(1, Ordering::Relaxed) % n].url,
        };
        let source = PromptTokens {
            local: &self.counter,
            client,
            // The client sends the worker key on every call already.
            worker_key: None,
            timeout: self.timeout,
        };
        let (outcome, ids) = match source.for_request(endpoint, body, worker).await {
            Ok(Some(ids)) => ("ok", Some(ids)),
            Ok(None) => ("unsupported", None),
            Err(err) => {
                if let Some(held_back) = TOKENIZE_WARNING.admit(Instant::now()) {
                    tracing::warn!(worker, %err, held_back,
                        "no token ids for kv_aware: routing without the cache");
                }
                ("error", None)
            }
        };
        metrics::counter!(names::KV_TOKENIZE_TOTAL, names::OUTCOME => outcome).increment(1);
        ids
    }

    /// Cached prompt tokens on `url`, as far as the router knows (`None`: unknown).
    /// The prompt's last token is left out: engines always compute it, so it can never
    /// be a cache hit.
    pub fn cached_on(&self, url: &str, tokens: &[u32]) -> Option<usize> {
        let reusable = reusable_part(tokens);
        self.lookup
            .cached_prefix_tokens(&[url], reusable)
            .first()
            .copied()
            .flatten()
    }
}

/// A policy's prediction for one request, checked when the worker's usage arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prediction {
    pub cached_tokens: usize,
}

impl Prediction {
    /// Counts the prediction against the `actual` cached tokens the worker reported.
    pub fn check(self, actual: usize) {
        let outcome = match self.cached_tokens.cmp(&actual) {
            std::cmp::Ordering::Equal => "exact",
            std::cmp::Ordering::Greater => "over",
            std::cmp::Ordering::Less => "under",
        };
        metrics::counter!(names::KV_PREDICTIONS_TOTAL, names::OUTCOME => outcome).increment(1);
        metrics::counter!(names::KV_PREDICTED_CACHED_TOKENS_TOTAL)
            .increment(self.cached_tokens as u64);
        metrics::counter!(names::KV_ACTUAL_CACHED_TOKENS_TOTAL).increment(actual as u64);
    }

    /// Checks against a whole JSON answer, if it carries the cached-token count.
    pub fn check_answer(self, answer: &Value) {
        if let Some(actual) = reported_cached_tokens(answer) {
            self.check(actual);
        }
    }

    /// Checks against the usage in an SSE chunk, if the chunk holds one whole `data:`
    /// line with it (the usage chunk is small and comes alone, last).
    pub fn check_sse_chunk(self, chunk: &[u8]) -> bool {
        if !contains(chunk, b"\"cached_tokens\"") {
            return false;
        }
        let Ok(text) = std::str::from_utf8(chunk) else {
            return false;
        };
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            if let Ok(value) = serde_json::from_str::<Value>(data.trim())
                && let Some(actual) = reported_cached_tokens(&value)
            {
                self.check(actual);
                return true;
            }
        }
        false
    }
}

/// `usage.prompt_tokens_details.cached_tokens` of an OpenAI answer or chunk.
pub fn reported_cached_tokens(answer: &Value) -> Option<usize> {
    let cached = answer
        .get("usage")?
        .get("prompt_tokens_details")?
        .get("cached_tokens")?
        .as_u64()?;
    usize::try_from(cached).ok()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_cached_tokens_of_an_answer() {
        let answer = json!({"usage": {"prompt_tokens": 40, "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": 32}}});
        assert_eq!(reported_cached_tokens(&answer), Some(32));
        assert_eq!(
            reported_cached_tokens(&json!({"usage": {"prompt_tokens": 4}})),
            None
        );
        assert_eq!(reported_cached_tokens(&json!({"usage": null})), None);
        let hostile = json!({"usage": {"prompt_tokens_details": {"cached_tokens": -1}}});
        assert_eq!(reported_cached_tokens(&hostile), None);
    }

    #[test]
    fn finds_the_usage_in_an_sse_chunk_only_when_it_is_there() {
        let prediction = Prediction { cached_tokens: 16 };
        let usage = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":20,\
            \"prompt_tokens_details\":{\"cached_tokens\":16}}}\n\ndata: [DONE]\n\n";
        assert!(prediction.check_sse_chunk(usage));
        assert!(!prediction.check_sse_chunk(b"data: {\"choices\":[{\"text\":\"hi\"}]}\n\n"));
        assert!(!prediction.check_sse_chunk(b"data: {\"cached_tokens\": broken\n\n"));
    }
}
