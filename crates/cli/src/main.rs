//! The `tandem` command: parses arguments and hands each subcommand to the crate that
//! does the work.

mod announce;
mod bench;
mod compare;
mod doctor;
mod generate;
mod gpu;
mod kv;
mod model;
mod plan;
mod register;
mod route;
mod serve;
mod up;

use clap::{Parser, Subcommand};

/// The router allocates a little on every request; mimalloc makes that measurably
/// cheaper than glibc's malloc (docs/benchmarks.md, router overhead).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Disaggregated LLM serving: a router, a built-in engine, and the benchmarks that tell
/// whether splitting prefill and decode pays off.
#[derive(Parser)]
#[command(name = "tandem", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text for one prompt with the built-in engine (no server).
    Generate(generate::GenerateArgs),
    /// Serve the built-in engine over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Start a whole topology (workers and router) from a file, or the embedded default.
    Up(up::UpArgs),
    /// Route OpenAI requests to workers: replicated, or disaggregated (prefill/decode).
    Route(Box<route::RouteArgs>),
    /// Keep a worker that does not speak etcd (vLLM, …) registered for discovery while
    /// its /health answers.
    Register(register::RegisterArgs),
    /// Load an OpenAI-compatible endpoint and report vllm bench serve's metrics.
    Bench(bench::BenchArgs),
    /// Run the same scenarios against single, replicated and disaggregated topologies
    /// on the same resources, and write a report with tables and plots.
    Compare(compare::CompareArgs),
    /// Plan the layout: profile this hardware, then rank single, replicas and xPyD
    /// layouts for a workload and SLO (docs/planner.md).
    #[command(subcommand)]
    Plan(plan::PlanCommand),
    /// Check that a topology (or the embedded default) can start, with a fix for each failure.
    Doctor(doctor::DoctorArgs),
    /// KV cache arithmetic: bytes per token and request, capacity, transfer times.
    Kv(kv::KvArgs),
    /// GPUs: their measured ceilings (a build with `--features cuda`).
    #[command(subcommand)]
    Gpu(gpu::GpuCommand),
    /// Manage models: fetch the default model, show where it lives.
    #[command(subcommand)]
    Model(model::ModelCommand),
}

/// The log target of the CPU kernel family line, shown at the default log level.
const CPU_KERNELS_LOG: &str = "tandem::cpu_kernels";

/// Decides the engine's CPU kernel family (`TANDEM_CPU_KERNELS`, else the best this CPU
/// has) and logs it once. `serve` and `generate` call it before loading a model, so a
/// bad override fails before any work, naming what this CPU supports.
fn select_cpu_kernels() -> anyhow::Result<()> {
    let family = tandem_engine::kernels::dispatch::selected()?;
    tracing::info!(target: CPU_KERNELS_LOG, "CPU kernels: {}", family.describe());
    Ok(())
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: not in log files or `tandem up`'s prefixed lines.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
                // The planner's verdicts (logged only when they change) are the
                // record of why the layout changed: shown by default.
                // So is the engine's CPU kernel family (one line at start).
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(format!(
                        "warn,tandem_router::rebalance=info,{CPU_KERNELS_LOG}=info"
                    ))
                }),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Model(command) => model::run(command),
        Command::Gpu(command) => gpu::run(command),
        Command::Serve(args) => serve::run(args),
        Command::Route(args) => route::run(*args),
        Command::Register(args) => register::run(args),
        Command::Up(args) => up::run(args),
        Command::Kv(args) => kv::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Plan(command) => plan::run(command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
