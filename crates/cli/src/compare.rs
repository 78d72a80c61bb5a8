//! `tandem compare`: its arguments, the topologies and scenarios they name (by default
//! a single built-in worker, two replicas and one prefill + one decode worker, all on
//! the same cores in total and the same KV budget per worker), handed to
//! [`tandem_experiment::compare`], which runs them and writes the report.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use tandem_bench::suite::{Scenario, Suite};
use tandem_experiment::Options;
use tandem_experiment::defaults::{DefaultTopologies, given_cores};
use tandem_launch::plan;
use tandem_launch::topology::{self, Checked};

#[derive(Args)]
pub struct CompareArgs {
    /// A topology to compare, as NAME=FILE (repeatable; the first is the baseline).
    /// Default: single, replicated and disaggregated built-in topologies on --cores.
    #[arg(long = "topology", value_name = "NAME=FILE", value_parser = parse_named_file)]
    topologies: Vec<(String, PathBuf)>,
    /// Scenarios to run (TOML `[[scenario]]` tables, see docs/bench.md). Default:
    /// the seed's two tests, long-prompt/short-output and short-prompt/long-output
    /// sweeps, and multi-turn chat.
    #[arg(long, value_name = "FILE")]
    suite: Option<PathBuf>,
    /// Run only these scenarios of the suite (repeatable).
    #[arg(long = "scenario", value_name = "NAME")]
    scenarios: Vec<String>,
    /// The report folder.
    #[arg(long, default_value = "compare-report")]
    out: PathBuf,
    /// Cores in all for the default topologies: the first N of those this process may
    /// use (default: all of them). With an odd N, every layout uses N - 1, so that all
    /// get the same total.
    #[arg(long)]
    cores: Option<usize>,
    /// KV cache per built-in worker of the default topologies.
    #[arg(long, default_value = "512MiB")]
    kv_cache_memory: String,
    /// The model of the default topologies' workers (default: the default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// An extra `tandem serve` argument for the default topologies' workers
    /// (repeatable, e.g. `--serve-arg=--max-num-batched-tokens=512`).
    #[arg(long = "serve-arg", value_name = "ARG", allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// Send chat requests instead of completions.
    #[arg(long)]
    chat: bool,
    /// Draw random prompts as exact token counts in this tokenizer (a tokenizer.json, a
    /// model folder holding one, or a GGUF file), as `vllm bench serve` does; needed
    /// where the workers' tokenizer turns words into few or repeated tokens. Default:
    /// words.
    #[arg(long, value_name = "PATH")]
    tokenizer: Option<PathBuf>,
    /// Percentiles to report.
    #[arg(long, value_delimiter = ',', default_value = "50,90,95,99")]
    percentiles: Vec<f64>,
    /// Seconds each process gets to become healthy.
    #[arg(long, default_value_t = 180)]
    start_timeout: u64,
    /// Seconds one request may take.
    #[arg(long, default_value_t = 600)]
    request_timeout: u64,
    /// Run the whole comparison this many times, one round after the other, each into
    /// OUT/round-N/, and write OUT/rounds.md with each figure's median and range over
    /// the rounds (for machines whose speed drifts from one run to the next).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=100))]
    rounds: u16,
}

/// Set by SIGINT/SIGTERM: the comparison stops after writing what it has.
static STOP: AtomicBool = AtomicBool::new(false);

fn parse_named_file(text: &str) -> Result<(String, PathBuf), String> {
    match text.split_once('=') {
        Some((name, file)) if !name.is_empty() && !file.is_empty() => {
            Ok((name.to_owned(), PathBuf::from(file)))
        }
        _ => Err(format!("`{text}`: expected NAME=FILE")),
    }
}

pub fn run(args: CompareArgs) -> Result<()> {
    if args.percentiles.iter().any(|p| !(0.0..=100.0).contains(p)) {
        bail!("--percentiles must be between 0 and 100");
    }
    let scenarios = selected_scenarios(&args)?;
    let mut topologies = topologies(&args)?;
    // The first topology that uses the default model fetches it if missing.
    let mut fetch = true;
    for (_, topology) in &mut topologies {
        fetch &= !crate::up::fill_default_models(topology, fetch)?;
    }
    let options = Options {
        out: args.out.clone(),
        chat: args.chat,
        percentiles: args.percentiles.clone(),
        start_timeout: Duration::from_secs(args.start_timeout),
        request_timeout: Duration::from_secs(args.request_timeout),
        resources: resources(&args),
        command: std::env::args()
            .map(|a| plan::shell_quote(&a))
            .collect::<Vec<_>>()
            .join(" "),
        tokenizer: args.tokenizer.clone(),
    };
    let outcome = tandem_experiment::compare_rounds(
        &topologies,
        &scenarios,
        &options,
        usize::from(args.rounds),
        &STOP,
    )?;
    eprintln!("\nreport: {}", outcome.report.display());
    if outcome.interrupted {
        bail!("interrupted; the report holds what was measured");
    }
    if !outcome.failed.is_empty() {
        bail!(
            "not measured: {} (see {})",
            outcome.failed.join(", "),
            outcome.report.display()
        );
    }
    Ok(())
}

fn selected_scenarios(args: &CompareArgs) -> Result<Vec<Scenario>> {
    let suite = match &args.suite {
        Some(path) => Suite::load(path)?,
        None => Suite::default_suite(),
    };
    if let Some(unknown) = args
        .scenarios
        .iter()
        .find(|name| !suite.scenarios.iter().any(|s| &s.name == *name))
    {
        let names: Vec<&str> = suite.scenarios.iter().map(|s| s.name.as_str()).collect();
        bail!(
            "no scenario `{unknown}` in the suite ({})",
            names.join(", ")
        );
    }
    Ok(suite
        .scenarios
        .into_iter()
        .filter(|s| args.scenarios.is_empty() || args.scenarios.contains(&s.name))
        .collect())
}

/// The given topology files, or the three default ones.
fn topologies(args: &CompareArgs) -> Result<Vec<(String, Checked)>> {
    if !args.topologies.is_empty() {
        return args
            .topologies
            .iter()
            .map(|(name, file)| Ok((name.clone(), topology::load(file)?)))
            .collect();
    }
    let defaults = DefaultTopologies {
        cores: given_cores(args.cores)?,
        kv_cache_memory: &args.kv_cache_memory,
        model: args.model.as_deref(),
        serve_args: &args.serve_args,
    };
    Ok(defaults.all()?)
}

/// What every topology gets, for the report.
fn resources(args: &CompareArgs) -> String {
    if !args.topologies.is_empty() {
        return "as the topology files give them".into();
    }
    match given_cores(args.cores) {
        Ok(cores) => DefaultTopologies {
            cores,
            kv_cache_memory: &args.kv_cache_memory,
            model: None,
            serve_args: &[],
        }
        .resources(),
        Err(err) => err.to_string(),
    }
}
