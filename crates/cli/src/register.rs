//! `tandem register`: keeps a worker that does not speak etcd (vLLM, any
//! OpenAI-compatible server) registered while its `/health` answers 200.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tandem_discovery::{HealthPolicy, KvEventsEndpoints, WorkerRecord, register_while_healthy};

use crate::announce::{self, DiscoveryFlags};

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// The worker's OpenAI-compatible endpoint, `http://host:port`, as routers reach it.
    #[arg(long)]
    url: String,
    #[command(flatten)]
    discovery: DiscoveryFlags,
    /// The model it serves (default: the first of its `/v1/models`).
    #[arg(long)]
    model: Option<String>,
    /// The engine's name, as announced.
    #[arg(long, default_value = "vllm")]
    engine: String,
    /// Its KV event PUB endpoint (`tcp://host:port`), for KV-aware routing.
    #[arg(long, value_name = "tcp://HOST:PORT")]
    kv_events: Option<String>,
    /// Its KV event replay endpoint (`tcp://host:port`).
    #[arg(long, value_name = "tcp://HOST:PORT", requires = "kv_events")]
    kv_replay: Option<String>,
    /// Milliseconds between health checks.
    #[arg(long, default_value_t = 1000)]
    health_interval_ms: u64,
    /// Failing checks in a row before the worker is deregistered.
    #[arg(long, default_value_t = 3)]
    health_failures: u32,
}

/// Longest wait for one health check or the model list.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub fn run(args: RegisterArgs) -> Result<()> {
    let Some(settings) = args.discovery.settings()? else {
        bail!("give --discovery etcd://HOST:PORT");
    };
    let url = announce::worker_url(&args.url)?;
    if args.health_interval_ms == 0 || args.health_failures == 0 {
        bail!("--health-interval-ms and --health-failures must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        let model = match args.model.clone() {
            Some(model) => model,
            None => served_model(&client, &url).await?,
        };
        let record = WorkerRecord {
            url: url.clone(),
            role: args.discovery.role,
            model,
            engine: args.engine.clone(),
            engine_id: None,
            kv_handoff: None,
            kv_events: args.kv_events.clone().map(|endpoint| KvEventsEndpoints {
                endpoint,
                replay_endpoint: args.kv_replay.clone(),
            }),
            capacity: None,
        };
        let policy = HealthPolicy {
            interval: Duration::from_millis(args.health_interval_ms),
            rise: 1,
            fall: args.health_failures,
        };
        eprintln!(
            "registering {url} as {} in {} while its /health answers",
            record.role.as_str(),
            settings.address
        );
        let health = format!("{url}/health");
        let probe = || {
            let request = client.get(&health).send();
            async move { request.await.is_ok_and(|r| r.status().is_success()) }
        };
        let stop = async {
            if let Err(err) = crate::serve::termination_signal().await {
                tracing::warn!(%err, "no signal handler; stopping");
            }
        };
        register_while_healthy(settings, record, policy, probe, stop).await?;
        eprintln!("deregistered {url}");
        Ok(())
    })
}

/// The first model the worker lists, waiting (bounded) for it to come up.
async fn served_model(client: &reqwest::Client, url: &str) -> Result<String> {
    let models = format!("{url}/v1/models");
    let mut last = String::new();
    for _ in 0..60 {
        match client.get(&models).send().await {
            Ok(response) if response.status().is_success() => {
                let listed: serde_json::Value = response.json().await?;
                if let Some(id) = listed["data"][0]["id"].as_str() {
                    return Ok(id.to_owned());
                }
                last = format!("no model in {listed}");
            }
            Ok(response) => last = format!("status {}", response.status()),
            Err(err) => last = err.to_string(),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bail!("{models} did not list a model within 60 s ({last}); give --model")
}
