//! Profiling this machine for the planner with workers it starts itself: for each
//! worker size, one built-in worker of that size measured alone (with a 1P1D pair of
//! the smallest size beside it for the hand-off), then the given cores filled with
//! workers of that size and the first measured while the others get the same load —
//! each set started with `tandem up`'s machinery on its own cores, measured with
//! [`tandem_bench::profile`], and stopped before the next. The cores' own speeds
//! ([`crate::core_speed`]) are measured first, with nothing started.
//!
//! Or one worker size measured where it already runs ([`measure_running`]: `tandem plan
//! profile --url`); either way [`into_profile`] folds the measurements into the profile
//! file's contents.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tandem_bench::client::Target;
use tandem_bench::profile::{self, ProfileFailure, WorkerPlan};
use tandem_launch::plan::{self, Launch};
use tandem_launch::run::RunError;
use tandem_launch::secret::ClusterSecret;
use tandem_launch::stack::{Stack, StartOptions, StderrObserver};
use tandem_launch::topology::{self, Checked};
use tandem_planner::Profile;
use tandem_planner::profile::{CoreSpeed, HandoffCost, ProfileError, WorkerProfile};

use crate::ExperimentError;
use crate::defaults::DefaultTopologies;

/// What to start and where.
pub struct MachineProfile<'a> {
    /// The cores the workers may use (see [`crate::defaults::given_cores`]).
    pub cores: Vec<usize>,
    /// Worker sizes (cores each) to measure; each at most `cores.len()`.
    pub sizes: Vec<usize>,
    pub kv_cache_memory: &'a str,
    /// The workers' model (default: the default model).
    pub model: Option<&'a Path>,
    pub start_timeout: Duration,
    /// Each worker set's logs go to a folder of its own here.
    pub log_dir: &'a Path,
}

/// What the workers measured.
pub struct Measured {
    /// The model's name as the workers serve it.
    pub model: String,
    /// Each size alone, and alongside its twins where the cores hold two or more.
    pub workers: Vec<WorkerProfile>,
    /// Through a 1P1D pair of the smallest size, where the cores hold two of it.
    pub handoff: Option<HandoffCost>,
    /// The given cores' speeds (empty where the workers were not started here).
    pub core_speeds: Vec<CoreSpeed>,
}

/// A worker already running, measured where it is.
pub struct RunningWorker<'a> {
    /// Its base URL.
    pub url: &'a str,
    /// The model's name as it serves it.
    pub model: &'a str,
    /// Workers on the machine's other cores, given the same measurements at the same
    /// time (see [`WorkerProfile::measured_alongside`]).
    pub alongside: &'a [String],
    /// A 1P1D router over workers of this size, for the hand-off.
    pub split_url: Option<&'a str>,
}

/// Measures `worker` with `plan` (beside its `alongside` workers), and the hand-off
/// through its `split_url`.
pub fn measure_running(
    worker: &RunningWorker,
    plan: &WorkerPlan,
    kv_bytes_per_token: u64,
) -> Result<Measured, ExperimentError> {
    let same_url = |other: &String| other.trim_end_matches('/') == worker.url.trim_end_matches('/');
    if let Some(other) = worker.alongside.iter().find(|other| same_url(other)) {
        return Err(ExperimentError::AlongsideItself(other.clone()));
    }
    let runtime = crate::async_runtime()?;
    let model = Some(worker.model.to_owned());
    let target = profile::target(worker.url, model.clone());
    eprintln!("measuring a {}-core worker at {}", plan.cores, worker.url);
    let neighbours: Vec<_> = worker
        .alongside
        .iter()
        .map(|other| profile::target(other, model.clone()))
        .collect();
    if !neighbours.is_empty() {
        eprintln!(
            "  with the same measurements on {} at the same time",
            worker.alongside.join(", ")
        );
    }
    let measured = runtime.block_on(profile::measure_worker_alongside(
        &target,
        &neighbours,
        plan,
    ))?;
    let handoff = match worker.split_url {
        Some(split) => {
            let split = profile::target(split, model.clone());
            eprintln!("measuring the hand-off through {}", split.base_url);
            Some(runtime.block_on(profile::measure_handoff(
                &split,
                &target,
                kv_bytes_per_token,
                &plan.prompt_lengths,
                plan.repeats,
            ))?)
        }
        None => None,
    };
    Ok(Measured {
        model: worker.model.to_owned(),
        workers: vec![measured],
        handoff,
        core_speeds: Vec::new(),
    })
}

/// `measured` folded into the profile file's former contents (`existing`, refused if
/// it is another model's or machine's), or into a new profile of this machine; each
/// worker size replaces the same size measured the same way.
pub fn into_profile(
    existing: Option<Profile>,
    measured: Measured,
    kv_bytes_per_token: u64,
) -> Result<Profile, ProfileError> {
    let hardware = profile::cpu_description();
    let mut profile = match existing {
        Some(profile) => {
            profile.check_matches(&measured.model, &hardware)?;
            profile
        }
        None => Profile {
            hardware,
            model: measured.model.clone(),
            kv_bytes_per_token,
            handoff: HandoffCost {
                fixed_seconds: 0.0,
                seconds_per_byte: 0.0,
            },
            workers: Vec::new(),
            core_speeds: Vec::new(),
        },
    };
    if !measured.core_speeds.is_empty() {
        profile.core_speeds = measured.core_speeds;
    }
    if let Some(handoff) = measured.handoff {
        profile.handoff = handoff;
    }
    for worker in measured.workers {
        profile.put_worker(worker);
    }
    Ok(profile)
}

/// Starts, measures and stops every worker set `machine` calls for, with `plan`'s
/// measurements (its `cores` is set per size; the workers get its batch limits). `stop`
/// (set by a signal) ends it early, the workers stopped.
pub fn measure(
    machine: &MachineProfile,
    plan: &WorkerPlan,
    kv_bytes_per_token: u64,
    stop: &'static AtomicBool,
) -> Result<Measured, ExperimentError> {
    if let Some(&size) = machine
        .sizes
        .iter()
        .find(|&&s| s == 0 || s > machine.cores.len())
    {
        return Err(ExperimentError::Cores(format!(
            "{}: a {size}-core worker does not fit",
            machine.cores.len()
        )));
    }
    let mut sizes = machine.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let runtime = crate::async_runtime()?;
    let sets = WorkerSets::new(machine, plan)?;
    tandem_launch::run::stop_on_signals(stop);
    let core_speeds = crate::core_speed::measure_and_warn(&machine.cores).map_err(|source| {
        ExperimentError::Io {
            context: "timing the cores".into(),
            source,
        }
    })?;
    let mut measured = Measured {
        model: String::new(),
        workers: Vec::new(),
        handoff: None,
        core_speeds,
    };
    for (index, &size) in sizes.iter().enumerate() {
        let plan = WorkerPlan {
            cores: size,
            ..plan.clone()
        };
        let split = index == 0 && 2 * size <= machine.cores.len();
        let (model, worker, handoff) =
            measure_alone(&sets, &plan, split, kv_bytes_per_token, &runtime, stop)?;
        measured.model = model;
        measured.workers.push(worker);
        if handoff.is_some() {
            measured.handoff = handoff;
        }
        let twins = machine.cores.len() / size;
        if twins >= 2 {
            let worker = measure_twins(&sets, &plan, twins, &runtime, stop)?;
            measured.workers.push(worker);
        }
    }
    Ok(measured)
}

/// One worker of `plan.cores` cores measured alone, and with `split` the hand-off
/// through a 1P1D pair of its size; with the model it serves.
fn measure_alone(
    sets: &WorkerSets,
    plan: &WorkerPlan,
    split: bool,
    kv_bytes_per_token: u64,
    runtime: &tokio::runtime::Runtime,
    stop: &'static AtomicBool,
) -> Result<(String, WorkerProfile, Option<HandoffCost>), ExperimentError> {
    let size = plan.cores;
    let started = sets.start_alone(size, split, stop)?;
    let worker = target(runtime, &started.worker_urls[0])?;
    eprintln!("measuring a {size}-core worker alone");
    let profile = until_stopped(runtime, stop, profile::measure_worker(&worker, plan))?;
    let mut handoff = None;
    if let Some(split_url) = &started.split_url {
        eprintln!("measuring the hand-off through a 1P1D pair of {size}-core workers");
        let split = Target {
            base_url: split_url.clone(),
            ..worker.clone()
        };
        let measurement = profile::measure_handoff(
            &split,
            &worker,
            kv_bytes_per_token,
            &plan.prompt_lengths,
            plan.repeats,
        );
        handoff = Some(until_stopped(runtime, stop, measurement)?);
    }
    Ok((worker.model.unwrap_or_default(), profile, handoff))
}

/// The first of `twins` workers of `plan.cores` cores measured while the others get
/// the same load.
fn measure_twins(
    sets: &WorkerSets,
    plan: &WorkerPlan,
    twins: usize,
    runtime: &tokio::runtime::Runtime,
    stop: &'static AtomicBool,
) -> Result<WorkerProfile, ExperimentError> {
    let size = plan.cores;
    let started = sets.start_twins(size, twins, stop)?;
    let targets: Vec<Target> = started
        .worker_urls
        .iter()
        .map(|url| target(runtime, url))
        .collect::<Result<_, _>>()?;
    eprintln!(
        "measuring a {size}-core worker alongside {} like it",
        twins - 1
    );
    let measurement = profile::measure_worker_alongside(&targets[0], &targets[1..], plan);
    until_stopped(runtime, stop, measurement)
}

/// Workers started for one measurement (stopped on drop).
struct Started {
    worker_urls: Vec<String>,
    /// The 1P1D router, where the set has one.
    split_url: Option<String>,
    _stacks: Vec<Stack>,
}

/// Writes, starts and names the worker sets.
struct WorkerSets<'a> {
    machine: &'a MachineProfile<'a>,
    serve_args: Vec<String>,
    tandem: std::path::PathBuf,
    secret: ClusterSecret,
}

impl<'a> WorkerSets<'a> {
    fn new(machine: &'a MachineProfile<'a>, plan: &WorkerPlan) -> Result<Self, ExperimentError> {
        let tandem = crate::tandem_binary()?;
        Ok(Self {
            machine,
            // The workers take the batch limits the measurements assume.
            serve_args: vec![
                format!("--max-num-batched-tokens={}", plan.max_batched_tokens),
                format!("--max-num-seqs={}", plan.max_sequences),
            ],
            tandem,
            secret: ClusterSecret::generate()?,
        })
    }

    fn texts(&self) -> DefaultTopologies<'_> {
        DefaultTopologies {
            cores: self.machine.cores.clone(),
            kv_cache_memory: self.machine.kv_cache_memory,
            model: self.machine.model,
            serve_args: &self.serve_args,
        }
    }

    /// One worker on the first `size` cores; with `split`, also a 1P1D pair of
    /// `size`-core workers on the first `2 × size` cores (idle while the lone worker
    /// is measured).
    fn start_alone(
        &self,
        size: usize,
        split: bool,
        stop: &'static AtomicBool,
    ) -> Result<Started, ExperimentError> {
        let texts = self.texts();
        let cores = &self.machine.cores;
        let alone = texts.router("least_loaded")? + &texts.worker("both", &cores[..size], false)?;
        let (stack, checked) = self.start(&alone, &format!("{size}-core"), stop)?;
        let worker_urls = worker_urls(&checked);
        let mut stacks = vec![stack];
        let mut split_url = None;
        if split {
            let pair = texts.router("least_loaded")?
                + &texts.worker("prefill", &cores[..size], true)?
                + &texts.worker("decode", &cores[size..2 * size], true)?;
            let (stack, _) = self.start(&pair, &format!("{size}-core-1p1d"), stop)?;
            split_url = Some(stack.endpoint().to_owned());
            stacks.push(stack);
        }
        Ok(Started {
            worker_urls,
            split_url,
            _stacks: stacks,
        })
    }

    /// `count` workers of `size` cores on disjoint cores.
    fn start_twins(
        &self,
        size: usize,
        count: usize,
        stop: &'static AtomicBool,
    ) -> Result<Started, ExperimentError> {
        let texts = self.texts();
        let mut text = texts.router("least_loaded")?;
        for cores in self.machine.cores.chunks_exact(size).take(count) {
            text += &texts.worker("both", cores, false)?;
        }
        let (stack, checked) = self.start(&text, &format!("{count}x{size}-core"), stop)?;
        Ok(Started {
            worker_urls: worker_urls(&checked),
            split_url: None,
            _stacks: vec![stack],
        })
    }

    fn start(
        &self,
        text: &str,
        name: &str,
        stop: &'static AtomicBool,
    ) -> Result<(Stack, Checked), ExperimentError> {
        let checked = topology::parse(text, &format!("the profile's {name} workers"))?;
        let launches: Vec<Launch> = plan::plan(&checked, &self.tandem, &self.secret);
        let log_dir = self.machine.log_dir.join(name);
        crate::create_dir(&log_dir)?;
        let options = StartOptions {
            log_dir: Some(&log_dir),
            limit: self.machine.start_timeout,
            stop,
        };
        let stack = Stack::start(&launches, &options, &mut StderrObserver::new())?;
        Ok((stack, checked))
    }
}

fn worker_urls(topology: &Checked) -> Vec<String> {
    topology.workers.iter().map(|w| w.spec.url()).collect()
}

/// A profiling target for the worker at `url`, named by the model it serves.
fn target(runtime: &tokio::runtime::Runtime, url: &str) -> Result<Target, ExperimentError> {
    let model = runtime.block_on(profile::served_model(url))?;
    Ok(profile::target(url, Some(model)))
}

/// Runs `measurement` until it ends or a signal sets `stop`.
fn until_stopped<T>(
    runtime: &tokio::runtime::Runtime,
    stop: &'static AtomicBool,
    measurement: impl std::future::Future<Output = Result<T, ProfileFailure>>,
) -> Result<T, ExperimentError> {
    runtime.block_on(async {
        let stopped = async {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            result = measurement => result.map_err(ExperimentError::from),
            () = stopped => Err(RunError::Interrupted.into()),
        }
    })
}
