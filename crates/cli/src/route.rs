//! `tandem route`: the router in front of workers. Settings come from `--config
//! router.toml` (the fields of `tandem_router::RouterConfig`), then the flags given on
//! the command line override them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tandem_router::RouterConfig;
use tandem_router::policy::PolicyKind;
use tokio::sync::Notify;

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
    /// Selection policy: round_robin, random, least_loaded, power_of_two, prefix
    /// [default: round_robin].
    #[arg(long)]
    policy: Option<PolicyKind>,
    /// Policy of the prefill pool (default: --policy).
    #[arg(long)]
    prefill_policy: Option<PolicyKind>,
    /// Policy of the decode pool (default: --policy).
    #[arg(long)]
    decode_policy: Option<PolicyKind>,
    /// Clients must send `Authorization: Bearer KEY`.
    #[arg(long, env = "TANDEM_API_KEY")]
    api_key: Option<String>,
    /// Enables the admin API (`/workers`) for `Authorization: Bearer TOKEN`.
    #[arg(long, env = "TANDEM_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Tries per leg, the first included [default: 3].
    #[arg(long)]
    max_attempts: Option<usize>,
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
    /// Seconds that requests in flight get to finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
}

impl RouteArgs {
    /// The config file's settings with the flags applied over them.
    fn config(&self) -> Result<RouterConfig> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
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
        if self.api_key.is_some() {
            config.api_key = self.api_key.clone();
        }
        if self.admin_token.is_some() {
            config.admin_token = self.admin_token.clone();
        }
        override_with(&mut config.retry.max_attempts, self.max_attempts);
        if self.local_prefill_threshold.is_some() {
            config.local_prefill_threshold = self.local_prefill_threshold;
        }
        if self.tokenizer.is_some() {
            config.tokenizer = self.tokenizer.clone();
        }
        override_with(&mut config.health.interval_ms, self.health_interval_ms);
        Ok(config)
    }
}

fn override_with<T>(field: &mut T, flag: Option<T>) {
    if let Some(value) = flag {
        *field = value;
    }
}

fn override_list(field: &mut Vec<String>, flag: &[String]) {
    if !flag.is_empty() {
        *field = flag.to_vec();
    }
}

pub fn run(args: RouteArgs) -> Result<()> {
    let config = args.config()?;
    let mode = config.validate()?;
    let metrics = tandem_router::metrics::install_recorder()
        .map_err(|e| tracing::warn!("metrics are disabled: {e}"))
        .ok();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let grace = Duration::from_secs(args.shutdown_timeout);
    let result = runtime.block_on(async move {
        let (host, port) = (config.host.clone(), config.port);
        let listener = tokio::net::TcpListener::bind((host.as_str(), port))
            .await
            .with_context(|| format!("listening on {host}:{port}"))?;
        let address = listener.local_addr()?;
        let stop = Arc::new(Notify::new());
        let shutdown = {
            let stop = stop.clone();
            async move { stop.notified().await }
        };
        let workers = config.workers.len() + config.prefill.len() + config.decode.len();
        let server = tandem_router::serve(config, listener, metrics, shutdown);
        tokio::pin!(server);
        eprintln!(
            "routing ({} mode, {workers} workers) on http://{address}",
            mode.as_str()
        );
        tokio::select! {
            result = &mut server => return result.context("routing"),
            signal = crate::serve::termination_signal() => signal?,
        }
        stop.notify_one();
        match tokio::time::timeout(grace, server).await {
            Ok(result) => result.context("routing"),
            Err(_) => Ok(()),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}
