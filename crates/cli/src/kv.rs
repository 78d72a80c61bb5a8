//! `tandem kv`: the KV cache arithmetic of a model — bytes per token and per request,
//! how many tokens a memory budget holds, and how long one request's KV takes to move
//! over common links — for a model file (GGUF, a Hugging Face folder or its
//! `config.json`: any architecture with layers, KV heads and a head dimension, Qwen's
//! included) or a preset; with `--measure`, a real hand-off read from a running
//! built-in worker, timed. The arithmetic is `tandem_engine::kv::sizing`'s and the
//! measurement `tandem_engine::transfer::measure`'s; this file reads the flags and prints.

use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tandem_engine::kv::KvDtype;
use tandem_engine::kv::sizing::{KvShape, LINKS};
use tandem_engine::transfer::measure::{
    HandoffMeasurement, HandoffProbe, MeasureError, measure_handoff,
};
use tandem_engine::transfer::probe::ProbeError;
use tandem_engine::transfer::wire::ErrorCode;
use tandem_engine::transfer::{ClusterSecret, auth};

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

pub fn run(args: KvArgs) -> Result<()> {
    let shape = KvShape::of(&args.model)?;
    let dtype = args.kv_dtype.unwrap_or(if args.measure.is_some() {
        KvElement::F16
    } else {
        KvElement::Bf16
    });
    let per_token = shape.bytes_per_token(dtype.bytes())?;
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

/// A measured hand-off, with what the arithmetic expected.
struct Measured {
    measurement: HandoffMeasurement,
    prompt_len: usize,
    block_size: usize,
    /// Bytes the arithmetic gives for the positions the blocks hold.
    expected_bytes: usize,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.measurement.read.bytes as f64 / self.measurement.read.transfer.as_secs_f64().max(1e-9)
    }

    fn to_json(&self) -> Value {
        let r = &self.measurement.read;
        json!({
            "url": self.measurement.url,
            "prompt_len": self.prompt_len,
            "blocks": r.blocks,
            "block_size": self.block_size,
            "block_bytes": r.block_bytes,
            "bytes": r.bytes,
            "expected_bytes": self.expected_bytes,
            "seconds": r.transfer.as_secs_f64(),
            "handshake_seconds": r.handshake.as_secs_f64(),
            "prefill_seconds": self.measurement.prefill.as_secs_f64(),
            "bytes_per_second": self.rate(),
            "gb_per_second": self.rate() / 1e9,
            "released": r.released,
        })
    }

    fn print(&self, per_request: usize) {
        let r = &self.measurement.read;
        println!(
            "
measured against {} ({}-token prompt, prefilled in {:.1} ms):",
            self.measurement.url,
            self.prompt_len,
            self.measurement.prefill.as_secs_f64() * 1e3
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

/// Prefills a prompt on the worker at `url` as a prefill leg and reads its KV back.
fn measure(
    args: &KvArgs,
    url: &str,
    shape: &KvShape,
    dtype: KvElement,
    per_token: usize,
) -> Result<Measured> {
    let model = Path::new(&args.model);
    if !model.exists() {
        bail!(
            "--measure needs the worker's model file or folder (its identity is checked at \
             the hand-off), not the preset `{}`",
            args.model
        );
    }
    let dtype = match dtype {
        KvElement::F16 => KvDtype::F16,
        KvElement::F32 => KvDtype::F32,
        other => bail!(
            "--measure reads a built-in worker's KV, which is f16 or f32 (its \
             --kv-cache-dtype), not {}: pass --kv-dtype f16 or f32",
            other.name()
        ),
    };
    let secret =
        ClusterSecret::from_file_or_env(args.kv_secret_file.as_deref())?.with_context(|| {
            format!(
                "--measure reads KV as a decode worker, which needs the cluster's KV secret: {}",
                auth::HOW_TO_CONFIGURE
            )
        })?;
    let probe = HandoffProbe {
        url,
        model,
        shape,
        dtype,
        block_size: args.block_size,
        secret,
        prompt_len: args.prompt_len,
    };
    let measurement = measure_handoff(&probe).map_err(explain_refusal)?;
    Ok(Measured {
        expected_bytes: per_token * measurement.read.blocks * args.block_size,
        prompt_len: args.prompt_len,
        block_size: args.block_size,
        measurement,
    })
}

/// A failed measurement, with what to change when the worker refused our layout.
fn explain_refusal(err: MeasureError) -> anyhow::Error {
    let hint = match &err {
        MeasureError::Read(ProbeError::Refused {
            code: ErrorCode::Incompatible,
            ..
        }) => {
            "reading the KV blocks (\"here\" is the worker: give the worker's model, \
             --block-size and --kv-dtype)"
        }
        MeasureError::Read(ProbeError::Handshake { .. }) => {
            "reading the KV blocks (give the worker's KV secret: --kv-secret-file or \
             TANDEM_KV_SECRET)"
        }
        MeasureError::Read(_) => "reading the KV blocks",
        _ => "measuring the hand-off",
    };
    anyhow::Error::new(err).context(hint)
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
    fn byte_sizes_read_in_binary_units() {
        assert_eq!(human_bytes(131072.0), "128.0 KiB");
        assert_eq!(human_bytes(512.0), "512.0 B");
        assert_eq!(human_bytes(1.5 * 1024.0 * 1024.0 * 1024.0), "1.5 GiB");
    }
}
