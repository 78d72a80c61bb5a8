//! One timed hand-off from a running built-in worker (`tandem kv --measure`): a fresh
//! prompt prefilled there as a prefill leg over its HTTP API (`do_remote_decode`), then
//! every block of its lease read back with [`probe::measure_read`] and released.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tandem_protocol::pd::KvTransferParams;

use super::probe::{self, ProbeError, ProbeRead, ProbeReport};
use super::{ClusterSecret, Limits, RemotePrefill, SourceError, model_identity, wire};
use crate::kv::sizing::{KvShape, hf_config_file, model_folder};
use crate::kv::{KvDtype, KvLayout};

/// Limit of the prefill leg's HTTP request.
const PREFILL_TIMEOUT: Duration = Duration::from_secs(300);

/// What to measure against.
#[derive(Debug, Clone)]
pub struct HandoffProbe<'a> {
    /// The worker's HTTP base URL (`http://HOST:PORT` or `HOST:PORT`).
    pub url: &'a str,
    /// The worker's model: a `.gguf` file, a Hugging Face folder or its `config.json`
    /// (its identity is part of the fingerprint the worker checks).
    pub model: &'a Path,
    pub shape: &'a KvShape,
    /// The worker's `--kv-cache-dtype` and `--block-size`.
    pub dtype: KvDtype,
    pub block_size: usize,
    pub secret: ClusterSecret,
    /// Tokens of the prompt prefilled there.
    pub prompt_len: usize,
}

/// A measured hand-off.
#[derive(Debug, Clone)]
pub struct HandoffMeasurement {
    /// The base URL measured against.
    pub url: String,
    /// The prefill leg's HTTP round trip.
    pub prefill: Duration,
    pub read: ProbeReport,
}

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error(
        "--measure needs the model's vocab_size (its prompt is token ids), which {0} does not give"
    )]
    NoVocabSize(String),
    #[error("the prompt must be at least 1 token")]
    EmptyPrompt,
    #[error("the block size must be at least 1")]
    ZeroBlockSize,
    #[error("reading {} for its identity: {source}", path.display())]
    Identity {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sending the prefill leg to {endpoint}: {source}")]
    Send {
        endpoint: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("{endpoint} answered {status}: {body}")]
    Status {
        endpoint: String,
        status: u16,
        body: String,
    },
    #[error("{endpoint} answered {body}")]
    NotJson { endpoint: String, body: String },
    #[error(
        "{0} answered the prefill leg without kv_transfer_params: it has no KV hand-off \
         listener (start it with `tandem serve --kv-port PORT`)"
    )]
    NoHandoff(String),
    #[error("unusable kv_transfer_params from {url}: {params}")]
    BadParams { url: String, params: String },
    #[error("the worker's kv_transfer_params do not name readable blocks: {0}")]
    NotReadable(#[from] SourceError),
    #[error("the worker holds {held} tokens of a {prompt_len}-token prompt")]
    TooManyTokens { held: usize, prompt_len: usize },
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Read(#[from] ProbeError),
}

/// Prefills a fresh prompt on the worker and reads its KV back, timed; blocks the
/// calling thread.
pub fn measure_handoff(probe: &HandoffProbe<'_>) -> Result<HandoffMeasurement, MeasureError> {
    let vocab_size = probe
        .shape
        .vocab_size
        .ok_or_else(|| MeasureError::NoVocabSize(probe.model.display().to_string()))?;
    if probe.prompt_len == 0 {
        return Err(MeasureError::EmptyPrompt);
    }
    if probe.block_size == 0 {
        return Err(MeasureError::ZeroBlockSize);
    }
    let fingerprint = fingerprint(probe)?;
    let url = base_url(probe.url);
    // A fresh prompt each run: the worker's prefix cache does not shorten the prefill.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let tokens = prompt_tokens(probe.prompt_len, vocab_size, seed);
    let started = Instant::now();
    let params = prefill_leg(&url, &tokens)?;
    let prefill = started.elapsed();
    let (source, num_tokens) = remote_source(&params, tokens.len())?;
    let read = ProbeRead {
        source,
        fingerprint,
        secret: probe.secret.clone(),
        num_tokens,
        tokens_digest: wire::tokens_digest(&tokens[..num_tokens]),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MeasureError::Runtime)?;
    let read = runtime.block_on(probe::measure_read(&read, Limits::default()))?;
    Ok(HandoffMeasurement { url, prefill, read })
}

/// What the worker's hand-off checks: the model's identity and the KV layout.
fn fingerprint(probe: &HandoffProbe<'_>) -> Result<wire::Fingerprint, MeasureError> {
    // A config.json stands for its folder, which the worker loaded.
    let path = match hf_config_file(probe.model) {
        Some(_) => model_folder(probe.model),
        None => probe.model,
    };
    let identity = model_identity(path).map_err(|source| MeasureError::Identity {
        path: path.into(),
        source,
    })?;
    let layout = KvLayout {
        num_layers: probe.shape.layers,
        num_kv_heads: probe.shape.kv_heads,
        head_dim: probe.shape.head_dim,
        block_size: probe.block_size,
        dtype: probe.dtype,
    };
    Ok(wire::Fingerprint::new(identity, layout))
}

/// `HOST:PORT` or a URL, as a base URL without a trailing slash.
fn base_url(url: &str) -> String {
    let url = url.trim_end_matches('/');
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

/// `len` token ids spread over the vocabulary (pseudo-random from `seed`).
fn prompt_tokens(len: usize, vocab_size: usize, seed: u64) -> Vec<u32> {
    let range = vocab_size.clamp(1, u32::MAX as usize) as u32;
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(0..range)).collect()
}

/// Sends the prefill leg (one token, non-streaming, `do_remote_decode`); the answer's
/// `kv_transfer_params`.
fn prefill_leg(url: &str, tokens: &[u32]) -> Result<KvTransferParams, MeasureError> {
    let body = json!({
        "prompt": tokens,
        "max_tokens": 1,
        "temperature": 0,
        "stream": false,
        "kv_transfer_params": KvTransferParams::prefill_request(),
    });
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(PREFILL_TIMEOUT))
            .build(),
    );
    let endpoint = format!("{url}/v1/completions");
    let send_error = |source| MeasureError::Send {
        endpoint: endpoint.clone(),
        source: Box::new(source),
    };
    let mut response = agent
        .post(&endpoint)
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .map_err(send_error)?;
    let status = response.status();
    let text = response.body_mut().read_to_string().map_err(send_error)?;
    if !status.is_success() {
        return Err(MeasureError::Status {
            endpoint,
            status: status.as_u16(),
            body: text,
        });
    }
    let answer: Value = serde_json::from_str(&text).map_err(|_| MeasureError::NotJson {
        endpoint: endpoint.clone(),
        body: text.clone(),
    })?;
    match &answer["kv_transfer_params"] {
        Value::Null => Err(MeasureError::NoHandoff(url.into())),
        params => serde_json::from_value(params.clone()).map_err(|_| MeasureError::BadParams {
            url: url.into(),
            params: params.to_string(),
        }),
    }
}

/// Where the blocks are, and how many prompt tokens they hold.
fn remote_source(
    params: &KvTransferParams,
    prompt_len: usize,
) -> Result<(RemotePrefill, usize), MeasureError> {
    let source = RemotePrefill::from_params(params)?;
    let num_tokens = params.remote_num_tokens.map_or(prompt_len, |n| n as usize);
    if num_tokens > prompt_len {
        return Err(MeasureError::TooManyTokens {
            held: num_tokens,
            prompt_len,
        });
    }
    Ok((source, num_tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_prompts() {
        assert_eq!(base_url("10.0.0.5:8100"), "http://10.0.0.5:8100");
        assert_eq!(base_url("http://h:1/"), "http://h:1");
        let tokens = prompt_tokens(512, 100, 7);
        assert_eq!(tokens.len(), 512);
        assert!(tokens.iter().all(|&t| t < 100));
        assert!(tokens.windows(2).any(|w| w[0] != w[1]));
        assert_eq!(tokens, prompt_tokens(512, 100, 7));
        assert_ne!(tokens, prompt_tokens(512, 100, 8));
    }
}
