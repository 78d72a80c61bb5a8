//! `tandem compare`: the same scenarios against several topologies in turn — by default
//! a single built-in worker, two replicas and one prefill + one decode worker, all on
//! the same cores in total and the same KV budget per worker — each started with the
//! `tandem up` machinery, warmed up, measured and torn down; then a report folder
//! (`report.md`, `results.json`, PNG and SVG figures) that is rewritten after every
//! topology, so an interrupted comparison keeps what it measured.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tandem_bench::client::{Api, Prompt, Target};
use tandem_bench::comparison::{Comparison, Run, Setup, TopologyEntry};
use tandem_bench::report::{self, RunInfo};
use tandem_bench::suite::{LoadPoint, Scenario, Suite, WorkloadKind};
use tandem_bench::timeline::Timeline;
use tandem_bench::{Progress, Traffic, stats};
use tandem_launch::plan::{self, Launch};
use tandem_launch::run;
use tandem_launch::secret::ClusterSecret;
use tandem_launch::stack::{Stack, StartOptions, StderrObserver};
use tandem_launch::topology::{self, Checked, Role};

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
    /// Percentiles to report.
    #[arg(long, value_delimiter = ',', default_value = "50,90,95,99")]
    percentiles: Vec<f64>,
    /// Seconds each process gets to become healthy.
    #[arg(long, default_value_t = 180)]
    start_timeout: u64,
    /// Seconds one request may take.
    #[arg(long, default_value_t = 600)]
    request_timeout: u64,
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
    let tandem = std::env::current_exe().context("locating the tandem binary")?;
    let secret = ClusterSecret::generate()?;
    let plans: Vec<Vec<Launch>> = topologies
        .iter()
        .map(|(_, topology)| plan::plan(topology, &tandem, &secret))
        .collect();
    let entries: Vec<TopologyEntry> = topologies
        .iter()
        .zip(&plans)
        .map(|((name, topology), launches)| TopologyEntry {
            name: name.clone(),
            description: describe(topology),
            commands: launches.iter().map(Launch::shell_line).collect(),
            error: None,
        })
        .collect();
    let mut comparison = Comparison::new(setup(&args, &topologies), entries, &scenarios);
    // Routers with the online planner get an admin token, to read the planner's
    // journal after each run; given in the environment, after the report's command
    // lines were taken, so no report shows it.
    let admin_token = ClusterSecret::generate()?;
    let mut plans = plans;
    for ((_, topology), launches) in topologies.iter().zip(&mut plans) {
        if topology.router.planner.is_some()
            && let Some(router) = launches.iter_mut().find(|l| l.name == "router")
        {
            router
                .env
                .push(("TANDEM_ADMIN_TOKEN".into(), admin_token.expose().to_owned()));
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    run::stop_on_signals(&STOP);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    for (index, ((name, topology), launches)) in topologies.iter().zip(&plans).enumerate() {
        if STOP.load(Ordering::Relaxed) {
            break;
        }
        eprintln!("\n=== {name}: {} ===", describe(topology));
        let planner_token = topology
            .router
            .planner
            .is_some()
            .then_some(admin_token.expose());
        let measured = measure_topology(
            &args,
            &runtime,
            (name, topology, launches),
            planner_token,
            &mut comparison,
        );
        if let Err(error) = measured {
            eprintln!("{name} could not be measured: {error:#}");
            comparison.topologies[index].error = Some(format!("{error:#}"));
        }
        comparison.write(&args.out)?;
    }
    let report = args.out.join("report.md");
    eprintln!("\nreport: {}", report.display());
    let failed: Vec<&str> = comparison
        .topologies
        .iter()
        .filter(|t| t.error.is_some())
        .map(|t| t.name.as_str())
        .collect();
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted; the report holds what was measured");
    }
    if !failed.is_empty() {
        bail!(
            "not measured: {} (see {})",
            failed.join(", "),
            report.display()
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
        cores: given_cores(args)?,
        kv_cache_memory: &args.kv_cache_memory,
        model: args.model.as_deref(),
        serve_args: &args.serve_args,
    };
    [
        ("single", defaults.single()),
        ("replicated", defaults.replicated()),
        ("disaggregated", defaults.disaggregated()),
    ]
    .into_iter()
    .map(|(name, text)| {
        let text = text?;
        let topology = topology::parse(&text, &format!("the default {name} topology"))?;
        Ok((name.to_owned(), topology))
    })
    .collect()
}

/// The cores the default topologies share: the first `--cores` of those this process
/// may use (its affinity mask: a cpuset or taskset may exclude some), else all of them.
fn given_cores(args: &CompareArgs) -> Result<Vec<usize>> {
    let allowed = run::allowed_cores();
    match args.cores {
        None => Ok(allowed),
        Some(0) => bail!("--cores must be at least 1"),
        Some(n) if n > allowed.len() => bail!(
            "--cores {n}: this process may use {} cores ({})",
            allowed.len(),
            run::core_list(&allowed)
        ),
        Some(n) => Ok(allowed[..n].to_vec()),
    }
}

/// The default topologies, written as topology files: the same cores in total in all,
/// the same KV budget per worker, free ports on loopback.
struct DefaultTopologies<'a> {
    /// The core ids given (see [`given_cores`]).
    cores: Vec<usize>,
    kv_cache_memory: &'a str,
    model: Option<&'a Path>,
    serve_args: &'a [String],
}

impl DefaultTopologies<'_> {
    fn single(&self) -> Result<String> {
        let (first, second) = self.halves();
        let mut all = first;
        if second != all {
            all.extend(second);
        }
        Ok(self.router("least_loaded")? + &self.worker("both", &all, false)?)
    }

    fn replicated(&self) -> Result<String> {
        let (first, second) = self.halves();
        Ok(self.router("least_loaded")?
            + &self.worker("both", &first, false)?
            + &self.worker("both", &second, false)?)
    }

    fn disaggregated(&self) -> Result<String> {
        let (first, second) = self.halves();
        Ok(self.router("least_loaded")?
            + &self.worker("prefill", &first, true)?
            + &self.worker("decode", &second, true)?)
    }

    /// Two disjoint halves of equal size (both the one core given, with one); with an
    /// odd count the last core is left out, so that single gets what the two workers of
    /// the other layouts get together.
    fn halves(&self) -> (Vec<usize>, Vec<usize>) {
        if self.cores.len() <= 1 {
            return (self.cores.clone(), self.cores.clone());
        }
        let half = self.cores.len() / 2;
        (
            self.cores[..half].to_vec(),
            self.cores[half..half * 2].to_vec(),
        )
    }

    /// What each layout got, for the report.
    fn resources(&self) -> String {
        let (first, second) = self.halves();
        let used = if first == second {
            first.clone()
        } else {
            [first.clone(), second.clone()].concat()
        };
        let mut text = format!(
            "{} cores in all for every layout (single: one worker on cores {}; replicated \
             and disaggregated: two workers, on cores {} and on cores {})",
            used.len(),
            run::core_list(&used),
            run::core_list(&first),
            run::core_list(&second),
        );
        if used.len() < self.cores.len() {
            let idle: Vec<usize> = self
                .cores
                .iter()
                .copied()
                .filter(|c| !used.contains(c))
                .collect();
            text.push_str(&format!(
                " — of {} cores given: core {} stays idle so that every layout gets the same \
                 total",
                self.cores.len(),
                run::core_list(&idle)
            ));
        }
        text.push_str(&format!(
            ", KV cache {} per worker, the router on one thread",
            self.kv_cache_memory
        ));
        text
    }

    fn router(&self, policy: &str) -> Result<String> {
        Ok(format!(
            "[router]\nport = {}\npolicy = \"{policy}\"\nextra_args = [\"--threads\", \"1\"]\n\n",
            free_port()?
        ))
    }

    fn worker(&self, role: &str, cores: &[usize], kv: bool) -> Result<String> {
        let mut text = format!(
            "[[worker]]\nengine = \"builtin\"\nrole = \"{role}\"\nport = {}\ncores = {cores:?}\nkv_cache_memory = \"{}\"\n",
            free_port()?,
            self.kv_cache_memory
        );
        if kv {
            text.push_str(&format!("kv_port = {}\n", free_port()?));
        }
        if let Some(model) = self.model {
            text.push_str(&format!("model = {:?}\n", model.display().to_string()));
        }
        if !self.serve_args.is_empty() {
            text.push_str(&format!("extra_args = {:?}\n", self.serve_args));
        }
        text.push('\n');
        Ok(text)
    }
}

/// A port free on loopback now (the kernel's pick; it stays free until a worker binds
/// it unless something else races for it).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// "prefill (cores 0) + decode (cores 1)".
fn describe(topology: &Checked) -> String {
    let workers: Vec<String> = topology
        .workers
        .iter()
        .map(|w| {
            let role = match w.spec.role {
                Role::Prefill => "prefill",
                Role::Decode => "decode",
                Role::Both => "worker",
            };
            let cores: Vec<String> = w.spec.cores.iter().map(usize::to_string).collect();
            let kv = w
                .spec
                .kv_cache_memory
                .as_deref()
                .map_or(String::new(), |m| format!(", KV {m}"));
            if cores.is_empty() {
                format!("{role} on {}{kv}", w.spec.host)
            } else {
                format!("{role} (cores {}{kv})", cores.join(","))
            }
        })
        .collect();
    format!("router → {}", workers.join(" + "))
}

fn setup(args: &CompareArgs, topologies: &[(String, Checked)]) -> Setup {
    let models: Vec<String> = topologies
        .iter()
        .flat_map(|(_, t)| t.workers.iter().filter_map(|w| w.spec.model.clone()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let resources = if args.topologies.is_empty() {
        match given_cores(args) {
            Ok(cores) => DefaultTopologies {
                cores,
                kv_cache_memory: &args.kv_cache_memory,
                model: None,
                serve_args: &[],
            }
            .resources(),
            Err(err) => err.to_string(),
        }
    } else {
        "as the topology files give them".into()
    };
    Setup {
        date: utc_date(),
        tandem_version: env!("CARGO_PKG_VERSION").into(),
        machine: machine(),
        model: models.join(", "),
        resources,
        command: std::env::args()
            .map(|a| plan::shell_quote(&a))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Starts one topology, warms it up, runs every scenario at every load, tears it down.
fn measure_topology(
    args: &CompareArgs,
    runtime: &tokio::runtime::Runtime,
    (name, topology, launches): (&str, &Checked, &[Launch]),
    planner_token: Option<&str>,
    comparison: &mut Comparison,
) -> Result<()> {
    let log_dir = args.out.join("logs").join(name);
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let options = StartOptions {
        log_dir: Some(&log_dir),
        limit: Duration::from_secs(args.start_timeout),
        stop: &STOP,
    };
    let mut stack = Stack::start(launches, &options, &mut StderrObserver::new())?;
    let endpoint = stack.endpoint().to_owned();
    let target = |ignore_eos: bool| Target {
        base_url: endpoint.clone(),
        model: None,
        api: if args.chat {
            Api::Chat
        } else {
            Api::Completions
        },
        ignore_eos,
        temperature: Some(0.0),
        timeout: Duration::from_secs(args.request_timeout),
    };
    warm_up(runtime, &target(true))?;
    for results in &mut comparison.scenarios {
        let scenario = results.scenario.clone();
        let slo = scenario.slo()?;
        for (point_index, load) in scenario.points().into_iter().enumerate() {
            if STOP.load(Ordering::Relaxed) {
                return Ok(());
            }
            // Fresh prompts at every load (no prefix-cache hits carried over from the
            // previous load), the same ones for every topology.
            let mut varied = scenario.clone();
            varied.seed = scenario.seed.wrapping_add(1000 * point_index as u64);
            let conversations = varied.conversations()?;
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
            let run = tandem_bench::run_conversations(&target, &conversations, &traffic, &progress);
            let finished = runtime.block_on(until_stopped(run));
            progress.done();
            let Some((records, duration)) = finished else {
                return Ok(());
            };
            let summary = stats::summarize(&records, duration, &args.percentiles, slo.as_ref());
            eprintln!(
                "{label}: {} ok, {} failed, {:.1} output tok/s, TTFT p50 {:.0} ms, TPOT p50 {:.1} ms",
                summary.completed,
                summary.failed,
                summary.output_throughput,
                summary.ttft.median,
                summary.tpot.median
            );
            let info = run_info(&target, &scenario, &load, requests);
            let wants_timeline =
                scenario.workload == WorkloadKind::Shift || planner_token.is_some();
            let timeline = wants_timeline.then(|| {
                let requests = Timeline::of_requests(&records, slo.as_ref());
                match planner_token {
                    Some(token) => match planner_journal(&endpoint, token, run_start) {
                        Ok(journal) => requests.with_planner_journal(&journal, run_start),
                        Err(error) => {
                            eprintln!("{label}: no planner journal: {error:#}");
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
            });
            stack.check_alive()?;
        }
    }
    stack.stop();
    Ok(())
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The router's `GET /planner` answer: the planner's verdicts since `since` (Unix s).
fn planner_journal(endpoint: &str, token: &str, since: f64) -> Result<serde_json::Value> {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent();
    let mut answer = agent
        .get(&format!("{endpoint}/planner?since={since}"))
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .context("asking the router for its planner journal")?;
    let text = answer
        .body_mut()
        .read_to_string()
        .context("reading the planner journal")?;
    serde_json::from_str(&text).context("parsing the planner journal")
}

/// A topology's fixed layout as (prefill, decode) pool sizes; replicas count as
/// decode workers (each decodes what it prefilled).
fn pool_sizes(topology: &Checked) -> (usize, usize) {
    let count = |role: Role| {
        topology
            .workers
            .iter()
            .filter(|w| w.spec.role == role)
            .count()
    };
    (
        count(Role::Prefill),
        count(Role::Decode) + count(Role::Both),
    )
}

/// `work`'s output, or `None` once a signal sets `STOP` (the requests still in flight
/// are dropped with the runtime).
async fn until_stopped<T>(work: impl std::future::Future<Output = T>) -> Option<T> {
    let stopped = async {
        while !STOP.load(Ordering::Relaxed) {
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
    }
}

/// One short request through the router, so that no measured request pays for first
/// touches of the weights or the first hand-off connection.
fn warm_up(runtime: &tokio::runtime::Runtime, target: &Target) -> Result<()> {
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
        Some(record) => bail!(
            "the warm-up request failed: {}",
            record.error.as_deref().unwrap_or("unknown")
        ),
        None => bail!("the warm-up request was not sent"),
    }
}

/// "host: CPU model, N cores" (after the host, what a planner profile calls the
/// machine).
fn machine() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "this machine".into());
    format!("{host}: {}", tandem_bench::profile::cpu_description())
}

/// Today's date in UTC, `YYYY-MM-DD`.
fn utc_date() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((seconds / 86_400) as i64);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_414), (2025, 11, 22));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn the_default_topologies_share_the_cores_and_the_kv_budget() {
        let serve_args = vec!["--max-num-seqs=8".to_owned()];
        let defaults = DefaultTopologies {
            cores: vec![0, 1, 2, 3],
            kv_cache_memory: "256MiB",
            model: None,
            serve_args: &serve_args,
        };
        let parse = |text: Result<String>| topology::parse(&text.unwrap(), "t").unwrap();
        let single = parse(defaults.single());
        let replicated = parse(defaults.replicated());
        let disaggregated = parse(defaults.disaggregated());
        assert_eq!(cores(&single), vec![vec![0, 1, 2, 3]]);
        assert_eq!(cores(&replicated), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(cores(&disaggregated), vec![vec![0, 1], vec![2, 3]]);
        assert!(disaggregated.is_disaggregated() && !replicated.is_disaggregated());
        for t in [&single, &replicated, &disaggregated] {
            for w in &t.workers {
                assert_eq!(w.spec.kv_cache_memory.as_deref(), Some("256MiB"));
                assert_eq!(w.spec.extra_args, serve_args);
            }
        }
        assert_eq!(
            describe(&disaggregated),
            "router → prefill (cores 0,1, KV 256MiB) + decode (cores 2,3, KV 256MiB)"
        );
    }

    fn cores(t: &Checked) -> Vec<Vec<usize>> {
        t.workers.iter().map(|w| w.spec.cores.clone()).collect()
    }

    fn defaults_on(cores: Vec<usize>) -> DefaultTopologies<'static> {
        DefaultTopologies {
            cores,
            kv_cache_memory: "64MiB",
            model: None,
            serve_args: &[],
        }
    }

    #[test]
    fn an_odd_core_count_gives_every_layout_the_same_total() {
        // Three cores this process may use, not starting at 0 (as under taskset).
        let defaults = defaults_on(vec![1, 2, 3]);
        let parse = |text: Result<String>| topology::parse(&text.unwrap(), "t").unwrap();
        let total = |t: &Checked| -> usize { cores(t).iter().map(Vec::len).sum() };
        let single = parse(defaults.single());
        let replicated = parse(defaults.replicated());
        let disaggregated = parse(defaults.disaggregated());
        assert_eq!(cores(&single), vec![vec![1, 2]]);
        assert_eq!(cores(&replicated), vec![vec![1], vec![2]]);
        assert_eq!(cores(&disaggregated), vec![vec![1], vec![2]]);
        assert!(total(&single) == total(&replicated) && total(&single) == total(&disaggregated));
        let resources = defaults.resources();
        assert!(
            resources.starts_with("2 cores in all for every layout")
                && resources.contains("single: one worker on cores 1,2")
                && resources.contains("on cores 1 and on cores 2")
                && resources.contains("core 3 stays idle"),
            "{resources}"
        );
        // One core: every worker shares it.
        let one = defaults_on(vec![5]);
        assert_eq!(cores(&parse(one.single())), vec![vec![5]]);
        assert_eq!(cores(&parse(one.replicated())), vec![vec![5], vec![5]]);
        assert!(!one.resources().contains("idle"));
    }
}
