//! `tandem route`: the router in front of workers. Settings come from `--config
//! router.toml` (the fields of `tandem_router::RouterConfig`), then the flags given on
//! the command line override them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tandem_router::config::{DiscoveryConfig, KvEventsSource, default_namespace};
use tandem_router::policy::PolicyKind;
use tandem_router::{ClientParamsPolicy, RouterConfig, Secret};
use tokio::sync::watch;

#[derive(Args)]
pub struct RouteArgs {
    /// A TOML file with the router's settings (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on [config default: 127.0.0.1].
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on (0: any free port, printed when ready) [default: 8192].
    #[arg(long)]
    port: Option<u16>,
    /// A worker of replicated mode (repeat for more; one = single mode).
    #[arg(long = "worker", value_name = "URL")]
    workers: Vec<String>,
    /// A prefill worker of disaggregated mode (repeat for more).
    #[arg(long = "prefill", value_name = "URL")]
    prefill: Vec<String>,
    /// A decode worker of disaggregated mode (repeat for more).
    #[arg(long = "decode", value_name = "URL")]
    decode: Vec<String>,
    /// Selection policy: round_robin, random, least_loaded, power_of_two, prefix,
    /// kv_aware (from the workers' KV events, see --kv-events) [default: round_robin].
    #[arg(long)]
    policy: Option<PolicyKind>,
    /// Policy of the prefill pool (default: --policy).
    #[arg(long)]
    prefill_policy: Option<PolicyKind>,
    /// Policy of the decode pool (default: --policy).
    #[arg(long)]
    decode_policy: Option<PolicyKind>,
    /// kv_aware: weight of a block of prompt still to compute against a block of work
    /// the worker already has in flight; 0 ignores the cache [default: 2.0].
    #[arg(long, value_name = "WEIGHT")]
    kv_aware_overlap_weight: Option<f64>,
    /// kv_aware: 0 picks the cheapest worker; above 0 draws by a softmax over costs,
    /// so that several routers do not herd onto one worker [default: 0].
    #[arg(long, value_name = "T")]
    kv_aware_temperature: Option<f64>,
    /// Clients must send `Authorization: Bearer KEY`.
    #[arg(long, env = "TANDEM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Enables the admin API (`/workers`) for `Authorization: Bearer TOKEN`.
    #[arg(long, env = "TANDEM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Sent to every worker as `Authorization: Bearer KEY` (workers started with
    /// `--api-key KEY`); the client's own `Authorization` is never forwarded.
    #[arg(long, env = "TANDEM_WORKER_API_KEY", hide_env_values = true)]
    worker_api_key: Option<String>,
    /// What a client's own `kv_transfer_params` get: `strip` (removed) or `reject`
    /// (a 400) [default: strip].
    #[arg(long, value_name = "POLICY")]
    client_kv_transfer_params: Option<ClientParamsPolicy>,
    /// P/D mode: answer 503 when no prefill worker can be reached, instead of letting
    /// the decode worker compute the prompt.
    #[arg(long)]
    require_prefill: bool,
    /// Tries per leg, the first included [default: 3].
    #[arg(long)]
    max_attempts: Option<usize>,
    /// How many times a streamed answer whose worker fails mid-stream may continue on
    /// another worker, from the tokens already sent [default: 0, never].
    #[arg(long, value_name = "N")]
    migration_limit: Option<u32>,
    /// Milliseconds between active health checks [default: 2000].
    #[arg(long)]
    health_interval_ms: Option<u64>,
    /// P/D mode: send prompts with fewer uncached tokens than this (on the decode
    /// worker chosen first) straight to the decode worker.
    #[arg(long, value_name = "TOKENS")]
    local_prefill_threshold: Option<usize>,
    /// The model's tokenizer.json, to count prompt tokens exactly (else ~4 chars/token).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Largest request body: bytes, or with a suffix (KiB, MiB, …); larger bodies get
    /// 413. Keep it below the workers' limit [config default: 8MiB less 256KiB].
    #[arg(long, value_parser = crate::serve::parse_byte_size)]
    max_body_bytes: Option<usize>,
    /// Bytes of request bodies held at once, from a body's first byte until its
    /// answer begins; past it, requests get 503 with `Retry-After` before their body
    /// is read [config default: 128MiB].
    #[arg(long, value_parser = crate::serve::parse_byte_size)]
    max_body_bytes_in_flight: Option<usize>,
    /// Seconds a client connection gets to send complete request headers; then it is
    /// closed. Also the longest a kept-alive connection stays idle [default: 10].
    #[arg(long)]
    header_read_timeout_secs: Option<u64>,
    /// Seconds a request gets to send its whole body once its headers are in; then it
    /// gets 408 [default: 30].
    #[arg(long)]
    body_read_timeout_secs: Option<u64>,
    /// Follow a worker's KV cache events: `WORKER_URL=tcp://host:port`, its vLLM
    /// `--kv-events-config` endpoint (repeat per worker; replaces the config file's
    /// `[[kv_events]]`).
    #[arg(long = "kv-events", value_name = "WORKER_URL=ENDPOINT")]
    kv_events: Vec<String>,
    /// A followed worker's replay socket, to fill gaps: `WORKER_URL=tcp://host:port`
    /// (vLLM's `replay_endpoint`; repeat per worker).
    #[arg(long = "kv-replay", value_name = "WORKER_URL=ENDPOINT")]
    kv_replay: Vec<String>,
    /// Follow the workers registered in etcd (`etcd://HOST:PORT[,…]`): they join the
    /// pool when they register and leave it, drained, when their keys go
    /// (docs/discovery.md). Static workers may be given too.
    #[arg(long, value_name = "etcd://HOST:PORT")]
    discovery: Option<String>,
    /// The etcd namespace to follow [default: default].
    #[arg(long, requires = "discovery")]
    discovery_namespace: Option<String>,
    /// With --discovery: a P/D pool (registered prefill and decode workers), not a
    /// replicated one (workers of role `both`). Implied by --prefill/--decode.
    #[arg(long, requires = "discovery")]
    discovery_disaggregated: bool,
    /// With --discovery: only workers that serve this model.
    #[arg(long, requires = "discovery")]
    discovery_model: Option<String>,
    #[command(flatten)]
    planner: PlannerArgs,
    /// `/metrics` also carries every worker's own series, labelled `worker="<url>"`
    /// (fetched at each scrape, 2 s limit per worker), for clients that scrape one
    /// endpoint.
    #[arg(long)]
    federate_worker_metrics: bool,
    /// The topic the workers publish KV events under [default: ""].
    #[arg(long)]
    kv_events_topic: Option<String>,
    /// Seconds that requests in flight get to finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
    /// Router threads, each with its own listener and connection pool (default: all
    /// available cores).
    #[arg(long)]
    threads: Option<usize>,
}

impl RouteArgs {
    /// The config file's settings with the flags applied over them.
    fn config(&self) -> Result<RouterConfig> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                parse_config(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => RouterConfig::default(),
        };
        override_with(&mut config.host, self.host.clone());
        override_with(&mut config.port, self.port);
        override_list(&mut config.workers, &self.workers);
        override_list(&mut config.prefill, &self.prefill);
        override_list(&mut config.decode, &self.decode);
        override_with(&mut config.policy, self.policy);
        if self.prefill_policy.is_some() {
            config.prefill_policy = self.prefill_policy;
        }
        if self.decode_policy.is_some() {
            config.decode_policy = self.decode_policy;
        }
        override_with(
            &mut config.kv_aware.overlap_weight,
            self.kv_aware_overlap_weight,
        );
        override_with(&mut config.kv_aware.temperature, self.kv_aware_temperature);
        override_secret(&mut config.api_key, &self.api_key);
        override_secret(&mut config.admin_token, &self.admin_token);
        override_secret(&mut config.worker_api_key, &self.worker_api_key);
        override_with(
            &mut config.client_kv_transfer_params,
            self.client_kv_transfer_params,
        );
        config.require_prefill |= self.require_prefill;
        config.federate_worker_metrics |= self.federate_worker_metrics;
        override_with(&mut config.retry.max_attempts, self.max_attempts);
        override_with(&mut config.migration_limit, self.migration_limit);
        if self.local_prefill_threshold.is_some() {
            config.local_prefill_threshold = self.local_prefill_threshold;
        }
        if self.tokenizer.is_some() {
            config.tokenizer = self.tokenizer.clone();
        }
        override_with(&mut config.health.interval_ms, self.health_interval_ms);
        override_with(&mut config.max_body_bytes, self.max_body_bytes);
        override_with(
            &mut config.max_body_bytes_in_flight,
            self.max_body_bytes_in_flight,
        );
        override_with(
            &mut config.header_read_timeout_secs,
            self.header_read_timeout_secs,
        );
        override_with(
            &mut config.body_read_timeout_secs,
            self.body_read_timeout_secs,
        );
        override_with(&mut config.kv_events_topic, self.kv_events_topic.clone());
        apply_kv_flags(&mut config.kv_events, &self.kv_events, &self.kv_replay)?;
        self.apply_discovery_flags(&mut config);
        self.apply_planner_flags(&mut config);
        Ok(config)
    }
}

/// The online planner's settings (docs/planner.md); any of them turns it on, the
/// others come from `[planner]` in --config or their defaults.
#[derive(Debug, Args)]
#[command(next_help_heading = "Online planner (P/D mode)")]
pub struct PlannerArgs {
    /// Run the online planner: it moves workers between the P/D pools to keep the SLO
    /// below (each flag below also turns it on).
    #[arg(long)]
    planner: bool,
    /// Time-to-first-token limit, seconds [default: 2].
    #[arg(long, value_name = "SECS")]
    planner_ttft: Option<f64>,
    /// Time-per-output-token limit, seconds [default: 0.1].
    #[arg(long, value_name = "SECS")]
    planner_tpot: Option<f64>,
    /// The percentile held to the limits, 0..1 [default: 0.9].
    #[arg(long, value_name = "P")]
    planner_percentile: Option<f64>,
    /// Milliseconds between verdicts [default: 2000].
    #[arg(long, value_name = "MS")]
    planner_interval_ms: Option<u64>,
    /// Seconds of finished requests each verdict judges [default: 20].
    #[arg(long, value_name = "SECS")]
    planner_window_secs: Option<u64>,
    /// Fewest finished requests a verdict needs [default: 8].
    #[arg(long, value_name = "N")]
    planner_min_samples: Option<usize>,
    /// Identical verdicts in a row before a worker moves [default: 3].
    #[arg(long, value_name = "N")]
    planner_confirm: Option<u32>,
    /// Seconds after a move before another [default: 30].
    #[arg(long, value_name = "SECS")]
    planner_cooldown_secs: Option<u64>,
    /// Share of its limit the giving pool may reach with one worker fewer [default: 0.9].
    #[arg(long, value_name = "SHARE")]
    planner_headroom: Option<f64>,
    /// Share of their KV caches a pool's workers may fill, on average, once it has
    /// given up a worker (moved or stopped) [default: 0.9].
    #[arg(long, value_name = "SHARE")]
    planner_kv_headroom: Option<f64>,
    /// Seconds a moving worker's requests get to finish [default: 120].
    #[arg(long, value_name = "SECS")]
    planner_drain_limit_secs: Option<u64>,
    /// Slot budget: workers both pools may have together. The planner then asks for
    /// workers to be started (`GET /planner`'s `wanted`; `tandem up` starts its standby
    /// workers) and stops idle ones [default: none, moves only].
    #[arg(long, value_name = "N")]
    planner_max_workers: Option<usize>,
    /// With a budget: stop a worker when every figure stays under this share of its
    /// limit with one worker fewer [default: 0.5].
    #[arg(long, value_name = "SHARE")]
    planner_stop_below: Option<f64>,
    /// Seconds a worker asked for gets to join its pool [default: 180].
    #[arg(long, value_name = "SECS")]
    planner_start_limit_secs: Option<u64>,
}

impl RouteArgs {
    /// Any planner flag turns the planner on (with `[planner]`'s or default
    /// settings), then overrides its field.
    fn apply_planner_flags(&self, config: &mut RouterConfig) {
        let flags = &self.planner;
        let given = flags.planner
            || flags.planner_ttft.is_some()
            || flags.planner_tpot.is_some()
            || flags.planner_percentile.is_some()
            || flags.planner_interval_ms.is_some()
            || flags.planner_window_secs.is_some()
            || flags.planner_min_samples.is_some()
            || flags.planner_confirm.is_some()
            || flags.planner_cooldown_secs.is_some()
            || flags.planner_headroom.is_some()
            || flags.planner_kv_headroom.is_some()
            || flags.planner_drain_limit_secs.is_some()
            || flags.planner_max_workers.is_some()
            || flags.planner_stop_below.is_some()
            || flags.planner_start_limit_secs.is_some();
        if !given {
            return;
        }
        let planner = config.planner.get_or_insert_with(Default::default);
        override_with(&mut planner.ttft_secs, flags.planner_ttft);
        override_with(&mut planner.tpot_secs, flags.planner_tpot);
        override_with(&mut planner.percentile, flags.planner_percentile);
        override_with(&mut planner.interval_ms, flags.planner_interval_ms);
        override_with(&mut planner.window_secs, flags.planner_window_secs);
        override_with(&mut planner.min_samples, flags.planner_min_samples);
        override_with(&mut planner.confirm, flags.planner_confirm);
        override_with(&mut planner.cooldown_secs, flags.planner_cooldown_secs);
        override_with(&mut planner.headroom, flags.planner_headroom);
        override_with(&mut planner.kv_headroom, flags.planner_kv_headroom);
        override_with(
            &mut planner.drain_limit_secs,
            flags.planner_drain_limit_secs,
        );
        if flags.planner_max_workers.is_some() {
            planner.max_workers = flags.planner_max_workers;
        }
        override_with(&mut planner.stop_below, flags.planner_stop_below);
        override_with(
            &mut planner.start_limit_secs,
            flags.planner_start_limit_secs,
        );
    }

    /// `--discovery` replaces the config file's `[discovery]` table; the other
    /// discovery flags then override its fields.
    fn apply_discovery_flags(&self, config: &mut RouterConfig) {
        if let Some(etcd) = &self.discovery {
            config.discovery = Some(DiscoveryConfig {
                etcd: etcd.clone(),
                namespace: default_namespace(),
                disaggregated: false,
                model: None,
            });
        }
        if let Some(discovery) = config.discovery.as_mut() {
            override_with(&mut discovery.namespace, self.discovery_namespace.clone());
            discovery.disaggregated |= self.discovery_disaggregated;
            if self.discovery_model.is_some() {
                discovery.model = self.discovery_model.clone();
            }
        }
    }
}

/// A config file's parse error without toml's quote of the offending line: that line
/// may hold a key or token (`api_key = "…"` under a misspelt name).
#[derive(Debug, thiserror::Error)]
#[error("{message} (line {line})")]
struct ConfigParseError {
    message: String,
    line: usize,
}

fn parse_config(text: &str) -> Result<RouterConfig, ConfigParseError> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let offset = e.span().map_or(0, |span| span.start);
        ConfigParseError {
            message: e.message().to_owned(),
            line: text[..offset.min(text.len())].matches('\n').count() + 1,
        }
    })
}

/// `--kv-events` replaces the config file's streams; `--kv-replay` then sets the
/// replay endpoint of a stream given either way.
fn apply_kv_flags(
    sources: &mut Vec<KvEventsSource>,
    events: &[String],
    replays: &[String],
) -> Result<()> {
    if !events.is_empty() {
        *sources = events
            .iter()
            .map(|flag| {
                let (worker, endpoint) = split_kv_flag("--kv-events", flag)?;
                Ok(KvEventsSource {
                    worker,
                    endpoint,
                    replay_endpoint: None,
                })
            })
            .collect::<Result<_>>()?;
    }
    for flag in replays {
        let (worker, endpoint) = split_kv_flag("--kv-replay", flag)?;
        let worker = tandem_router::config::normalize_url(&worker)?;
        let source = sources
            .iter_mut()
            .find(|source| {
                tandem_router::config::normalize_url(&source.worker).ok() == Some(worker.clone())
            })
            .with_context(|| format!("--kv-replay for {worker}, which has no --kv-events"))?;
        source.replay_endpoint = Some(endpoint);
    }
    Ok(())
}

/// `WORKER_URL=ENDPOINT`, split at the `=` (URLs and ZMQ endpoints hold none).
fn split_kv_flag(flag: &str, value: &str) -> Result<(String, String)> {
    let (worker, endpoint) = value
        .split_once('=')
        .with_context(|| format!("{flag} takes WORKER_URL=tcp://host:port, not `{value}`"))?;
    Ok((worker.trim().to_owned(), endpoint.trim().to_owned()))
}

fn override_with<T>(field: &mut T, flag: Option<T>) {
    if let Some(value) = flag {
        *field = value;
    }
}

fn override_secret(field: &mut Option<Secret>, flag: &Option<String>) {
    if let Some(value) = flag {
        *field = Some(Secret::new(value.clone()));
    }
}

fn override_list(field: &mut Vec<String>, flag: &[String]) {
    if !flag.is_empty() {
        *field = flag.to_vec();
    }
}

pub fn run(args: RouteArgs) -> Result<()> {
    if let Err(err) = tandem_httpd::raise_open_files_limit() {
        tracing::warn!(%err, "could not raise the open files limit");
    }
    let config = args.config()?;
    let mode = config.validate()?;
    let metrics = tandem_router::metrics::install_recorder()
        .map_err(|e| tracing::warn!("metrics are disabled: {e}"))
        .ok();
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    if threads == 0 {
        anyhow::bail!("--threads must be at least 1");
    }
    let (stop, shutdown) = watch::channel(false);
    let (installed, handlers_ready) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("tandem-signals".into())
        .spawn(move || wait_for_termination(stop, installed))
        .context("starting the signal thread")?;
    // A SIGTERM before the handlers exist would kill the router outright.
    let _ = handlers_ready.recv();
    let workers = config.workers.len() + config.prefill.len() + config.decode.len();
    let grace = Duration::from_secs(args.shutdown_timeout);
    let announce = |address| {
        eprintln!(
            "routing ({} mode, {workers} workers, {threads} threads) on http://{address}",
            mode.as_str()
        )
    };
    tandem_router::run(config, metrics, threads, grace, announce, shutdown).context("routing")
}

/// Turns `stop` true on SIGTERM or SIGINT; says on `installed` once it listens.
fn wait_for_termination(stop: watch::Sender<bool>, installed: std::sync::mpsc::Sender<()>) {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = runtime.map_err(anyhow::Error::from).and_then(|runtime| {
        runtime.block_on(async {
            let mut terminate = signal(SignalKind::terminate())?;
            let mut interrupt = signal(SignalKind::interrupt())?;
            let _ = installed.send(());
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            anyhow::Ok(())
        })
    });
    if let Err(err) = result {
        tracing::error!(%err, "no signal handling: the router stops only when killed");
        return;
    }
    eprintln!("shutting down: letting requests in flight finish");
    let _ = stop.send(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parse_errors_do_not_quote_the_file() {
        let err = parse_config("port = 1\napikey = \"never-printed\"\n").unwrap_err();
        let text = err.to_string();
        assert!(!text.contains("never-printed"), "{text}");
        assert!(text.contains("apikey") && text.contains("line 2"), "{text}");
    }

    #[test]
    fn kv_flags_replace_the_file_streams_and_attach_replays() {
        let text = "workers = [\"http://a:1\", \"http://b:1\"]\n\
                    kv_events_topic = \"kv\"\n\
                    [[kv_events]]\nworker = \"http://a:1\"\nendpoint = \"tcp://a:5557\"\n\
                    [kv_index]\nmax_blocks = 1000\nstale_after_secs = 3\n";
        let mut config = parse_config(text).unwrap();
        assert_eq!(config.kv_events.len(), 1);
        assert_eq!(config.kv_index.max_blocks, 1000);
        assert!(config.validate().is_ok());
        let events = ["http://b:1/=tcp://b:5557".to_owned()];
        let replays = ["http://b:1=tcp://b:5558".to_owned()];
        apply_kv_flags(&mut config.kv_events, &events, &replays).unwrap();
        assert_eq!(
            config.kv_events,
            vec![KvEventsSource {
                worker: "http://b:1/".into(),
                endpoint: "tcp://b:5557".into(),
                replay_endpoint: Some("tcp://b:5558".into()),
            }]
        );
        assert!(config.validate().is_ok());
        let orphan = ["http://a:1=tcp://a:5558".to_owned()];
        assert!(apply_kv_flags(&mut config.kv_events, &[], &orphan).is_err());
        assert!(apply_kv_flags(&mut config.kv_events, &["http://a:1".into()], &[]).is_err());
    }
}
