//! `tandem kv`: the KV cache arithmetic of a model — bytes per token and per request,
//! how many tokens a memory budget holds, and how long one request's KV takes to move
//! over common links — for a model file (GGUF or a Hugging Face folder) or a preset.

use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::json;
use tandem_engine::model::ModelConfig;

#[derive(Args)]
pub struct KvArgs {
    /// A `.gguf` file, a Hugging Face folder, or a preset: llama-3.1-8b, llama-3.1-70b,
    /// qwen3-0.6b, smollm2-135m.
    model: String,
    /// Prompt (plus output) tokens of one request.
    #[arg(long, default_value_t = 2048)]
    prompt_len: usize,
    /// Memory budget for the KV cache: bytes, or with a suffix (KiB, MiB, GiB, KB, MB, GB).
    #[arg(long, value_parser = crate::serve::parse_byte_size)]
    memory: Option<usize>,
    /// Element type of the KV cache.
    #[arg(long, value_enum, default_value_t = KvElement::Bf16)]
    kv_dtype: KvElement,
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
}

/// (preset, layers, KV heads, head dim), from the models' published configs.
const PRESETS: &[(&str, usize, usize, usize)] = &[
    ("llama-3.1-8b", 32, 8, 128),
    ("llama-3.1-70b", 80, 8, 128),
    ("qwen3-0.6b", 28, 8, 128),
    ("smollm2-135m", 30, 3, 64),
];

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
    if let Some(&(name, layers, kv_heads, head_dim)) =
        PRESETS.iter().find(|(name, ..)| *name == model)
    {
        return Ok(Shape {
            name: name.into(),
            layers,
            kv_heads,
            head_dim,
        });
    }
    let path = Path::new(model);
    if !path.exists() {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
        bail!(
            "`{model}` is neither a model file or folder nor a preset ({})",
            names.join(", ")
        );
    }
    let config = ModelConfig::read(path).with_context(|| format!("reading {model}"))?;
    Ok(Shape {
        name: config.name.clone(),
        layers: config.num_layers,
        kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
    })
}

pub fn run(args: KvArgs) -> Result<()> {
    let shape = shape(&args.model)?;
    let per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * args.kv_dtype.bytes();
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
            "kv_dtype": args.kv_dtype.name(),
            "bytes_per_token": per_token,
            "prompt_len": args.prompt_len,
            "bytes_per_request": per_request,
            "memory_bytes": args.memory,
            "tokens_in_memory": fits,
            "requests_in_memory": fits.map(|t| t / args.prompt_len.max(1)),
            "transfers": transfers.iter().map(|(link, bandwidth, seconds)| json!({
                "link": link, "bytes_per_second": bandwidth, "seconds": seconds
            })).collect::<Vec<_>>(),
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
        args.kv_dtype.name()
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
    Ok(())
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
    fn unknown_models_are_named_in_the_error() {
        let err = shape("llama-9").err().unwrap().to_string();
        assert!(
            err.contains("llama-9") && err.contains("qwen3-0.6b"),
            "{err}"
        );
    }
}
