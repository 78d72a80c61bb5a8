//! `tandem kv`: the KV cache arithmetic of a model — bytes per token and per request,
//! how many tokens a memory budget holds, and how long one request's KV takes to move
//! over common links — for a model file (GGUF, a Hugging Face folder or its
//! `config.json`: any architecture with layers, KV heads and a head dimension, Qwen's
//! included) or a preset; with `--measure`, a real hand-off read from a running
//! built-in worker, timed.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tandem_engine::kv::{KvDtype, KvLayout};
use tandem_engine::model::ModelConfig;
use tandem_engine::transfer::probe::{self, ProbeError, ProbeRead, ProbeReport};
use tandem_engine::transfer::wire::{self, ErrorCode};
use tandem_engine::transfer::{
    ClusterSecret, Fingerprint, Limits, RemotePrefill, auth, model_identity,
};
use tandem_protocol::pd::KvTransferParams;

#[derive(Args)]
pub struct KvArgs {
    /// A `.gguf` file, a Hugging Face folder or its `config.json`, or a preset:
    /// llama-3.1-8b, llama-3.1-70b, llama-3.2-1b, qwen3-0.6b, smollm2-135m.
    model: String,
    /// Prompt (plus output) tokens of one request.
    #[arg(long, default_value_t = 2048)]
    prompt_len: usize,
    /// Memory budget for the KV cache: bytes, or with a suffix (KiB, MiB, GiB, KB, MB, GB).
    #[arg(long, value_parser = crate::serve::parse_byte_size)]
    memory: Option<usize>,
    /// Element type of the KV cache [default: bf16; with --measure: f16, the built-in
    /// engine's default].
    #[arg(long, value_enum)]
    kv_dtype: Option<KvElement>,
    /// Measure a real KV hand-off: the HTTP base URL (`http://HOST:PORT` or
    /// `HOST:PORT`) of a running built-in worker started with `--kv-port`, serving this
    /// model. It prefills a `--prompt-len`-token prompt there as a prefill leg
    /// (`do_remote_decode`), reads all of its KV blocks over the hand-off port, timed,
    /// and releases them.
    #[arg(long, value_name = "URL")]
    measure: Option<String>,
    /// With --measure: the worker's `--block-size`.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// With --measure: a file holding the cluster's KV secret (the worker's
    /// `--kv-secret-file`); without it, the TANDEM_KV_SECRET environment variable.
    #[arg(long, value_name = "PATH")]
    kv_secret_file: Option<std::path::PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KvElement {
    F32,
    F16,
    Bf16,
    Fp8,
}

impl KvElement {
    fn bytes(self) -> usize {
        match self {
            KvElement::F32 => 4,
            KvElement::F16 | KvElement::Bf16 => 2,
            KvElement::Fp8 => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            KvElement::F32 => "f32",
            KvElement::F16 => "f16",
            KvElement::Bf16 => "bf16",
            KvElement::Fp8 => "fp8",
        }
    }
}

/// The KV-relevant shape of a model.
struct Shape {
    name: String,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Known for model files, not for presets.
    vocab_size: Option<usize>,
}

/// Presets beyond the engine's (`model::dummy::PRESETS`, the shapes `--load-format
/// dummy` serves): (name, layers, KV heads, head dim), from published configs.
const KV_ONLY_PRESETS: &[(&str, usize, usize, usize)] = &[("qwen3-0.6b", 28, 8, 128)];

fn preset_names() -> Vec<&'static str> {
    let engine = tandem_engine::model::dummy::PRESETS.iter().map(|p| p.name);
    engine.chain(KV_ONLY_PRESETS.iter().map(|p| p.0)).collect()
}

/// Nominal one-way bandwidths, bytes per second (line rates: real transfers are slower).
const LINKS: &[(&str, f64)] = &[
    ("TCP, 10 GbE", 1.25e9),
    ("TCP, 25 GbE", 3.125e9),
    ("TCP, 100 GbE", 12.5e9),
    ("RoCE, 100 Gb/s", 12.5e9),
    ("RoCE, 200 Gb/s", 25e9),
    ("RoCE, 400 Gb/s", 50e9),
    ("PCIe 5.0 x16", 64e9),
    ("NVLink 4 (H100, per direction)", 450e9),
];

fn shape(model: &str) -> Result<Shape> {
    if let Ok(preset) = tandem_engine::model::dummy::Preset::find(model) {
        let config = preset.config();
        return Ok(Shape {
            name: preset.name.into(),
            layers: config.num_layers,
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            vocab_size: None,
        });
    }
    if let Some(&(name, layers, kv_heads, head_dim)) =
        KV_ONLY_PRESETS.iter().find(|(name, ..)| *name == model)
    {
        return Ok(Shape {
            name: name.into(),
            layers,
            kv_heads,
            head_dim,
            vocab_size: None,
        });
    }
    let path = Path::new(model);
    if !path.exists() {
        bail!(
            "`{model}` is neither a model file or folder nor a preset ({})",
            preset_names().join(", ")
        );
    }
    if let Some(config) = hf_config_file(path) {
        return shape_of_hf_config(&config);
    }
    let config = ModelConfig::read(path).with_context(|| format!("reading {model}"))?;
    Ok(Shape {
        name: config.name.clone(),
        layers: config.num_layers,
        kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
        vocab_size: Some(config.vocab_size),
    })
}

/// The Hugging Face `config.json` that `path` is, or holds (a folder).
fn hf_config_file(path: &Path) -> Option<std::path::PathBuf> {
    if path.is_dir() {
        return Some(path.join("config.json"));
    }
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    is_json.then(|| path.to_owned())
}

/// The folder of a model given as a folder or as its `config.json`.
fn model_folder(path: &Path) -> &Path {
    if path.is_dir() {
        path
    } else {
        path.parent().unwrap_or(Path::new("."))
    }
}

/// The KV shape from a Hugging Face `config.json`, of any architecture: layers
/// (`num_hidden_layers`), KV heads (`num_key_value_heads`, else `num_attention_heads`:
/// no grouping) and head dim (`head_dim`, else `hidden_size / num_attention_heads`),
/// from the top level or from `text_config` (multimodal models).
fn shape_of_hf_config(file: &Path) -> Result<Shape> {
    let text = std::fs::read_to_string(file).with_context(|| match file.file_name() {
        Some(name) if name == "config.json" && !file.exists() => format!(
            "reading {}: a Hugging Face model folder holds its config.json",
            file.display()
        ),
        _ => format!("reading {}", file.display()),
    })?;
    let json: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    let config = if json.get("num_hidden_layers").is_none() {
        json.get("text_config").unwrap_or(&json)
    } else {
        &json
    };
    let field = |key: &str| -> Result<Option<usize>> {
        match config.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value
                .as_u64()
                .map(|v| Some(v as usize))
                .with_context(|| format!("{}: `{key}` is {value}, not a count", file.display())),
        }
    };
    let required = |key: &str| -> Result<usize> {
        field(key)?.with_context(|| format!("{}: no `{key}`", file.display()))
    };
    let layers = required("num_hidden_layers")?;
    let heads = field("num_attention_heads")?;
    let kv_heads = match field("num_key_value_heads")? {
        Some(n) => n,
        None => heads.with_context(|| {
            format!(
                "{}: neither `num_key_value_heads` nor `num_attention_heads`",
                file.display()
            )
        })?,
    };
    let head_dim = match field("head_dim")? {
        Some(d) => d,
        None => {
            let hidden = required("hidden_size")?;
            match heads {
                Some(h) if h > 0 => hidden / h,
                _ => bail!(
                    "{}: no `head_dim`, and no `num_attention_heads` to derive it",
                    file.display()
                ),
            }
        }
    };
    for (key, value) in [
        ("num_hidden_layers", layers),
        ("num_key_value_heads", kv_heads),
        ("head_dim", head_dim),
    ] {
        if value == 0 {
            bail!(
                "{}: `{key}` is 0, so the KV cache would take 0 bytes per token",
                file.display()
            );
        }
    }
    let folder = model_folder(file);
    let name = folder
        .canonicalize()
        .ok()
        .as_deref()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    Ok(Shape {
        name,
        layers,
        kv_heads,
        head_dim,
        vocab_size: field("vocab_size")?,
    })
}

pub fn run(args: KvArgs) -> Result<()> {
    let shape = shape(&args.model)?;
    let dtype = args.kv_dtype.unwrap_or(if args.measure.is_some() {
        KvElement::F16
    } else {
        KvElement::Bf16
    });
    let per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype.bytes();
    if per_token == 0 {
        bail!(
            "{}: {} layers × {} KV heads × head dim {} is 0 bytes per token",
            shape.name,
            shape.layers,
            shape.kv_heads,
            shape.head_dim
        );
    }
    let measured = match &args.measure {
        Some(url) => Some(measure(&args, url, &shape, dtype, per_token)?),
        None => None,
    };
    let per_request = per_token * args.prompt_len;
    let fits = args.memory.map(|memory| memory / per_token);
    let transfers: Vec<(&str, f64, f64)> = LINKS
        .iter()
        .map(|&(link, bandwidth)| (link, bandwidth, per_request as f64 / bandwidth))
        .collect();
    if args.json {
        let report = json!({
            "model": shape.name,
            "layers": shape.layers,
            "kv_heads": shape.kv_heads,
            "head_dim": shape.head_dim,
            "kv_dtype": dtype.name(),
            "bytes_per_token": per_token,
            "prompt_len": args.prompt_len,
            "bytes_per_request": per_request,
            "memory_bytes": args.memory,
            "tokens_in_memory": fits,
            "requests_in_memory": fits.map(|t| t / args.prompt_len.max(1)),
            "transfers": transfers.iter().map(|(link, bandwidth, seconds)| json!({
                "link": link, "bytes_per_second": bandwidth, "seconds": seconds
            })).collect::<Vec<_>>(),
            "measured": measured.as_ref().map(Measured::to_json),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{}: {} layers × {} KV heads × head dim {}, {}",
        shape.name,
        shape.layers,
        shape.kv_heads,
        shape.head_dim,
        dtype.name()
    );
    println!("KV per token:      {}", human_bytes(per_token as f64));
    println!(
        "KV per request:    {} ({} tokens)",
        human_bytes(per_request as f64),
        args.prompt_len
    );
    if let (Some(memory), Some(tokens)) = (args.memory, fits) {
        println!(
            "in {}:  {tokens} tokens = {} requests of {} tokens",
            human_bytes(memory as f64),
            tokens / args.prompt_len.max(1),
            args.prompt_len
        );
    }
    println!("\none request's KV over (nominal one-way bandwidth; a lower bound on time):");
    for (link, bandwidth, seconds) in transfers {
        println!(
            "  {link:<32} {:>8.2} GB/s  {:>10.3} ms",
            bandwidth / 1e9,
            seconds * 1e3
        );
    }
    if let Some(measured) = &measured {
        measured.print(per_request);
    }
    Ok(())
}

/// A measured hand-off read.
struct Measured {
    url: String,
    prompt_len: usize,
    block_size: usize,
    /// Bytes the arithmetic gives for the positions the blocks hold.
    expected_bytes: usize,
    prefill: Duration,
    report: ProbeReport,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.report.bytes as f64 / self.report.transfer.as_secs_f64().max(1e-9)
    }

    fn to_json(&self) -> Value {
        let r = &self.report;
        json!({
            "url": self.url,
            "prompt_len": self.prompt_len,
            "blocks": r.blocks,
            "block_size": self.block_size,
            "block_bytes": r.block_bytes,
            "bytes": r.bytes,
            "expected_bytes": self.expected_bytes,
            "seconds": r.transfer.as_secs_f64(),
            "handshake_seconds": r.handshake.as_secs_f64(),
            "prefill_seconds": self.prefill.as_secs_f64(),
            "bytes_per_second": self.rate(),
            "gb_per_second": self.rate() / 1e9,
            "released": r.released,
        })
    }

    fn print(&self, per_request: usize) {
        let r = &self.report;
        println!(
            "
measured against {} ({}-token prompt, prefilled in {:.1} ms):",
            self.url,
            self.prompt_len,
            self.prefill.as_secs_f64() * 1e3
        );
        println!(
            "  read {} blocks × {} = {} in {:.3} ms: {:.2} GB/s (handshake {:.3} ms)",
            r.blocks,
            human_bytes(r.block_bytes as f64),
            human_bytes(r.bytes as f64),
            r.transfer.as_secs_f64() * 1e3,
            self.rate() / 1e9,
            r.handshake.as_secs_f64() * 1e3
        );
        let verdict = if r.bytes == self.expected_bytes {
            "equal"
        } else {
            "DIFFERENT"
        };
        println!(
            "  computed for those {} positions: {} ({verdict}); for the request: {}, {:.3} ms at this rate",
            r.blocks * self.block_size,
            human_bytes(self.expected_bytes as f64),
            human_bytes(per_request as f64),
            per_request as f64 / self.rate() * 1e3
        );
        if !r.released {
            println!("  the worker did not acknowledge the release: its lease will expire");
        }
    }
}

/// Limit of the prefill leg's HTTP request.
const PREFILL_TIMEOUT: Duration = Duration::from_secs(300);

/// Prefills a prompt on the worker at `url` as a prefill leg and reads its KV back.
fn measure(
    args: &KvArgs,
    url: &str,
    shape: &Shape,
    dtype: KvElement,
    per_token: usize,
) -> Result<Measured> {
    let path = Path::new(&args.model);
    if !path.exists() {
        bail!(
            "--measure needs the worker's model file or folder (its identity is checked at \
             the hand-off), not the preset `{}`",
            args.model
        );
    }
    let Some(vocab_size) = shape.vocab_size else {
        bail!(
            "--measure needs the model's vocab_size (its prompt is token ids), which {} \
             does not give",
            args.model
        );
    };
    // A config.json stands for its folder, which the worker loaded.
    let path = match hf_config_file(path) {
        Some(_) => model_folder(path),
        None => path,
    };
    let fingerprint = fingerprint(path, shape, dtype, args.block_size)?;
    let secret =
        ClusterSecret::from_file_or_env(args.kv_secret_file.as_deref())?.with_context(|| {
            format!(
                "--measure reads KV as a decode worker, which needs the cluster's KV secret: {}",
                auth::HOW_TO_CONFIGURE
            )
        })?;
    if args.prompt_len == 0 {
        bail!("--prompt-len must be at least 1 for --measure");
    }
    let url = base_url(url);
    // A fresh prompt each run: the worker's prefix cache does not shorten the prefill.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let tokens = prompt_tokens(args.prompt_len, vocab_size, seed);
    let started = Instant::now();
    let params = prefill_leg(&url, &tokens)?;
    let prefill = started.elapsed();
    let (source, num_tokens) = remote_source(&params, tokens.len())?;
    let read = ProbeRead {
        source,
        fingerprint,
        secret,
        num_tokens,
        tokens_digest: wire::tokens_digest(&tokens[..num_tokens]),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime
        .block_on(probe::measure_read(&read, Limits::default()))
        .map_err(explain_refusal)?;
    Ok(Measured {
        url,
        prompt_len: args.prompt_len,
        block_size: args.block_size,
        expected_bytes: per_token * report.blocks * args.block_size,
        prefill,
        report,
    })
}

/// A read error, with what to change when the worker refused our layout.
fn explain_refusal(err: ProbeError) -> anyhow::Error {
    let hint = match &err {
        ProbeError::Refused {
            code: ErrorCode::Incompatible,
            ..
        } => {
            "reading the KV blocks (\"here\" is the worker: give the worker's model, \
             --block-size and --kv-dtype)"
        }
        ProbeError::Handshake { .. } => {
            "reading the KV blocks (give the worker's KV secret: --kv-secret-file or \
             TANDEM_KV_SECRET)"
        }
        _ => "reading the KV blocks",
    };
    anyhow::Error::new(err).context(hint)
}

/// What the worker's hand-off checks: the model's identity and the KV layout.
fn fingerprint(
    path: &Path,
    shape: &Shape,
    dtype: KvElement,
    block_size: usize,
) -> Result<Fingerprint> {
    let dtype = match dtype {
        KvElement::F16 => KvDtype::F16,
        KvElement::F32 => KvDtype::F32,
        other => bail!(
            "--measure reads a built-in worker's KV, which is f16 or f32 (its \
             --kv-cache-dtype), not {}: pass --kv-dtype f16 or f32",
            other.name()
        ),
    };
    if block_size == 0 {
        bail!("--block-size must be at least 1");
    }
    let identity = model_identity(path)
        .with_context(|| format!("reading {} for its identity", path.display()))?;
    let layout = KvLayout {
        num_layers: shape.layers,
        num_kv_heads: shape.kv_heads,
        head_dim: shape.head_dim,
        block_size,
        dtype,
    };
    Ok(Fingerprint::new(identity, layout))
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
    let range = vocab_size.clamp(1, u32::MAX as usize) as u64;
    let mut state: u64 = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % range) as u32
        })
        .collect()
}

/// Sends the prefill leg (one token, non-streaming, `do_remote_decode`); the answer's
/// `kv_transfer_params`.
fn prefill_leg(url: &str, tokens: &[u32]) -> Result<KvTransferParams> {
    let body = json!({
        "prompt": tokens,
        "max_tokens": 1,
        "temperature": 0,
        "stream": false,
        "kv_transfer_params": KvTransferParams::prefill_request(),
    });
    let agent = tandem_launch::run::http_agent(PREFILL_TIMEOUT);
    let endpoint = format!("{url}/v1/completions");
    let mut response = agent
        .post(&endpoint)
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .with_context(|| format!("sending the prefill leg to {endpoint}"))?;
    let status = response.status();
    let text = response.body_mut().read_to_string()?;
    if !status.is_success() {
        bail!("{endpoint} answered {status}: {text}");
    }
    let answer: Value =
        serde_json::from_str(&text).with_context(|| format!("{endpoint} answered {text}"))?;
    match &answer["kv_transfer_params"] {
        Value::Null => bail!(
            "{url} answered the prefill leg without kv_transfer_params: it has no KV \
             hand-off listener (start it with `tandem serve --kv-port PORT`)"
        ),
        params => serde_json::from_value(params.clone())
            .with_context(|| format!("unusable kv_transfer_params from {url}: {params}")),
    }
}

/// Where the blocks are, and how many prompt tokens they hold.
fn remote_source(params: &KvTransferParams, prompt_len: usize) -> Result<(RemotePrefill, usize)> {
    let source = RemotePrefill::from_params(params)
        .context("the worker's kv_transfer_params do not name readable blocks")?;
    let num_tokens = params.remote_num_tokens.map_or(prompt_len, |n| n as usize);
    if num_tokens > prompt_len {
        bail!("the worker holds {num_tokens} tokens of a {prompt_len}-token prompt");
    }
    Ok((source, num_tokens))
}

fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_3_1_8b_in_bf16_is_128_kib_per_token() {
        let s = shape("llama-3.1-8b").unwrap();
        assert_eq!(
            2 * s.layers * s.kv_heads * s.head_dim * KvElement::Bf16.bytes(),
            128 << 10
        );
        assert_eq!(human_bytes(131072.0), "128.0 KiB");
    }

    #[test]
    fn measure_urls_and_prompts() {
        assert_eq!(base_url("10.0.0.5:8100"), "http://10.0.0.5:8100");
        assert_eq!(base_url("http://h:1/"), "http://h:1");
        let tokens = prompt_tokens(512, 100, 7);
        assert_eq!(tokens.len(), 512);
        assert!(tokens.iter().all(|&t| t < 100));
        assert!(tokens.windows(2).any(|w| w[0] != w[1]));
        assert_eq!(tokens, prompt_tokens(512, 100, 7));
        assert_ne!(tokens, prompt_tokens(512, 100, 8));
    }

    fn shape_of(config: &str) -> Result<Shape> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.json");
        std::fs::write(&file, config).unwrap();
        shape_of_hf_config(&file)
    }

    #[test]
    fn configs_of_any_architecture_give_their_kv_shape() {
        // Qwen3-0.6B: head_dim 128 given (not hidden_size / heads = 64).
        let qwen = shape_of(
            r#"{"architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024,
                "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                "num_hidden_layers": 28, "vocab_size": 151936}"#,
        )
        .unwrap();
        assert_eq!((qwen.layers, qwen.kv_heads, qwen.head_dim), (28, 8, 128));
        assert_eq!(qwen.vocab_size, Some(151_936));
        // No KV heads or head_dim: one KV head per head, hidden_size / heads.
        let mha =
            shape_of(r#"{"hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12}"#)
                .unwrap();
        assert_eq!((mha.kv_heads, mha.head_dim, mha.vocab_size), (12, 64, None));
        // A multimodal config keeps the language model's in text_config.
        let nested = shape_of(
            r#"{"text_config": {"num_hidden_layers": 4, "num_key_value_heads": 2,
                "head_dim": 32}}"#,
        )
        .unwrap();
        assert_eq!(
            (nested.layers, nested.kv_heads, nested.head_dim),
            (4, 2, 32)
        );
    }

    #[test]
    fn configs_without_a_kv_size_are_refused() {
        let zero =
            shape_of(r#"{"num_hidden_layers": 2, "num_key_value_heads": 0, "head_dim": 64}"#);
        let err = zero.err().unwrap().to_string();
        assert!(err.contains("`num_key_value_heads` is 0"), "{err}");
        let missing = shape_of(r#"{"num_attention_heads": 2}"#).err().unwrap();
        assert!(missing.to_string().contains("no `num_hidden_layers`"));
        let wrong = shape_of(r#"{"num_hidden_layers": "many"}"#).err().unwrap();
        assert!(wrong.to_string().contains("not a count"), "{wrong}");
    }

    #[test]
    fn unknown_models_are_named_in_the_error() {
        let err = shape("llama-9").err().unwrap().to_string();
        assert!(
            err.contains("llama-9") && err.contains("qwen3-0.6b"),
            "{err}"
        );
    }
}
