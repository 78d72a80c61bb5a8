//! Measuring one topology: start it with `tandem up`'s machinery, warm it up, run
//! every scenario at every load, keep each run (with its timeline where it has one:
//! shift workloads and topologies with the online planner), stop it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tandem_bench::client::{Api, Prompt, Target};
use tandem_bench::comparison::{Comparison, Run};
use tandem_bench::handoff::{self, Counters, Handoff};
use tandem_bench::report::{self, RunInfo};
use tandem_bench::suite::{LoadPoint, Scenario, WorkloadKind};
use tandem_bench::timeline::Timeline;
use tandem_bench::tokens::PromptTokenizer;
use tandem_bench::{Progress, Traffic, stats};
use tandem_launch::plan::Launch;
use tandem_launch::scale::Scaler;
use tandem_launch::stack::{Stack, StartOptions, StderrObserver};
use tandem_launch::topology::{Checked, Role};

use crate::{ExperimentError, Options};

/// Starts `topology` (its `launches`), runs every scenario of `comparison` against it
/// and adds the runs; its logs go to `logs/<name>` in the report folder. With a
/// `scaler` (standby workers), a thread starts and stops workers as the router's
/// planner asks while the runs go on.
pub fn topology(
    runtime: &tokio::runtime::Runtime,
    (name, topology, launches): (&str, &Checked, &[Launch]),
    (planner_token, scaler): (Option<&str>, Option<Scaler>),
    (args, tokenizer, stop): (&Options, Option<&PromptTokenizer>, &'static AtomicBool),
    comparison: &mut Comparison,
) -> Result<(), ExperimentError> {
    let log_dir = args.out.join("logs").join(name);
    crate::create_dir(&log_dir)?;
    let options = StartOptions {
        log_dir: Some(&log_dir),
        limit: args.start_timeout,
        stop,
    };
    let stack = Mutex::new(Stack::start(
        launches,
        &options,
        &mut StderrObserver::new(),
    )?);
    let endpoint = stack
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .endpoint()
        .to_owned();
    let measured = AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        if let Some(mut scaler) = scaler {
            let (stack, options, measured) = (&stack, &options, &measured);
            scope.spawn(move || {
                let mut observer = StderrObserver::new();
                while !measured.load(Ordering::Relaxed) {
                    let mut stack = stack.lock().unwrap_or_else(|e| e.into_inner());
                    scaler.tick(&mut stack, options, &mut observer);
                    drop(stack);
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        }
        let planner = planner_token.map(|token| (endpoint.as_str(), token));
        let result = scenarios(
            runtime,
            (name, topology),
            &endpoint,
            planner,
            (args, tokenizer, stop),
            &stack,
            comparison,
        );
        measured.store(true, Ordering::Relaxed);
        result
    });
    stack.into_inner().unwrap_or_else(|e| e.into_inner()).stop();
    result
}

/// Runs every scenario of `comparison` at every load against the router at `endpoint`.
fn scenarios(
    runtime: &tokio::runtime::Runtime,
    (name, topology): (&str, &Checked),
    endpoint: &str,
    planner: Option<(&str, &str)>,
    (args, tokenizer, stop): (&Options, Option<&PromptTokenizer>, &'static AtomicBool),
    stack: &Mutex<Stack>,
    comparison: &mut Comparison,
) -> Result<(), ExperimentError> {
    let target = |ignore_eos: bool| Target {
        base_url: endpoint.to_owned(),
        model: None,
        api: if args.chat {
            Api::Chat
        } else {
            Api::Completions
        },
        ignore_eos,
        sampling: tandem_bench::client::Sampling::greedy(),
        timeout: args.request_timeout,
    };
    warm_up(runtime, &target(true))?;
    let handoff_workers = handoff_workers(topology);
    let metrics_client = reqwest::Client::new();
    let read_handoff = |label: &str| {
        if handoff_workers.is_empty() {
            return None;
        }
        let read = handoff::read_all(&metrics_client, &handoff_workers);
        runtime
            .block_on(read)
            .inspect_err(|error| eprintln!("{label}: no hand-off figures: {error}"))
            .ok()
    };
    for results in &mut comparison.scenarios {
        let scenario = results.scenario.clone();
        let slo = scenario.slo()?;
        for (point_index, load) in scenario.points().into_iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            // Fresh prompts at every load (no prefix-cache hits carried over from the
            // previous load), the same ones for every topology.
            let mut varied = scenario.clone();
            varied.seed = scenario.seed.wrapping_add(1000 * point_index as u64);
            let (conversations, _) = runtime.block_on(varied.conversations_in(tokenizer))?;
            let requests: usize = conversations.iter().map(|c| c.turns.len()).sum();
            let traffic = Traffic {
                request_rate: load.request_rate,
                burstiness: scenario.burstiness,
                max_concurrency: load.max_concurrency,
                seed: varied.seed,
            };
            let label = format!("{name} · {} · {}", scenario.name, load.label());
            let progress = Progress::stderr(requests, &label);
            let target = target(scenario.ignores_eos());
            let run_start = unix_now();
            let handoff_before = read_handoff(&label);
            let run = tandem_bench::run_conversations(&target, &conversations, &traffic, &progress);
            let finished = runtime.block_on(until_stopped(run, stop));
            progress.done();
            let Some((records, duration)) = finished else {
                return Ok(());
            };
            let handoff = handoff_before
                .zip(read_handoff(&label))
                .and_then(|(before, after): (Counters, Counters)| Handoff::between(before, after));
            let summary = stats::summarize(&records, duration, &args.percentiles, slo.as_ref());
            eprintln!(
                "{label}: {} ok, {} failed, {:.1} output tok/s, TTFT p50 {:.0} ms, TPOT p50 {:.1} ms",
                summary.completed,
                summary.failed,
                summary.output_throughput,
                summary.ttft.median,
                summary.tpot.median
            );
            let mut info = run_info(&target, &scenario, &load, requests);
            info.tokenizer_id = tokenizer
                .filter(|_| scenario.is_random())
                .map(PromptTokenizer::id);
            let wants_timeline = scenario.workload == WorkloadKind::Shift || planner.is_some();
            let timeline = wants_timeline.then(|| {
                let requests = Timeline::of_requests(&records, slo.as_ref());
                match planner {
                    Some((endpoint, token)) => match planner_journal(endpoint, token, run_start) {
                        Ok(journal) => requests.with_planner_journal(&journal, run_start),
                        Err(error) => {
                            eprintln!("{label}: no planner journal: {error}");
                            requests
                        }
                    },
                    None => {
                        let (prefill, decode) = pool_sizes(topology);
                        requests.with_fixed_pools(prefill, decode)
                    }
                }
            });
            results.runs.push(Run {
                topology: name.to_owned(),
                load,
                document: report::json(&info, &summary, &records, false),
                summary,
                timeline,
                handoff,
            });
            stack
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .check_alive()?;
        }
    }
    Ok(())
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The router's `GET /planner` answer: the planner's verdicts since `since` (Unix s).
fn planner_journal(
    endpoint: &str,
    token: &str,
    since: f64,
) -> Result<serde_json::Value, ExperimentError> {
    let failed = |what: &str, error: &dyn std::fmt::Display| {
        ExperimentError::Journal(format!("{what}: {error}"))
    };
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent();
    let mut answer = agent
        .get(&format!("{endpoint}/planner?since={since}"))
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .map_err(|e| failed("asking the router", &e))?;
    let text = answer
        .body_mut()
        .read_to_string()
        .map_err(|e| failed("reading it", &e))?;
    serde_json::from_str(&text).map_err(|e| failed("parsing it", &e))
}

/// The workers whose hand-off counters a run reads: every started worker of a
/// topology with prefill workers (the pulling side counts, whichever role it has
/// then); none where nothing is handed off, or where standby workers may join
/// mid-run (their pulls would be missed).
fn handoff_workers(topology: &Checked) -> Vec<String> {
    let splits = topology
        .started_workers()
        .any(|w| w.spec.role == Role::Prefill);
    if !splits || topology.has_standby() {
        return Vec::new();
    }
    topology.started_workers().map(|w| w.spec.url()).collect()
}

/// A topology's fixed layout as (prefill, decode) pool sizes; replicas count as
/// decode workers (each decodes what it prefilled).
fn pool_sizes(topology: &Checked) -> (usize, usize) {
    let count = |role: Role| {
        topology
            .started_workers()
            .filter(|w| w.spec.role == role)
            .count()
    };
    (
        count(Role::Prefill),
        count(Role::Decode) + count(Role::Both),
    )
}

/// `work`'s output, or `None` once a signal sets `stop` (the requests still in flight
/// are dropped with the runtime).
async fn until_stopped<T>(
    work: impl std::future::Future<Output = T>,
    stop: &AtomicBool,
) -> Option<T> {
    let stopped = async {
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        output = work => Some(output),
        () = stopped => None,
    }
}

fn run_info(target: &Target, scenario: &Scenario, load: &LoadPoint, requests: usize) -> RunInfo {
    RunInfo {
        url: target.base_url.clone(),
        endpoint: match target.api {
            Api::Completions => "completions".into(),
            Api::Chat => "chat".into(),
        },
        workload: scenario.workload.name().into(),
        num_prompts: requests,
        request_rate: load.request_rate,
        burstiness: scenario.burstiness,
        max_concurrency: load.max_concurrency,
        tokenizer_id: None,
    }
}

/// One short request through the router, so that no measured request pays for first
/// touches of the weights or the first hand-off connection.
fn warm_up(runtime: &tokio::runtime::Runtime, target: &Target) -> Result<(), ExperimentError> {
    let prompt = Prompt {
        text: "Warm up: say hello.".into(),
        max_tokens: 4,
    };
    let traffic = Traffic {
        request_rate: None,
        burstiness: 1.0,
        max_concurrency: None,
        seed: 0,
    };
    let (records, _) = runtime.block_on(tandem_bench::run(
        target,
        &[prompt],
        &traffic,
        &Progress::hidden(),
    ));
    match records.first() {
        Some(record) if record.ok => Ok(()),
        Some(record) => Err(ExperimentError::WarmUp(format!(
            "failed: {}",
            record.error.as_deref().unwrap_or("unknown")
        ))),
        None => Err(ExperimentError::WarmUp("was not sent".into())),
    }
}
