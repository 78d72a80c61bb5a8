//! Experiments on layouts: the same scenarios run against several topologies in turn —
//! each started with `tandem up`'s machinery, warmed up, measured and torn down — into
//! one report folder (`report.md`, `results.json`, figures) rewritten after every
//! topology, so an interrupted experiment keeps what it measured; or the whole of it
//! in rounds, merged into medians and ranges ([`compare_rounds`]). `tandem compare` is
//! its command line; the planner's measurements reuse its parts.
//!
//! - [`defaults`]: the default single, replicated and disaggregated topologies.
//! - [`measure`]: one topology through every scenario.
//! - [`setup`]: what the report says about where it ran.
//! - [`core_speed`]: how fast each core computes and reads, alone and all busy.
//! - [`profiling`]: a planner profile of this machine, from workers it starts.

pub mod core_speed;
pub mod defaults;
pub mod measure;
pub mod profiling;
pub mod setup;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tandem_bench::comparison::{Comparison, ReportError, Setup, TopologyEntry};
use tandem_bench::rounds;
use tandem_bench::suite::Scenario;
use tandem_bench::tokens::PromptTokenizer;
use tandem_launch::plan::{self, Launch};
use tandem_launch::run::RunError;
use tandem_launch::scale::Scaler;
use tandem_launch::secret::{ClusterSecret, SecretError};
use tandem_launch::topology::{Checked, TopologyError};
use tandem_planner::profile::CoreSpeed;

/// Why an experiment could not run (a topology that fails to start is not one: the
/// report says so and the others run).
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Start(#[from] RunError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error(transparent)]
    Suite(#[from] tandem_bench::suite::SuiteError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("--cores {0}")]
    Cores(String),
    #[error("the warm-up request {0}")]
    WarmUp(String),
    #[error("the planner journal: {0}")]
    Journal(String),
    #[error(transparent)]
    Scale(#[from] tandem_launch::scale::ScaleError),
    #[error(transparent)]
    Tokens(#[from] tandem_bench::tokens::TokensError),
    #[error(transparent)]
    Rounds(#[from] rounds::RoundsError),
    #[error(transparent)]
    Profile(#[from] tandem_bench::profile::ProfileFailure),
    #[error("--alongside {0} is the measured worker itself; give the other cores' workers")]
    AlongsideItself(String),
}

/// How the runs are made and reported.
#[derive(Debug, Clone)]
pub struct Options {
    /// The report folder.
    pub out: PathBuf,
    /// Chat requests instead of completions.
    pub chat: bool,
    pub percentiles: Vec<f64>,
    /// Each process's time to become healthy.
    pub start_timeout: Duration,
    /// One request's time limit.
    pub request_timeout: Duration,
    /// What every topology gets, for the report ("as the topology files give them").
    pub resources: String,
    /// The command line that asked for the experiment, for the report.
    pub command: String,
    /// Draw random prompts in this tokenizer's ids (exact token counts, as `vllm bench
    /// serve` draws them) instead of words: a `tokenizer.json`, a model folder holding
    /// one, or a GGUF file.
    pub tokenizer: Option<PathBuf>,
}

/// What an experiment measured.
#[derive(Debug)]
pub struct Outcome {
    pub report: PathBuf,
    /// Topologies that could not be measured.
    pub failed: Vec<String>,
    /// A signal stopped it early (the report holds what was measured).
    pub interrupted: bool,
}

/// Runs `scenarios` against each of `topologies` in turn (the first is the baseline)
/// and writes the report into `options.out`. `stop` (set on SIGINT/SIGTERM, and
/// checked between runs) ends it early.
pub fn compare(
    topologies: &[(String, Checked)],
    scenarios: &[Scenario],
    options: &Options,
    stop: &'static AtomicBool,
) -> Result<Outcome, ExperimentError> {
    let tandem = tandem_binary()?;
    let secret = ClusterSecret::generate()?;
    let mut plans: Vec<Vec<Launch>> = topologies
        .iter()
        .map(|(_, topology)| plan::plan(topology, &tandem, &secret))
        .collect();
    let entries: Vec<TopologyEntry> = topologies
        .iter()
        .zip(&plans)
        .map(|((name, topology), launches)| TopologyEntry {
            name: name.clone(),
            description: setup::describe(topology),
            commands: launches.iter().map(Launch::shell_line).collect(),
            error: None,
            core_speeds: Vec::new(),
        })
        .collect();
    let tokenizer = options
        .tokenizer
        .as_deref()
        .map(PromptTokenizer::load)
        .transpose()?;
    let mut comparison = Comparison::new(report_setup(topologies, options), entries, scenarios);
    let admin_token = give_planners_a_token(topologies, &mut plans)?;
    let mut scalers = Vec::with_capacity(topologies.len());
    for ((_, topology), launches) in topologies.iter().zip(&mut plans) {
        let slots = plan::slots(topology, &tandem, &secret);
        scalers.push(Scaler::prepare(topology, launches, slots)?);
    }
    create_dir(&options.out)?;
    tandem_launch::run::stop_on_signals(stop);
    let runtime = async_runtime()?;
    let runs = topologies.iter().zip(&plans).zip(scalers);
    for (index, (((name, topology), launches), scaler)) in runs.enumerate() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        eprintln!("\n=== {name}: {} ===", setup::describe(topology));
        comparison.topologies[index].core_speeds = time_worker_cores(topology);
        let planner_token = topology
            .router
            .planner
            .is_some()
            .then_some(admin_token.expose());
        let measured = measure::topology(
            &runtime,
            (name, topology, launches),
            (planner_token, scaler),
            (options, tokenizer.as_ref(), stop),
            &mut comparison,
        );
        if let Err(error) = measured {
            eprintln!("{name} could not be measured: {error}");
            comparison.topologies[index].error = Some(error.to_string());
        }
        comparison.write(&options.out)?;
    }
    Ok(Outcome {
        report: options.out.join("report.md"),
        failed: comparison
            .topologies
            .iter()
            .filter(|t| t.error.is_some())
            .map(|t| t.name.clone())
            .collect(),
        interrupted: stop.load(Ordering::Relaxed),
    })
}

/// Runs the comparison `rounds` times, one round after the other (every topology once
/// a round, so a slow stretch of the machine falls on all of them alike), each into
/// `options.out/round-N/`, then writes `rounds.md` and `rounds.json` there: each run's
/// figures as the median of its rounds and their range. One round is [`compare`] itself.
pub fn compare_rounds(
    topologies: &[(String, Checked)],
    scenarios: &[Scenario],
    options: &Options,
    rounds: usize,
    stop: &'static AtomicBool,
) -> Result<Outcome, ExperimentError> {
    if rounds <= 1 {
        return compare(topologies, scenarios, options, stop);
    }
    let mut failed: Vec<String> = Vec::new();
    let mut reports = Vec::new();
    for round in 1..=rounds {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        eprintln!("\n##### round {round} of {rounds} #####");
        let round_options = Options {
            out: options.out.join(format!("round-{round}")),
            ..options.clone()
        };
        let outcome = compare(topologies, scenarios, &round_options, stop)?;
        for name in outcome.failed {
            if !failed.contains(&name) {
                failed.push(name);
            }
        }
        reports.push(read_results(&round_options.out.join("results.json"))?);
        if outcome.interrupted {
            break;
        }
    }
    let merged = rounds::merge(&reports)?;
    let report = options.out.join("rounds.md");
    write_file(&report, &rounds::markdown(&merged, reports.len()))?;
    let json = serde_json::to_string_pretty(&merged).expect("merged runs serialize");
    write_file(&options.out.join("rounds.json"), &json)?;
    Ok(Outcome {
        report,
        failed,
        interrupted: stop.load(Ordering::Relaxed),
    })
}

/// The multi-threaded runtime the measurements run on.
fn async_runtime() -> Result<tokio::runtime::Runtime, ExperimentError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| ExperimentError::Io {
            context: "starting the async runtime".into(),
            source,
        })
}

/// This binary: the workers and routers it starts are `tandem serve` and `tandem route`.
fn tandem_binary() -> Result<PathBuf, ExperimentError> {
    std::env::current_exe().map_err(|source| ExperimentError::Io {
        context: "locating the tandem binary".into(),
        source,
    })
}

fn read_results(path: &Path) -> Result<serde_json::Value, ExperimentError> {
    let io = |source| ExperimentError::Io {
        context: format!("reading {}", path.display()),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(io)?;
    serde_json::from_str(&text).map_err(|error| io(std::io::Error::other(error)))
}

fn write_file(path: &Path, text: &str) -> Result<(), ExperimentError> {
    std::fs::write(path, text).map_err(|source| ExperimentError::Io {
        context: format!("writing {}", path.display()),
        source,
    })
}

/// Routers with the online planner get an admin token, to read the planner's journal
/// after each run; given in the environment, after the report's command lines were
/// taken, so no report shows it.
fn give_planners_a_token(
    topologies: &[(String, Checked)],
    plans: &mut [Vec<Launch>],
) -> Result<ClusterSecret, ExperimentError> {
    let token = ClusterSecret::generate()?;
    for ((_, topology), launches) in topologies.iter().zip(plans) {
        if topology.router.planner.is_some()
            && let Some(router) = launches.iter_mut().find(|l| l.name == "router")
        {
            router
                .env
                .push(("TANDEM_ADMIN_TOKEN".into(), token.expose().to_owned()));
        }
    }
    Ok(token)
}

/// The speeds of the cores `topology`'s workers are given, timed now (nothing of it
/// started yet); a slow one is warned about. Empty where none are given.
fn time_worker_cores(topology: &Checked) -> Vec<CoreSpeed> {
    let mut cores: Vec<usize> = topology
        .workers
        .iter()
        .flat_map(|w| w.spec.cores.iter().copied())
        .collect();
    cores.sort_unstable();
    cores.dedup();
    if cores.is_empty() {
        return Vec::new();
    }
    match core_speed::measure_and_warn(&cores) {
        Ok(speeds) => speeds,
        Err(error) => {
            eprintln!("the cores {cores:?} could not be timed: {error}");
            Vec::new()
        }
    }
}

fn report_setup(topologies: &[(String, Checked)], options: &Options) -> Setup {
    let models: Vec<String> = topologies
        .iter()
        .flat_map(|(_, t)| t.workers.iter().filter_map(|w| w.spec.model.clone()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    Setup {
        date: setup::utc_date(),
        tandem_version: env!("CARGO_PKG_VERSION").into(),
        machine: setup::machine(),
        gpus: tandem_launch::doctor::local_gpus(),
        model: models.join(", "),
        resources: options.resources.clone(),
        command: options.command.clone(),
    }
}

fn create_dir(dir: &Path) -> Result<(), ExperimentError> {
    std::fs::create_dir_all(dir).map_err(|source| ExperimentError::Io {
        context: format!("creating {}", dir.display()),
        source,
    })
}
