//! `tandem up [FILE]`: starts a topology's workers and its router here, waits until
//! each is healthy, prints the endpoint, and stops everything it started on Ctrl-C or
//! SIGTERM. Without FILE: the embedded default, a built-in prefill worker and decode
//! worker on the default model, each pinned to its own core where this process may use
//! two (the first two of its affinity mask), behind the router in P/D mode.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tandem_engine::fetch;
use tandem_launch::plan;
use tandem_launch::prometheus;
use tandem_launch::run;
use tandem_launch::scale::Scaler;
use tandem_launch::secret::ClusterSecret;
use tandem_launch::stack::{Stack, StartOptions, StderrObserver};
use tandem_launch::topology::{self, Checked, Engine};

#[derive(Args)]
pub struct UpArgs {
    /// A topology file (TOML, see topologies/). Without it: the embedded default.
    file: Option<PathBuf>,
    /// The router's port (overrides the topology's).
    #[arg(long)]
    port: Option<u16>,
    /// Print every command instead of running it.
    #[arg(long)]
    dry_run: bool,
    /// Write each process's output to DIR/NAME.log instead of prefixing it here.
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// Start, send one chat request through the router, print the answer, stop.
    #[arg(long)]
    smoke: bool,
    /// Seconds each process gets to become healthy.
    #[arg(long, default_value_t = 180)]
    start_timeout: u64,
    /// The cluster secret of the built-in workers' KV hand-offs (a file holding one
    /// line of at least 16 bytes). Default: $TANDEM_KV_SECRET if set, else a fresh
    /// secret for this run.
    #[arg(long, value_name = "FILE")]
    kv_secret_file: Option<PathBuf>,
    /// Write a Prometheus configuration that scrapes this topology's router and
    /// workers to FILE (also with --dry-run); deploy/grafana/tandem.json reads it.
    #[arg(long, value_name = "FILE")]
    prometheus_config: Option<PathBuf>,
}

/// Set by SIGINT/SIGTERM.
static STOP: AtomicBool = AtomicBool::new(false);

/// The embedded default as a topology file (ports of the seed notebooks), its workers
/// pinned to the first two of `allowed` (the cores this process may use) if there are
/// two.
fn embedded_default(allowed: &[usize]) -> String {
    let (prefill_cores, decode_cores) = match allowed {
        [first, second, ..] => (
            format!("cores = [{first}]\n"),
            format!("cores = [{second}]\n"),
        ),
        _ => (String::new(), String::new()),
    };
    format!(
        r#"[router]
port = 8192

[[worker]]
engine = "builtin"
role = "prefill"
port = 8100
kv_port = 5600
{prefill_cores}
[[worker]]
engine = "builtin"
role = "decode"
port = 8200
kv_port = 5601
{decode_cores}"#
    )
}

/// The topology in `file`, or the embedded default.
pub fn load_topology(file: Option<&Path>) -> Result<Checked> {
    Ok(match file {
        Some(path) => topology::load(path)?,
        None => topology::parse(
            &embedded_default(&run::allowed_cores()),
            "the embedded default",
        )?,
    })
}

pub fn run(args: UpArgs) -> Result<()> {
    let mut topology = load_topology(args.file.as_deref())?;
    if let Some(port) = args.port {
        topology.set_router_port(port)?;
    }
    fill_default_models(&mut topology, !args.dry_run)?;
    let secret = ClusterSecret::resolve(args.kv_secret_file.as_deref())?;
    if let Some(path) = &args.prometheus_config {
        std::fs::write(path, prometheus::scrape_config(&topology))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("Prometheus configuration written to {}", path.display());
    }
    if args.dry_run {
        for launch in plan::plan(&topology, Path::new("tandem"), &secret) {
            println!("{}\n", launch.describe());
        }
        let standby = plan::slots(&topology, Path::new("tandem"), &secret);
        for slot in standby.iter().filter(|s| !s.started) {
            println!(
                "# standby: started when the planner asks\n{}\n",
                slot.launch.describe()
            );
        }
        return Ok(());
    }
    let tandem = std::env::current_exe().context("locating the tandem binary")?;
    let mut launches = plan::plan(&topology, &tandem, &secret);
    let slots = plan::slots(&topology, &tandem, &secret);
    let mut scaler = Scaler::prepare(&topology, &mut launches, slots)?;
    if let Some(dir) = &args.log_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the log directory {}", dir.display()))?;
    }
    run::stop_on_signals(&STOP);
    let options = StartOptions {
        log_dir: args.log_dir.as_deref(),
        limit: Duration::from_secs(args.start_timeout),
        stop: &STOP,
    };
    let mut observer = StderrObserver::new();
    let mut stack = Stack::start(&launches, &options, &mut observer)?;
    let result = serve(&args, &mut stack, |stack| {
        if let Some(scaler) = scaler.as_mut() {
            scaler.tick(stack, &options, &mut observer);
        }
    });
    eprintln!("stopping {} processes", stack.len());
    stack.stop();
    result
}

/// Built-in workers without a model get the default model (fetched if
/// `fetch_if_missing`); whether any did.
pub fn fill_default_models(topology: &mut Checked, fetch_if_missing: bool) -> Result<bool> {
    let needs_default = topology
        .workers
        .iter()
        .any(|w| w.spec.engine == Engine::Builtin && w.spec.model.is_none());
    if !needs_default {
        return Ok(false);
    }
    let path = if fetch_if_missing {
        fetch::fetch_default_model(&fetch::FetchOptions::default().with_stderr_progress())?
    } else {
        fetch::default_model_path()
    };
    for worker in &mut topology.workers {
        if worker.spec.engine == Engine::Builtin && worker.spec.model.is_none() {
            worker.spec.model = Some(path.display().to_string());
        }
    }
    Ok(true)
}

/// Prints the endpoint; then the smoke request, or waits for a signal or a death,
/// calling `tick` (the planner's scaler) meanwhile.
fn serve(args: &UpArgs, stack: &mut Stack, mut tick: impl FnMut(&mut Stack)) -> Result<()> {
    let endpoint = stack.endpoint().to_owned();
    eprintln!("\ntandem is up: {endpoint}  (Ctrl-C stops everything it started)\n");
    println!(
        "curl -s {endpoint}/v1/chat/completions -H 'Content-Type: application/json' \\\n  -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Explain how HTTP load balancers work in 3 sentences.\"}}],\"max_tokens\":100}}'"
    );
    if args.smoke {
        return smoke_request(&endpoint);
    }
    while !STOP.load(Ordering::Relaxed) {
        stack.check_alive()?;
        tick(stack);
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// One chat request through the router; prints the answer.
fn smoke_request(endpoint: &str) -> Result<()> {
    let agent = run::http_agent(Duration::from_secs(120));
    let body = serde_json::json!({
        "messages": [{"role": "user",
            "content": "Explain how HTTP load balancers work in 3 sentences."}],
        "max_tokens": 100,
        "temperature": 0,
    });
    let mut response = agent
        .post(&format!("{endpoint}/v1/chat/completions"))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .context("sending the request through the router")?;
    let status = response.status();
    let text = response.body_mut().read_to_string()?;
    if !status.is_success() {
        bail!("the router answered {status}: {text}");
    }
    let answer: serde_json::Value = serde_json::from_str(&text)?;
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    println!("\n{content}\n");
    eprintln!("usage: {}", answer["usage"]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_is_a_valid_1p1d_topology() {
        for cores in [vec![0], vec![0, 1], (0..16).collect()] {
            let topology = topology::parse(&embedded_default(&cores), "default").unwrap();
            assert!(topology.is_disaggregated());
            assert_eq!(topology.router.port, 8192);
            let ports: Vec<_> = topology
                .workers
                .iter()
                .map(|w| (w.spec.port, w.spec.kv_port))
                .collect();
            assert_eq!(ports, vec![(8100, Some(5600)), (8200, Some(5601))]);
            let pinned = topology.workers[0].spec.cores.len() == 1;
            assert_eq!(pinned, cores.len() >= 2);
        }
    }

    #[test]
    fn the_embedded_default_pins_to_cores_this_process_may_use() {
        // As under `taskset -c 2,5,7`: not cores 0 and 1.
        let topology = topology::parse(&embedded_default(&[2, 5, 7]), "default").unwrap();
        let cores: Vec<&[usize]> = topology
            .workers
            .iter()
            .map(|w| w.spec.cores.as_slice())
            .collect();
        assert_eq!(cores, [&[2][..], &[5][..]]);
    }
}
