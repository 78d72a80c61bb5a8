//! `tandem plan`: measure a profile of this hardware against running endpoints or
//! workers it starts (`profile`), rank layouts for a workload and SLO from it (`rank`),
//! and check it against `tandem compare`'s reports (`validate`). The model is
//! `tandem_planner`'s; the measuring, `tandem_bench::profile`'s; starting the workers,
//! `tandem_experiment::profiling`'s.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tandem_bench::profile::{self, WorkerPlan};
use tandem_experiment::profiling;
use tandem_launch::generate::{Generated, GeneratedWorker};
use tandem_launch::topology::{PlannerSpec, Role as TopologyRole};
use tandem_planner::layout::Role as PlannedRole;
use tandem_planner::{Arrival, Layout, LengthDist, Profile, Slo, Workload};

#[derive(Subcommand)]
pub enum PlanCommand {
    /// Measure one worker size (and the hand-off, given a P/D router) into a profile
    /// file, adding to what it already holds.
    Profile(ProfileArgs),
    /// Rank every layout of the cores for a workload and SLO, from a profile.
    Rank(RankArgs),
    /// Set the profile's predictions beside a `tandem compare` report's measurements,
    /// run by run (same requests, same arrival times).
    Validate(ValidateArgs),
}

#[derive(Args)]
pub struct ValidateArgs {
    #[arg(long)]
    profile: PathBuf,
    /// The report's results.json; repeat it for rounds of the same suite, which are
    /// checked by their median, their range shown beside it.
    #[arg(long, required = true)]
    results: Vec<PathBuf>,
    /// The scenarios' seed, for reports that do not record it (0 unless the suite file
    /// set one).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
pub struct ProfileArgs {
    /// A worker running with --cores threads (`tandem serve`, vLLM, …).
    #[arg(long, required_unless_present = "launch")]
    url: Option<String>,
    /// Start built-in workers here instead, on the first --cores cores this process
    /// may use: each of --worker-cores alone (and a 1P1D pair of the smallest for the
    /// hand-off), then as many of it as the cores hold, measured together.
    #[arg(long, conflicts_with_all = ["url", "alongside", "split_url", "model"])]
    launch: bool,
    /// With --url: its cores (`tandem serve --threads`). With --launch: the cores in
    /// all.
    #[arg(long)]
    cores: usize,
    /// With --launch: the worker sizes (cores each) to measure. Default: 1 and
    /// --cores.
    #[arg(long, value_delimiter = ',', requires = "launch")]
    worker_cores: Vec<usize>,
    /// With --launch: the workers' model file (default: the default model).
    #[arg(long, requires = "launch")]
    model_file: Option<PathBuf>,
    /// With --launch: each worker's KV cache.
    #[arg(long, default_value = "512MiB", requires = "launch")]
    kv_cache_memory: String,
    /// With --launch: where the workers' logs go (default: beside --out, its name
    /// with `-logs`).
    #[arg(long, requires = "launch")]
    log_dir: Option<PathBuf>,
    /// With --url: the served model's name, as /v1/models lists it.
    #[arg(long, required_unless_present = "launch")]
    model: Option<String>,
    /// The worker's --max-num-batched-tokens and --max-num-seqs.
    #[arg(long, default_value_t = 2048)]
    max_batched_tokens: usize,
    #[arg(long, default_value_t = 256)]
    max_sequences: usize,
    /// Prompt lengths timed alone (words, about a token each).
    #[arg(long, value_delimiter = ',', default_value = "32,128,512,1024")]
    prompt_lengths: Vec<usize>,
    /// Decode batch sizes, at each of --contexts prompt lengths.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    batches: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "64,512")]
    contexts: Vec<usize>,
    /// Output tokens per decode stream.
    #[arg(long, default_value_t = 48)]
    decode_tokens: usize,
    /// Steps of several prompts computed together: NxW is N prompts of W words, NxW+D
    /// the same beside D decoding streams. Each must fit --max-batched-tokens (a word
    /// is about a token; a prompt has a few more). None: `--steps ''`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "2x128,8x128,2x256,4x256,2x500,4x500,1x500+32,3x500+32"
    )]
    steps: Vec<StepGroupArg>,
    /// Prompt length (words) of the decode streams beside a step's prompts.
    #[arg(long, default_value_t = 64)]
    step_decode_context: usize,
    /// Runs of each measurement (the median is kept).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// A worker on another of this machine's cores, given the same measurements at the
    /// same time (repeat for each): measures --url with its neighbours busy, as it will
    /// be in a layout that fills the machine. Co-located workers slow each other
    /// (shared caches and memory, SMT siblings): on a 2-vCPU VM a 1-core worker's
    /// decode step took 2× as long with the other core's worker busy.
    #[arg(long = "alongside", value_name = "URL")]
    alongside: Vec<String>,
    /// A P/D router over workers like this one: the hand-off is timed against --url.
    #[arg(long)]
    split_url: Option<String>,
    /// KV bytes one token takes (`tandem kv --model M` prints it; the default is the
    /// default model's at f16).
    #[arg(long, default_value_t = 23040)]
    kv_bytes_per_token: u64,
    /// The profile file (created, or extended with this worker size).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct RankArgs {
    #[arg(long)]
    profile: PathBuf,
    /// Cores to lay the workers out on.
    #[arg(long)]
    cores: usize,
    /// Mean prompt and output lengths (tokens), each drawn uniformly within ±--range.
    #[arg(long)]
    input_len: usize,
    #[arg(long)]
    output_len: usize,
    #[arg(long, default_value_t = 0.0)]
    range: f64,
    /// The workload's request rate (per second).
    #[arg(long)]
    rate: f64,
    /// Requests modelled per run.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// The SLO: time to first token and time per output token (seconds), met by
    /// --attainment of the requests.
    #[arg(long)]
    ttft: f64,
    #[arg(long)]
    tpot: f64,
    #[arg(long, default_value_t = 0.9)]
    attainment: f64,
    /// The model served (refuses a profile for another).
    #[arg(long)]
    model: Option<String>,
    /// Plan for the machine the profile was measured on, not this one.
    #[arg(long)]
    other_hardware: bool,
    /// The seed of the modelled requests' lengths and arrivals.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write each layout's figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Writes the recommended layout as a topology for `tandem up`: built-in workers
    /// pinned to the first cores this process may use, loopback ports.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// With --out and a P/D recommendation: run the online planner with the SLO's
    /// limits (`[router.planner]`).
    #[arg(long, requires = "out")]
    with_planner: bool,
    /// With --out: the KV cache of each worker.
    #[arg(long, default_value = "512MiB", requires = "out")]
    kv_cache_memory: String,
}

/// A `--steps` entry; empty entries are skipped.
#[derive(Clone)]
struct StepGroupArg(Option<profile::StepGroup>);

impl std::str::FromStr for StepGroupArg {
    type Err = profile::ProfileFailure;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim().is_empty() {
            return Ok(Self(None));
        }
        text.trim().parse().map(|group| Self(Some(group)))
    }
}

pub fn run(command: PlanCommand) -> Result<()> {
    match command {
        PlanCommand::Profile(args) => measure(args),
        PlanCommand::Rank(args) => rank(args),
        PlanCommand::Validate(args) => validate(args),
    }
}

fn validate(args: ValidateArgs) -> Result<()> {
    let profile = Profile::from_toml(
        &std::fs::read_to_string(&args.profile)
            .with_context(|| format!("reading {}", args.profile.display()))?,
    )?;
    let reports = args
        .results
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
        })
        .collect::<Result<Vec<serde_json::Value>>>()?;
    let rows = tandem_bench::validate::against_reports(&profile, &reports, args.seed)?;
    if rows.is_empty() {
        bail!("the report has no request-rate runs of tandem serve layouts to check");
    }
    print!("{}", tandem_bench::validate::markdown(&rows));
    print!("{}", tandem_bench::validate::core_notes(&profile, &reports));
    Ok(())
}

static STOP: AtomicBool = AtomicBool::new(false);

fn measure(args: ProfileArgs) -> Result<()> {
    let plan = WorkerPlan {
        cores: args.cores,
        max_batched_tokens: args.max_batched_tokens,
        max_sequences: args.max_sequences,
        prompt_lengths: args.prompt_lengths.clone(),
        batches: args.batches.clone(),
        contexts: args.contexts.clone(),
        decode_tokens: args.decode_tokens,
        steps: args.steps.iter().filter_map(|group| group.0).collect(),
        step_decode_context: args.step_decode_context.max(1),
        repeats: args.repeats.max(1),
    };
    // An existing file is read first: a bad one fails before minutes of measuring, and
    // its KV size per token is the one the hand-off is fitted with.
    let existing = match std::fs::read_to_string(&args.out) {
        Ok(text) => Some(Profile::from_toml(&text)?),
        Err(_) => None,
    };
    let kv_bytes_per_token = existing
        .as_ref()
        .map_or(args.kv_bytes_per_token, |p| p.kv_bytes_per_token);
    let measured = match (&args.url, &args.model) {
        (Some(url), Some(model)) => {
            let worker = profiling::RunningWorker {
                url,
                model,
                alongside: &args.alongside,
                split_url: args.split_url.as_deref(),
            };
            profiling::measure_running(&worker, &plan, kv_bytes_per_token)?
        }
        _ => measure_launched(&args, &plan, kv_bytes_per_token)?,
    };
    for worker in &measured.workers {
        print_steps(worker)?;
    }
    let profile = profiling::into_profile(existing, measured, kv_bytes_per_token)?;
    std::fs::write(&args.out, profile.to_toml())
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("profile written to {}", args.out.display());
    Ok(())
}

/// Every worker size on the first --cores cores, the workers started here.
fn measure_launched(
    args: &ProfileArgs,
    plan: &WorkerPlan,
    kv_bytes_per_token: u64,
) -> Result<profiling::Measured> {
    let cores = tandem_experiment::defaults::given_cores(Some(args.cores))?;
    let sizes = if args.worker_cores.is_empty() {
        vec![1, args.cores]
    } else {
        args.worker_cores.clone()
    };
    let log_dir = args.log_dir.clone().unwrap_or_else(|| {
        let stem = args.out.file_stem().unwrap_or_default().to_string_lossy();
        args.out.with_file_name(format!("{stem}-logs"))
    });
    let machine = profiling::MachineProfile {
        cores,
        sizes,
        kv_cache_memory: &args.kv_cache_memory,
        model: args.model_file.as_deref(),
        start_timeout: Duration::from_secs(180),
        log_dir: &log_dir,
    };
    eprintln!("worker logs: {}", log_dir.display());
    Ok(profiling::measure(
        &machine,
        plan,
        kv_bytes_per_token,
        &STOP,
    )?)
}

/// Each measured step of several prompts beside its fitted cost.
fn print_steps(worker: &tandem_planner::profile::WorkerProfile) -> Result<()> {
    let cost = worker
        .cost()
        .context("the measurements do not make a usable profile")?;
    for step in &worker.steps {
        eprintln!(
            "  {}-core worker{}: step of {} prompts ({} tokens) beside {} decode rows: measured {:.0} ms, fitted {:.0} ms",
            worker.cores,
            if worker.measured_alongside > 0 {
                " alongside"
            } else {
                ""
            },
            step.prompts,
            step.tokens,
            step.decode_batch,
            step.seconds * 1e3,
            cost.step_point_seconds(step) * 1e3
        );
    }
    Ok(())
}

/// The recommended layout as a topology file.
fn write_topology(args: &RankArgs, layout: &Layout, path: &std::path::Path) -> Result<()> {
    let allowed = tandem_launch::run::allowed_cores();
    let cores: Vec<usize> = if allowed.len() >= args.cores {
        allowed[..args.cores].to_vec()
    } else {
        (0..args.cores).collect()
    };
    let mut free = cores.into_iter();
    let mut workers = Vec::new();
    for group in &layout.groups {
        let role = match group.role {
            PlannedRole::Both => TopologyRole::Both,
            PlannedRole::Prefill => TopologyRole::Prefill,
            PlannedRole::Decode => TopologyRole::Decode,
        };
        for _ in 0..group.count {
            let cores: Vec<usize> = free.by_ref().take(group.cores).collect();
            workers.push(GeneratedWorker { role, cores });
        }
    }
    let disaggregated = workers.iter().any(|w| w.role != TopologyRole::Both);
    if args.with_planner && !disaggregated {
        bail!(
            "--with-planner: the recommended layout ({layout}) has no P/D pools to move workers between"
        );
    }
    let planner = args.with_planner.then(|| PlannerSpec {
        ttft: Some(args.ttft),
        tpot: Some(args.tpot),
        ..PlannerSpec::default()
    });
    let comment = format!(
        "{layout}: recommended by tandem plan rank for {} → {} tokens at {} req/s\n(TTFT ≤ {} s, TPOT ≤ {} s for {:.0}% of requests).\n  tandem up {}",
        args.input_len,
        args.output_len,
        args.rate,
        args.ttft,
        args.tpot,
        args.attainment * 100.0,
        path.display()
    );
    let generated = Generated {
        comment: &comment,
        router_port: 8192,
        policy: "least_loaded",
        kv_cache_memory: &args.kv_cache_memory,
        planner,
        workers,
    };
    let (text, _) = generated.write()?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn rank(args: RankArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.profile)
        .with_context(|| format!("reading {}", args.profile.display()))?;
    let profile = Profile::from_toml(&text)?;
    if let Some(model) = &args.model {
        profile.check_matches(model, &profile.hardware)?;
    }
    if !args.other_hardware {
        profile.check_matches(&profile.model, &profile::cpu_description())?;
    }
    if !(args.rate > 0.0 && args.ttft > 0.0 && args.tpot > 0.0) {
        bail!("--rate, --ttft and --tpot must be positive");
    }
    if !(args.attainment > 0.0 && args.attainment <= 1.0) {
        bail!("--attainment is a share of requests, in (0, 1]");
    }
    let lengths = |mean: usize| {
        let spread = (mean as f64 * args.range.clamp(0.0, 1.0)) as usize;
        LengthDist::Uniform {
            min: mean.saturating_sub(spread).max(1),
            max: mean + spread,
        }
    };
    let workload = Workload {
        input: lengths(args.input_len),
        output: lengths(args.output_len),
        arrival: Arrival::Poisson { rate: args.rate },
        requests: args.requests.max(10),
        seed: args.seed,
    };
    let slo = Slo {
        ttft_seconds: args.ttft,
        tpot_seconds: args.tpot,
        attainment: args.attainment,
    };
    let sizes = profile.worker_sizes();
    let layouts = Layout::all_on(args.cores, &sizes);
    if layouts.is_empty() {
        bail!(
            "no layout of the profiled worker sizes ({sizes:?} cores) uses exactly {} cores",
            args.cores
        );
    }
    let ranked = tandem_planner::rank_layouts(&profile, &layouts, &workload, &slo)?;
    print!("{}", tandem_planner::table(&ranked, &slo));
    if let Some(path) = &args.out {
        let best = ranked
            .first()
            .filter(|best| best.goodput > 0.0)
            .context("no layout meets the SLO: no topology written")?;
        write_topology(&args, &best.layout, path)?;
        println!(
            "topology: {} (tandem up {})",
            path.display(),
            path.display()
        );
    }
    if let Some(path) = &args.json {
        let entries: Vec<_> = ranked
            .iter()
            .map(|entry| {
                serde_json::json!({
                    "layout": entry.layout.to_string(),
                    "goodput": entry.goodput,
                    "at_rate": entry.at_rate.summary(),
                    "attainment": entry.at_rate.attainment(&slo),
                })
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&entries)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
