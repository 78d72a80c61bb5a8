//! `tandem serve`: the built-in engine behind its OpenAI-compatible HTTP API. Loads the
//! model, starts the engine loop, serves until SIGTERM or SIGINT, then stops accepting
//! connections and lets the requests in flight finish (within a bound).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use tandem_engine::LoadedModel;
use tandem_engine::api::{self, ServedModel, ServerState};
use tandem_engine::fetch;
use tandem_engine::kv::{KvDtype, KvOptions};
use tandem_engine::metrics::install_prometheus_recorder;
use tandem_engine::model::LoadOptions;
use tandem_engine::sched::{self, EngineConfig};
use tokio::sync::Notify;

#[derive(Args)]
pub struct ServeArgs {
    /// A `.gguf` file or a Hugging Face folder. Default: the cached default model
    /// (`tandem model fetch`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed when ready).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The model name clients use (default: the model file's stem or folder name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most tokens (prompt plus output) of one request. Default: the model's context
    /// length, lowered to what the KV cache holds.
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Most sequences in one batch.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// Most tokens (decodes and prefill chunks) in one forward pass.
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Token positions per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Memory for the KV cache: bytes, or with a suffix (KiB, MiB, GiB, KB, MB, GB).
    #[arg(long, default_value = "1GiB", value_parser = parse_byte_size)]
    kv_cache_memory: usize,
    /// Do not reuse the KV blocks of prompt prefixes seen before.
    #[arg(long)]
    no_prefix_caching: bool,
    /// Compute threads (default: all available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Element type of the KV cache.
    #[arg(long, value_enum, default_value_t = KvCacheDtype::F16)]
    kv_cache_dtype: KvCacheDtype,
    /// Seconds that requests in flight get to finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KvCacheDtype {
    F16,
    F32,
}

impl From<KvCacheDtype> for KvDtype {
    fn from(dtype: KvCacheDtype) -> Self {
        match dtype {
            KvCacheDtype::F16 => KvDtype::F16,
            KvCacheDtype::F32 => KvDtype::F32,
        }
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    let path = fetch::resolve_model(args.model.as_deref())?;
    let loaded = LoadedModel::load(&path, LoadOptions::default())
        .with_context(|| format!("loading {}", path.display()))?;
    let kv = KvOptions {
        block_size: args.block_size,
        dtype: args.kv_cache_dtype.into(),
    };
    if kv.block_size == 0 {
        bail!("--block-size must be at least 1");
    }
    let max_model_len = max_model_len(&loaded, &args, kv)?;
    let served = ServedModel {
        name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| default_served_name(&path)),
        root: path.display().to_string(),
        max_model_len,
        vocab_size: loaded.model.config().vocab_size,
    };
    let config = EngineConfig {
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        kv,
        kv_cache_memory: args.kv_cache_memory,
        prefix_caching: !args.no_prefix_caching,
        threads: args.threads,
        max_model_len,
    };
    let LoadedModel {
        model,
        tokenizer,
        chat_template,
        ..
    } = loaded;
    let engine = sched::spawn(model, config).context("starting the engine")?;
    let metrics = install_prometheus_recorder()
        .map_err(|e| tracing::warn!("metrics are disabled: {e}"))
        .ok();
    let state = ServerState::new(engine, tokenizer, chat_template, served, metrics);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let grace = Duration::from_secs(args.shutdown_timeout);
    let result = runtime.block_on(serve_until_signal(&args.host, args.port, state, grace));
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// The request length limit: `--max-model-len`, else the model's context, lowered to
/// what the KV cache holds.
fn max_model_len(loaded: &LoadedModel, args: &ServeArgs, kv: KvOptions) -> Result<usize> {
    let context = loaded.model.config().max_position_embeddings;
    let layout = loaded.model.kv_layout(kv);
    let kv_tokens = (args.kv_cache_memory / layout.bytes_per_block()).max(1) * kv.block_size;
    match args.max_model_len {
        Some(0) => bail!("--max-model-len must be at least 1"),
        Some(asked) if asked > context => {
            bail!("--max-model-len {asked} is longer than the model's context ({context} tokens)")
        }
        Some(asked) => Ok(asked),
        None if kv_tokens < context => {
            tracing::warn!(
                "the KV cache holds {kv_tokens} tokens, fewer than the model's context \
                 ({context}); max_model_len is {kv_tokens} (raise --kv-cache-memory for more)"
            );
            Ok(kv_tokens)
        }
        None => Ok(context),
    }
}

/// The model file's stem (`SmolLM2-135M-Instruct.Q4_1`) or the folder's name.
fn default_served_name(path: &Path) -> String {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

async fn serve_until_signal(
    host: &str,
    port: u16,
    state: ServerState,
    grace: Duration,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| format!("listening on {host}:{port}"))?;
    let address = listener.local_addr()?;
    let model = state_model_name(&state);
    let stop = Arc::new(Notify::new());
    let shutdown = {
        let stop = stop.clone();
        async move { stop.notified().await }
    };
    let server = api::serve(listener, state, shutdown);
    tokio::pin!(server);
    eprintln!("serving {model} on http://{address}");
    tokio::select! {
        result = &mut server => return result.context("serving HTTP"),
        signal = termination_signal() => signal?,
    }
    eprintln!(
        "shutting down: waiting up to {}s for requests in flight",
        grace.as_secs()
    );
    stop.notify_one();
    match tokio::time::timeout(grace, server).await {
        Ok(result) => result.context("serving HTTP"),
        Err(_) => {
            tracing::warn!(
                "requests still in flight after {}s; exiting",
                grace.as_secs()
            );
            Ok(())
        }
    }
}

fn state_model_name(state: &ServerState) -> String {
    state.served_model().name.clone()
}

/// Completes on SIGTERM or SIGINT.
async fn termination_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}

/// A `--kv-cache-memory` value that is not a byte size.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a byte size (examples: 1073741824, 512MiB, 2GiB, 1.5GB)")]
pub struct ByteSizeError(String);

/// Bytes from `1073741824`, `512MiB`, `2GiB`, `1.5GB`, `64k` (K/M/G alone are binary).
fn parse_byte_size(text: &str) -> Result<usize, ByteSizeError> {
    let error = || ByteSizeError(text.to_owned());
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(split);
    let unit: f64 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        _ => return Err(error()),
    };
    let value: f64 = number.parse().map_err(|_| error())?;
    let bytes = (value * unit).round();
    if !bytes.is_finite() || bytes < 1.0 || bytes > usize::MAX as f64 {
        return Err(error());
    }
    Ok(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_take_binary_and_decimal_suffixes() {
        assert_eq!(parse_byte_size("1024").unwrap(), 1024);
        assert_eq!(parse_byte_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_byte_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_byte_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_byte_size("64k").unwrap(), 65536);
        for bad in ["", "GiB", "12XB", "-1", "0", "1.2.3MiB"] {
            assert!(parse_byte_size(bad).is_err(), "{bad}");
        }
    }
}
