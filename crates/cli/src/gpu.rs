//! `tandem gpu limits`: the measured ceilings of this machine's GPUs — copy
//! bandwidths and bf16 GEMM FLOP/s — that GPU figures are reported against; `tandem gpu
//! decode-gemms`: what cuBLAS alone reaches on a decode step's products at a preset's
//! shapes. Both need a binary built with `--features tandem-cli/cuda`.

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum GpuCommand {
    /// Measure device-to-device, host↔device and GPU-to-GPU copy bandwidth and bf16
    /// GEMM FLOP/s, each the best of --repeats after a warm-up.
    Limits(LimitsArgs),
    /// Time a decode step's matrix products (cuBLAS, bf16) at a preset's shapes for
    /// several batch sizes, against the memory roofline measured in the same run.
    DecodeGemms(DecodeGemmsArgs),
}

#[derive(Args)]
pub struct DecodeGemmsArgs {
    /// A preset of `--load-format dummy` (llama-3.1-8b, llama-3.2-1b, …).
    #[arg(long, default_value = "llama-3.1-8b")]
    preset: String,
    /// Batch sizes (tokens per step).
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    tokens: Vec<usize>,
    #[arg(long, default_value_t = 0)]
    device: usize,
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct LimitsArgs {
    /// The GPU to measure (default: every GPU).
    #[arg(long)]
    device: Option<usize>,
    /// Bytes per copy.
    #[arg(long, default_value = "1GiB", value_parser = crate::serve::parse_byte_size)]
    copy_bytes: usize,
    /// M = N = K of the bf16 GEMM.
    #[arg(long, default_value_t = 8192)]
    gemm_size: usize,
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(command: GpuCommand) -> Result<()> {
    match command {
        GpuCommand::Limits(args) => limits(args),
        GpuCommand::DecodeGemms(args) => decode_gemms(args),
    }
}

#[cfg(not(feature = "cuda"))]
fn no_gpu_support() -> Result<()> {
    anyhow::bail!(
        "this tandem was built without GPU support: build it with \
         `cargo build --release --features tandem-cli/cuda` (see docs/gpu.md)"
    )
}

#[cfg(not(feature = "cuda"))]
fn limits(_: LimitsArgs) -> Result<()> {
    no_gpu_support()
}

#[cfg(not(feature = "cuda"))]
fn decode_gemms(_: DecodeGemmsArgs) -> Result<()> {
    no_gpu_support()
}

#[cfg(feature = "cuda")]
fn decode_gemms(args: DecodeGemmsArgs) -> Result<()> {
    use tandem_engine::cuda::decode_gemm;
    use tandem_engine::model::dummy::Preset;

    if args.tokens.contains(&0) {
        anyhow::bail!("--tokens must be positive");
    }
    let config = Preset::find(&args.preset)?.config();
    let result = decode_gemm::measure(args.device, &config, &args.tokens, args.repeats)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    println!(
        "{}: {:.2} GB of bf16 weights; device copy traffic {:.0} GB/s",
        result.model,
        result.weight_bytes as f64 / 1e9,
        result.copy_traffic_bytes_per_second / 1e9
    );
    println!("tokens  step (ms)  tok/s      weights GB/s  of copy traffic");
    for p in &result.points {
        println!(
            "{:>6}  {:>9.3}  {:>9.0}  {:>12.0}  {:>14.1}%",
            p.tokens,
            p.step_seconds * 1e3,
            p.tokens_per_second,
            p.weight_bytes_per_second / 1e9,
            100.0 * p.fraction_of_copy_traffic
        );
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn limits(args: LimitsArgs) -> Result<()> {
    use tandem_engine::cuda::limits::{self, Probe};

    let devices: Vec<usize> = match args.device {
        Some(device) => vec![device],
        None => (0..limits::device_count()?).collect(),
    };
    let measured = devices
        .into_iter()
        .map(|ordinal| {
            limits::measure(&Probe {
                ordinal,
                copy_bytes: args.copy_bytes,
                gemm_size: args.gemm_size,
                repeats: args.repeats,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&measured)?);
        return Ok(());
    }
    let gb = |bytes_per_second: f64| format!("{:.1} GB/s", bytes_per_second / 1e9);
    for l in &measured {
        println!(
            "GPU {}: {} (sm_{}{}), {:.1} GiB",
            l.ordinal,
            l.name,
            l.compute_capability.0,
            l.compute_capability.1,
            l.memory_bytes as f64 / (1u64 << 30) as f64
        );
        println!(
            "  device→device copy    {} ({} of memory traffic, read + write)",
            gb(l.dtod_bytes_per_second),
            gb(2.0 * l.dtod_bytes_per_second)
        );
        println!("  host→device (pinned)  {}", gb(l.htod_bytes_per_second));
        println!("  device→host (pinned)  {}", gb(l.dtoh_bytes_per_second));
        if let Some(peer) = &l.peer {
            println!(
                "  GPU {} → GPU {}        {} (peer access: {})",
                l.ordinal,
                peer.to,
                gb(peer.bytes_per_second),
                if peer.peer_access { "yes" } else { "no" }
            );
        }
        println!(
            "  bf16 GEMM {n}×{n}×{n}  {:.0} TFLOP/s",
            l.bf16_gemm_flops / 1e12,
            n = l.gemm_size
        );
    }
    Ok(())
}
