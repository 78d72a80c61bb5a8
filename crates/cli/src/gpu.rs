//! `tandem gpu limits`: the measured ceilings of this machine's GPUs — copy
//! bandwidths and bf16 GEMM FLOP/s — that GPU figures are reported against; `tandem gpu
//! decode-gemms`: what a decode step's products reach at a preset's shapes, through
//! cuBLAS and through the engine's matrix–vector kernels. Both need a binary built
//! with `--features tandem-cli/cuda`.

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum GpuCommand {
    /// Measure device-to-device, host↔device and GPU-to-GPU copy bandwidth and bf16
    /// GEMM FLOP/s, each the best of --repeats after a warm-up.
    Limits(LimitsArgs),
    /// Time a decode step's matrix products at a preset's shapes for several batch
    /// sizes, through cuBLAS and through the matrix–vector kernels (bf16), against the
    /// memory roofline measured in the same run.
    DecodeGemms(DecodeGemmsArgs),
    /// Time the GPU engine itself: decode steps at several batch sizes against the
    /// memory roofline, prefill against the bf16 GEMM rate, and KV hand-off copies
    /// against the copy bandwidth, all measured in the same run.
    Bench(BenchArgs),
}

#[derive(Args)]
pub struct BenchArgs {
    /// A `--load-format dummy` preset (random weights at a model's exact shapes).
    #[arg(long, default_value = "llama-3.1-8b", conflicts_with = "model")]
    preset: String,
    /// A `.gguf` file or Hugging Face folder instead of a preset.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Weight type: auto (bf16 for presets and HF folders, f16 for GGUF), f16, bf16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Layer matrices: none (the weight type) or fp8 (E4M3, one scale per matrix).
    #[arg(long, default_value = "none")]
    quantization: tandem_engine::exec::Quantization,
    /// Concurrent sequences of the decode measurements.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    batches: Vec<usize>,
    /// Context (prompt tokens) of each decoding sequence.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Timed decode steps per batch size.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Prompt lengths of the prefill measurements.
    #[arg(long, value_delimiter = ',', default_value = "2048,8192")]
    prefill: Vec<usize>,
    /// Prompt tokens whose KV the hand-off measurement copies (0: skip).
    #[arg(long, default_value_t = 2048)]
    handoff_tokens: usize,
    /// Prompt tokens (512-token chunks) in one step with the largest decode batch, timed
    /// against the same work as two steps (0: skip).
    #[arg(long, default_value_t = 2048)]
    mixed_prefill: usize,
    /// Launch every step's kernels (no CUDA graphs).
    #[arg(long)]
    enforce_eager: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
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
        GpuCommand::Bench(args) => bench(args),
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

#[cfg(not(feature = "cuda"))]
fn bench(_: BenchArgs) -> Result<()> {
    no_gpu_support()
}

#[cfg(feature = "cuda")]
fn bench(args: BenchArgs) -> Result<()> {
    use std::sync::Arc;
    use tandem_engine::cuda::CudaModel;
    use tandem_engine::cuda::bench::{self, BenchPlan};
    use tandem_engine::exec::{WeightDtype, WeightFormat};
    use tandem_engine::model::dummy::Preset;

    if args.batches.contains(&0) || args.steps == 0 || args.context == 0 {
        anyhow::bail!("--batches, --steps and --context must be positive");
    }
    let dtype: Option<WeightDtype> = match args.dtype.as_str() {
        "auto" => None,
        other => Some(other.parse().map_err(anyhow::Error::msg)?),
    };
    let format = WeightFormat {
        dtype,
        quantization: args.quantization,
    };
    let model = match &args.model {
        Some(path) => CudaModel::load(path, args.device, format)?,
        None => CudaModel::dummy(
            Preset::find(&args.preset)?,
            tandem_engine::loaded::DUMMY_SEED,
            args.device,
            format,
        )?,
    };
    let plan = BenchPlan {
        decode_batches: args.batches.clone(),
        decode_context: args.context,
        decode_steps: args.steps,
        prefill_lengths: args.prefill.clone(),
        handoff_tokens: args.handoff_tokens,
        mixed_prefill_tokens: args.mixed_prefill,
        cuda_graphs: !args.enforce_eager,
    };
    let report = bench::run(Arc::new(model), &plan)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} ({}, quantization {}) on {}: {:.2} GB of weights, {} KiB of KV per token; CUDA graphs {}",
        report.model,
        report.weight_dtype,
        report.quantization,
        report.gpu,
        report.weight_bytes as f64 / 1e9,
        report.kv_bytes_per_token / 1024,
        if report.cuda_graphs { "on" } else { "off" }
    );
    println!(
        "ceilings measured now: device copy {:.0} GB/s ({:.0} GB/s of traffic), bf16 GEMM {:.0} TFLOP/s ({:.0} sustained)",
        report.copy_bytes_per_second / 1e9,
        report.copy_traffic_bytes_per_second / 1e9,
        report.bf16_gemm_flops / 1e12,
        report.bf16_gemm_sustained_flops / 1e12
    );
    println!("decode (context {}):", args.context);
    println!(
        "  batch  step (ms)  tok/s      weights/step of roofline  weights+KV of roofline  greedy on GPU (ms)"
    );
    for d in &report.decode {
        println!(
            "  {:>5}  {:>9.3}  {:>9.0}  {:>24.1}%  {:>21.1}%  {:>18.3}",
            d.batch,
            d.step_seconds * 1e3,
            d.tokens_per_second,
            100.0 * d.weight_roofline_fraction,
            100.0 * d.memory_roofline_fraction,
            d.greedy_step_seconds * 1e3
        );
    }
    if let Some(m) = &report.mixed {
        println!(
            "mixed step: {} decodes + {} prompt tokens ({}-token chunks) {:.3} ms; apart: decodes {:.3} ms + prompts {:.3} ms = {:.3} ms",
            m.decodes,
            m.prefill_tokens,
            m.chunk_tokens,
            m.seconds * 1e3,
            m.decode_seconds * 1e3,
            m.prefill_seconds * 1e3,
            (m.decode_seconds + m.prefill_seconds) * 1e3
        );
    }
    println!("prefill (one sequence):");
    println!("  tokens  seconds   tok/s      TFLOP/s  of GEMM rate  of sustained");
    for p in &report.prefill {
        println!(
            "  {:>6}  {:>7.4}  {:>9.0}  {:>7.0}  {:>11.1}%  {:>11.1}%",
            p.tokens,
            p.seconds,
            p.tokens_per_second,
            p.flops / p.seconds / 1e12,
            100.0 * p.gemm_roofline_fraction,
            100.0 * p.sustained_gemm_fraction
        );
    }
    println!("KV hand-off ({} tokens):", args.handoff_tokens);
    for h in &report.handoff {
        println!(
            "  {:<6}  {:>8.1} MB in {:>7.3} ms = {:>7.1} GB/s, {:.1}% of the device copy",
            h.path,
            h.bytes as f64 / 1e6,
            h.seconds * 1e3,
            h.bytes_per_second / 1e9,
            100.0 * h.copy_fraction
        );
    }
    Ok(())
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
    println!("tokens  products  step (ms)  tok/s      weights GB/s  of copy traffic  vs cuBLAS");
    for p in &result.points {
        let row = |name: &str, t: &decode_gemm::ProductsTiming, ratio: Option<f64>| {
            println!(
                "{:>6}  {:<8}  {:>9.3}  {:>9.0}  {:>12.0}  {:>14.1}%  {}",
                p.tokens,
                name,
                t.step_seconds * 1e3,
                t.tokens_per_second,
                t.weight_bytes_per_second / 1e9,
                100.0 * t.fraction_of_copy_traffic,
                ratio.map_or(String::new(), |r| format!("{r:.2}x"))
            )
        };
        row("cuBLAS", &p.cublas, None);
        if let Some(gemv) = &p.gemv {
            row(
                "GEMV",
                gemv,
                Some(p.cublas.step_seconds / gemv.step_seconds),
            );
        }
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
            "  bf16 GEMM {n}×{n}×{n}  {:.0} TFLOP/s (best single GEMM), {:.0} TFLOP/s sustained for {}s",
            l.bf16_gemm_flops / 1e12,
            l.bf16_gemm_sustained_flops / 1e12,
            limits::SUSTAIN_SECONDS,
            n = l.gemm_size
        );
    }
    Ok(())
}
