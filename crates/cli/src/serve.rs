//! `tandem serve`: the built-in engine behind its OpenAI-compatible HTTP API. Loads the
//! model, starts the engine loop and the KV hand-off (a listener for decode workers
//! with `--kv-port`; pulls from prefill workers always), serves until SIGTERM or SIGINT,
//! then stops accepting connections and lets the requests in flight finish (within a
//! bound).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tandem_discovery::{Capacity, Registration, RegistrationSettings, WorkerRecord};

use crate::announce::{self, DiscoveryFlags};
use clap::{Args, ValueEnum};
use tandem_engine::LoadedModel;
use tandem_engine::api::{self, HandoffInfo, ServedModel, ServerState};
use tandem_engine::exec::{Device, Quantization, WeightDtype, WeightFormat};
use tandem_engine::fetch;
use tandem_engine::kv::{self, KvDtype, KvOptions};
use tandem_engine::kv_events::{self, KvEventSink, KvEventsConfig, SocketMode};
use tandem_engine::loaded::Placement;
use tandem_engine::metrics::install_prometheus_recorder;
use tandem_engine::model::LoadOptions;
use tandem_engine::sched::{self, EngineConfig, EngineHandle, HandoffLinks};
use tandem_engine::tools::ToolCallFormat;
use tandem_engine::transfer::{
    self, ClusterSecret, Fingerprint, KvServer, LeaseTable, Limits, LoadFailurePolicy, auth,
};
use tandem_httpd::{DEFAULT_BODY_READ_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT, HttpLimits};
use tokio::sync::{Notify, mpsc};

#[derive(Args)]
pub struct ServeArgs {
    /// A `.gguf` file or a Hugging Face folder. Default: the cached default model
    /// (`tandem model fetch`). With `--load-format dummy`: a preset name.
    #[arg(long)]
    model: Option<PathBuf>,
    /// `auto`: --model is a file or folder. `dummy`: --model names a preset
    /// (llama-3.1-8b, llama-3.1-70b, llama-3.2-1b, smollm2-135m) whose exact shapes get
    /// random f16 weights, as vLLM's `--load-format dummy`: for measuring speed and
    /// memory at a model's size. Its text is meaningless.
    #[arg(long, value_enum, default_value_t = LoadFormat::Auto)]
    load_format: LoadFormat,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed when ready).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The model name clients use (default: the model file's stem or folder name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most tokens (prompt plus output) of one request. Default: the model's context
    /// length, lowered to what the KV cache holds.
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Most sequences in one batch.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// Most tokens (decodes and prefill chunks) in one forward pass.
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Token positions per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Memory for the KV cache: bytes, or with a suffix (KiB, MiB, GiB, KB, MB, GB).
    /// Default: 1GiB on the CPU; on a GPU, what --gpu-memory-utilization leaves.
    #[arg(long, value_parser = parse_byte_size)]
    kv_cache_memory: Option<usize>,
    /// Where the model runs: cpu, or cuda / cuda:N (a build with `--features
    /// tandem-cli/cuda`, docs/gpu.md).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// GPU only: the fraction of the GPU's memory this worker may use for weights,
    /// buffers and KV cache together (vLLM's meaning); the KV cache gets the rest.
    /// Ignored when --kv-cache-memory is given.
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f32,
    /// GPU only: the weights' element type (auto: f16 for GGUF files, bf16 for
    /// Hugging Face folders and dummy presets).
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    dtype: DtypeArg,
    /// GPU only: store the layers' matrices as FP8 (E4M3) with one scale per matrix,
    /// quantizing each product's activations on the fly (vLLM's `--quantization fp8`;
    /// compute capability 8.9 or newer): fp8 or none. Halves the weights' bytes per
    /// decode step.
    #[arg(long, short = 'q', default_value = "none")]
    quantization: Quantization,
    /// GPU only: launch every step's kernels instead of replaying decode steps from
    /// CUDA graphs.
    #[arg(long)]
    enforce_eager: bool,
    /// Do not reuse the KV blocks of prompt prefixes seen before.
    #[arg(long)]
    no_prefix_caching: bool,
    /// Compute threads (default: all available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Element type of the KV cache.
    #[arg(long, value_enum, default_value_t = KvCacheDtype::F16)]
    kv_cache_dtype: KvCacheDtype,
    /// Seconds that requests in flight get to finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
    /// Clients of the `/v1/*` routes, `/tokenize` and `/detokenize` must send
    /// `Authorization: Bearer KEY` (else 401), as with vLLM's `--api-key`; `/health`
    /// and `/metrics` stay open.
    #[arg(long, env = "VLLM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// How the model writes tool calls, to read them out of its output (`tools` with
    /// `tool_choice: "auto"`) and to tell a model whose chat template has no place
    /// for tools how to call them: `hermes` (`<tool_call>{...}</tool_call>`) or
    /// `llama3_json` (vLLM's names).
    #[arg(long, default_value_t = ToolCallFormat::Hermes)]
    tool_call_parser: ToolCallFormat,
    /// Largest request body: bytes, or with a suffix (KiB, MiB, …). Larger bodies get
    /// 413, from `Content-Length` before they are read.
    #[arg(long, value_parser = parse_byte_size, default_value = "8MiB")]
    max_body_bytes: usize,
    /// Bytes of request bodies held at once (a body's `Content-Length`, or
    /// --max-body-bytes when it is chunked), from its first byte until its answer
    /// begins; past it, requests get 503 with `Retry-After` before their body is read.
    #[arg(long, value_parser = parse_byte_size, default_value = "128MiB")]
    max_body_bytes_in_flight: usize,
    /// Seconds a connection gets to send complete request headers; then it is closed.
    /// Also the longest a kept-alive connection stays idle.
    #[arg(long, default_value_t = DEFAULT_HEADER_READ_TIMEOUT.as_secs())]
    header_read_timeout_secs: u64,
    /// Seconds a request gets to send its whole body once its headers are in; then it
    /// gets 408 and the connection is closed.
    #[arg(long, default_value_t = DEFAULT_BODY_READ_TIMEOUT.as_secs())]
    body_read_timeout_secs: u64,
    /// Port of the KV hand-off listener that decode workers read prefilled KV from
    /// (0: any free port). Without it this worker cannot be a prefill leg.
    #[arg(long)]
    kv_port: Option<u16>,
    /// Address decode workers reach the hand-off listener at (`remote_host`). Default:
    /// `--host`, or 127.0.0.1 when that is a wildcard address.
    #[arg(long)]
    kv_host: Option<String>,
    /// This worker's hand-off identity (`remote_engine_id`). Default: a fresh UUID.
    #[arg(long)]
    engine_id: Option<String>,
    /// Seconds a prefill leg's KV is held for its decode worker without a heartbeat.
    #[arg(long, default_value_t = 30.0)]
    kv_lease_secs: f64,
    /// What a decode leg does when its KV cannot be pulled.
    #[arg(long, value_enum, default_value_t = FailurePolicy::Recompute)]
    kv_load_failure_policy: FailurePolicy,
    /// A file holding the cluster's KV secret (its trimmed contents, at least 16 bytes;
    /// the same on every worker of the cluster). Without it, the TANDEM_KV_SECRET
    /// environment variable holds the secret itself. Needed with --kv-port, and to
    /// take decode legs: it signs and checks kv_transfer_params and authenticates the
    /// hand-off port.
    #[arg(long, value_name = "PATH")]
    kv_secret_file: Option<PathBuf>,
    /// Publish the prefix cache's block events over ZMQ in vLLM's format: vLLM's
    /// `KVEventsConfig` as JSON, e.g. `{"enable_kv_cache_events": true, "endpoint":
    /// "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}` (keys: enable_kv_cache_events,
    /// publisher, endpoint, replay_endpoint, buffer_steps, hwm, max_queue_size, topic;
    /// docs/kv-events.md). The stream carries prompt token ids and has no
    /// authentication: bind it to a private interface.
    #[arg(long, value_name = "JSON", value_parser = KvEventsConfig::from_json)]
    kv_events_config: Option<KvEventsConfig>,
    #[command(flatten)]
    discovery: DiscoveryFlags,
    /// The host routers and other workers reach this worker at, as announced in etcd.
    /// Default: --host, or 127.0.0.1 when that is a wildcard address.
    #[arg(long)]
    advertise_host: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FailurePolicy {
    /// Compute the prompt locally (logged and counted).
    Recompute,
    /// Fail the request (HTTP 500, or an error event when streaming).
    Fail,
}

impl From<FailurePolicy> for LoadFailurePolicy {
    fn from(policy: FailurePolicy) -> Self {
        match policy {
            FailurePolicy::Recompute => LoadFailurePolicy::Recompute,
            FailurePolicy::Fail => LoadFailurePolicy::Fail,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KvCacheDtype {
    F16,
    F32,
}

impl From<KvCacheDtype> for KvDtype {
    fn from(dtype: KvCacheDtype) -> Self {
        match dtype {
            KvCacheDtype::F16 => KvDtype::F16,
            KvCacheDtype::F32 => KvDtype::F32,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LoadFormat {
    Auto,
    Dummy,
}

/// The model, the name it is served under by default, and its identity for the hand-off.
fn load_model(args: &ServeArgs) -> Result<(LoadedModel, String, String)> {
    if args.load_format == LoadFormat::Dummy {
        let preset =
            args.model.as_deref().and_then(Path::to_str).context(
                "--load-format dummy needs --model PRESET (llama-3.1-8b, llama-3.2-1b, …)",
            )?;
        tandem_engine::model::dummy::Preset::find(preset)?;
        let tokenizer = fetch::default_model_path();
        if !tokenizer.is_file() {
            bail!(
                "--load-format dummy borrows the default model's tokenizer, which is not at {}: run `tandem model fetch`",
                tokenizer.display()
            );
        }
        let loaded = LoadedModel::dummy(preset, &tokenizer, placement(args))?;
        tracing::warn!(
            preset,
            "serving random weights (--load-format dummy): the text is meaningless"
        );
        let identity = format!("dummy:{preset}:seed{}", tandem_engine::loaded::DUMMY_SEED);
        return Ok((loaded, preset.to_owned(), identity));
    }
    let path = fetch::resolve_model(args.model.as_deref())?;
    let loaded = LoadedModel::load_on(&path, placement(args))
        .with_context(|| format!("loading {}", path.display()))?;
    let identity = transfer::model_identity(&path)
        .with_context(|| format!("reading {} for its identity", path.display()))?;
    Ok((loaded, default_served_name(&path), identity))
}

fn placement(args: &ServeArgs) -> Placement {
    Placement {
        device: args.device,
        weights: WeightFormat {
            dtype: args.dtype.weight_dtype(),
            quantization: args.quantization,
        },
        options: LoadOptions::default(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DtypeArg {
    Auto,
    F16,
    Bf16,
}

impl DtypeArg {
    fn weight_dtype(self) -> Option<WeightDtype> {
        match self {
            DtypeArg::Auto => None,
            DtypeArg::F16 => Some(WeightDtype::F16),
            DtypeArg::Bf16 => Some(WeightDtype::Bf16),
        }
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    if let Err(err) = tandem_httpd::raise_open_files_limit() {
        tracing::warn!(%err, "could not raise the open files limit");
    }
    if args.device != Device::Cpu && !tandem_engine::exec::GPU_SUPPORT {
        bail!(
            "--device {}: this tandem was built without GPU support; build it with \
             `cargo build --release --features tandem-cli/cuda` (see docs/gpu.md)",
            args.device
        );
    }
    if args.device != Device::Cpu
        && !(args.gpu_memory_utilization > 0.0 && args.gpu_memory_utilization <= 1.0)
    {
        bail!("--gpu-memory-utilization must be in (0, 1]");
    }
    if args.device == Device::Cpu && args.quantization != Quantization::None {
        bail!(
            "--quantization is for GPU workers (--device cuda): the CPU engine runs a \
             GGUF file's own quantization"
        );
    }
    let limits = http_limits(&args)?;
    let registration = args.discovery.settings()?;
    let secret = ClusterSecret::from_file_or_env(args.kv_secret_file.as_deref())?;
    if args.kv_port.is_some() && secret.is_none() {
        bail!(
            "--kv-port serves KV only to workers that hold the cluster's KV secret, and \
             none is set: {}",
            auth::HOW_TO_CONFIGURE
        );
    }
    crate::select_cpu_kernels()?;
    let (loaded, default_name, identity) = load_model(&args)?;
    let kv = KvOptions {
        block_size: args.block_size,
        dtype: args.kv_cache_dtype.into(),
    };
    if kv.block_size == 0 {
        bail!("--block-size must be at least 1");
    }
    let kv_bytes = match (args.device, args.kv_cache_memory) {
        (_, Some(bytes)) => Some(bytes),
        (Device::Cpu, None) => Some(EngineConfig::DEFAULT_KV_CACHE_MEMORY),
        (Device::Cuda(_), None) => None,
    };
    let max_model_len = kv::sizing::max_model_len(
        loaded.model.config().max_position_embeddings,
        &loaded.model.kv_layout(kv),
        kv_bytes,
        args.max_model_len,
    )?;
    let served = ServedModel {
        name: args.served_model_name.clone().unwrap_or(default_name),
        root: loaded.path.display().to_string(),
        max_model_len,
        vocab_size: loaded.model.config().vocab_size,
    };
    let config = EngineConfig {
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        kv,
        kv_cache_memory: args
            .kv_cache_memory
            .unwrap_or(EngineConfig::DEFAULT_KV_CACHE_MEMORY),
        prefix_caching: !args.no_prefix_caching,
        threads: args.threads,
        max_model_len,
        gpu_memory_utilization: match (args.device, args.kv_cache_memory) {
            (Device::Cuda(_), None) => Some(args.gpu_memory_utilization),
            _ => None,
        },
        cuda_graphs: !args.enforce_eager,
    };
    let lease = Duration::try_from_secs_f64(args.kv_lease_secs)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--kv-lease-secs must be a positive number of seconds")?;
    let fingerprint = Fingerprint::new(identity, loaded.model.kv_layout(kv));
    let LoadedModel {
        model,
        tokenizer,
        chat_template,
        ..
    } = loaded;
    let leases = args
        .kv_port
        .map(|_| Arc::new(LeaseTable::new(lease, kv.block_size)));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let kv_events = match args.kv_events_config.as_ref().filter(|c| c.publishes()) {
        Some(events) => Some(runtime.block_on(start_kv_events(events, config.prefix_caching))?),
        None => None,
    };
    let (puller, puller_messages) = mpsc::unbounded_channel();
    let links = HandoffLinks {
        leases: leases.clone(),
        puller: Some(puller),
        load_failure_policy: args.kv_load_failure_policy.into(),
    };
    let engine =
        sched::spawn_with_links(model, config, links, kv_events).context("starting the engine")?;
    let local = transfer::Local {
        engine_id: args
            .engine_id
            .clone()
            .unwrap_or_else(transfer::new_engine_id),
        secret: secret.clone(),
        fingerprint,
        memory: engine.kv_memory(),
        limits: Limits::default(),
    };
    let liveness = engine.liveness();
    let metrics = install_prometheus_recorder(&served.name)
        .map_err(|e| tracing::warn!("metrics are disabled: {e}"))
        .ok();
    let result = runtime.block_on(async {
        transfer::spawn_puller(
            puller_messages,
            engine.downgrade(),
            local.clone(),
            lease / 6,
        );
        let listener = match (leases, &secret) {
            (Some(leases), Some(secret)) => {
                let local = local.clone();
                Some(start_kv_listener(&args, &engine, local, secret.clone(), leases).await?)
            }
            _ => None,
        };
        let handoff = HandoffInfo {
            engine_id: local.engine_id.clone(),
            listener,
            load_failure_policy: args.kv_load_failure_policy.into(),
            secret,
        };
        let announce = registration.map(|settings| {
            let host = announce::reachable_host(&args.host, args.advertise_host.as_deref());
            let record = announced_record(&args, &engine, &served, &handoff, &host);
            (settings, record, host)
        });
        let state = ServerState::new(engine, tokenizer, chat_template, served, metrics)
            .with_handoff(handoff)
            .with_api_key(args.api_key.clone())
            .with_tool_call_format(args.tool_call_parser);
        let grace = Duration::from_secs(args.shutdown_timeout);
        serve_until_signal(&args.host, args.port, state, limits, grace, announce).await
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    if !liveness.wait_ended(ENGINE_END_TIMEOUT) {
        tracing::warn!(
            "the engine loop did not end within {} s of the server; exiting anyway",
            ENGINE_END_TIMEOUT.as_secs()
        );
    }
    result
}

/// How long a stopping worker waits for its engine loop to release the model and the
/// device after the server has stopped.
const ENGINE_END_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the KV event sockets (failing startup if they cannot be bound) and starts
/// the publisher; returns the engine's end of its queue.
async fn start_kv_events(config: &KvEventsConfig, prefix_caching: bool) -> Result<KvEventSink> {
    if !prefix_caching {
        tracing::warn!(
            "KV events are enabled but prefix caching is off (--no-prefix-caching): \
             no block enters the cache, so none is announced"
        );
    }
    let (sink, source) = kv_events::channel(config.max_queue_size);
    let endpoints = kv_events::start_publisher(config, source)
        .await
        .context("starting the KV event publisher")?;
    match endpoints.mode {
        SocketMode::Bind => eprintln!("KV events published on {}", endpoints.publish),
        SocketMode::Connect => eprintln!("KV events published to {}", endpoints.publish),
    }
    if let Some(replay) = &endpoints.replay {
        eprintln!("KV event replay on {replay}");
    }
    Ok(sink)
}

/// What the API accepts from clients (`--max-body-bytes*`, `--*-read-timeout-secs`).
fn http_limits(args: &ServeArgs) -> Result<HttpLimits> {
    let limits = HttpLimits {
        header_read_timeout: Duration::from_secs(args.header_read_timeout_secs),
        body_read_timeout: Duration::from_secs(args.body_read_timeout_secs),
        max_body_bytes: args.max_body_bytes,
        max_body_bytes_in_flight: args.max_body_bytes_in_flight,
    };
    Ok(limits.validate()?)
}

/// Binds and starts the hand-off listener, serving readers that hold `secret`;
/// returns the advertised `(host, port)`.
async fn start_kv_listener(
    args: &ServeArgs,
    engine: &EngineHandle,
    local: transfer::Local,
    secret: ClusterSecret,
    leases: Arc<LeaseTable>,
) -> Result<(String, u16)> {
    let port = args.kv_port.unwrap_or(0);
    let bind: IpAddr = args
        .host
        .parse()
        .with_context(|| format!("--host {} is not an IP address", args.host))?;
    let engine_id = local.engine_id.clone();
    let server = KvServer::bind(
        (bind, port).into(),
        local,
        secret,
        leases,
        engine.downgrade(),
    )
    .await
    .with_context(|| format!("listening for KV hand-offs on {bind}:{port}"))?;
    let port = server.local_addr()?.port();
    let advertised = advertised_kv_host(args.kv_host.as_deref(), bind);
    tokio::spawn(server.run(std::future::pending()));
    eprintln!(
        "KV hand-off on {bind}:{port}, advertised as {advertised}:{port} (engine {engine_id})"
    );
    Ok((advertised, port))
}

/// `--kv-host`, else the listening address unless it is a wildcard. A loopback
/// address advertised by a worker that listens beyond loopback is probably a mistake
/// (decode workers on other hosts could not reach it): warn.
fn advertised_kv_host(kv_host: Option<&str>, bind: IpAddr) -> String {
    let advertised = announce::reachable_host(&bind.to_string(), kv_host);
    let advertised_loopback = advertised == "localhost"
        || advertised
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if advertised_loopback && !bind.is_loopback() {
        tracing::warn!(
            "the KV hand-off is advertised as {advertised}, a loopback address, but the \
             worker listens on {bind}: decode workers on other hosts cannot reach it \
             (set --kv-host to a routable address)"
        );
    }
    advertised
}

/// The model file's stem (`SmolLM2-135M-Instruct.Q4_1`) or the folder's name.
fn default_served_name(path: &Path) -> String {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// What `--discovery` announces for a worker reached at `host`, but the URL (its port
/// is known once the server listens).
fn announced_record(
    args: &ServeArgs,
    engine: &EngineHandle,
    served: &ServedModel,
    handoff: &HandoffInfo,
    host: &str,
) -> WorkerRecord {
    let kv_events = args
        .kv_events_config
        .as_ref()
        .filter(|c| c.publishes())
        .and_then(|c| {
            announce::kv_events_endpoints(&c.endpoint, c.replay_endpoint.as_deref(), host)
                .ok()
                .flatten()
        });
    WorkerRecord {
        url: String::new(),
        role: args.discovery.role,
        model: served.name.clone(),
        engine: "tandem".into(),
        engine_id: Some(handoff.engine_id.clone()),
        kv_handoff: handoff
            .listener
            .as_ref()
            .map(|(host, port)| format!("{host}:{port}")),
        kv_events,
        capacity: Some(Capacity {
            max_num_seqs: args.max_num_seqs,
            kv_cache_tokens: engine.kv_memory().num_blocks() * args.block_size,
        }),
    }
}

async fn serve_until_signal(
    host: &str,
    port: u16,
    state: ServerState,
    limits: HttpLimits,
    grace: Duration,
    announce: Option<(RegistrationSettings, WorkerRecord, String)>,
) -> Result<()> {
    let listener = tandem_httpd::bind(host, port)
        .await
        .with_context(|| format!("listening on {host}:{port}"))?;
    let address = listener.local_addr()?;
    let model = state_model_name(&state);
    let stop = Arc::new(Notify::new());
    let shutdown = {
        let stop = stop.clone();
        async move { stop.notified().await }
    };
    let server = api::serve(listener, state, limits, shutdown);
    tokio::pin!(server);
    eprintln!("serving {model} on http://{address}");
    let registration = match announce {
        Some((settings, mut record, reachable)) => {
            record.url = announce::http_url(&reachable, address.port());
            let registration = Registration::start(settings.clone(), &record)?;
            eprintln!(
                "registering {} as {} in {} ({})",
                record.url,
                record.role.as_str(),
                settings.address,
                registration.key()
            );
            Some(registration)
        }
        None => None,
    };
    tokio::select! {
        () = &mut server => return Ok(()),
        signal = termination_signal() => signal?,
    }
    if let Some(registration) = registration {
        // Routers stop sending new requests before this worker stops taking them.
        if registration.deregister().await {
            eprintln!("deregistered from etcd");
        }
    }
    eprintln!(
        "shutting down: waiting up to {}s for requests in flight",
        grace.as_secs()
    );
    stop.notify_one();
    match tokio::time::timeout(grace, server).await {
        Ok(()) => Ok(()),
        Err(_) => {
            tracing::warn!(
                "requests still in flight after {}s; exiting",
                grace.as_secs()
            );
            Ok(())
        }
    }
}

fn state_model_name(state: &ServerState) -> String {
    state.served_model().name.clone()
}

/// Completes on SIGTERM or SIGINT.
pub async fn termination_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}

/// A `--kv-cache-memory` value that is not a byte size.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a byte size (examples: 1073741824, 512MiB, 2GiB, 1.5GB)")]
pub struct ByteSizeError(String);

/// Bytes from `1073741824`, `512MiB`, `2GiB`, `1.5GB`, `64k` (K/M/G alone are binary).
pub fn parse_byte_size(text: &str) -> Result<usize, ByteSizeError> {
    let error = || ByteSizeError(text.to_owned());
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(split);
    let unit: f64 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        _ => return Err(error()),
    };
    let value: f64 = number.parse().map_err(|_| error())?;
    let bytes = (value * unit).round();
    if !bytes.is_finite() || bytes < 1.0 || bytes > usize::MAX as f64 {
        return Err(error());
    }
    Ok(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_take_binary_and_decimal_suffixes() {
        assert_eq!(parse_byte_size("1024").unwrap(), 1024);
        assert_eq!(parse_byte_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_byte_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_byte_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_byte_size("64k").unwrap(), 65536);
        for bad in ["", "GiB", "12XB", "-1", "0", "1.2.3MiB"] {
            assert!(parse_byte_size(bad).is_err(), "{bad}");
        }
    }
}
