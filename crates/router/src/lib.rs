//! tandem's router: one OpenAI-compatible endpoint in front of workers, in replicated
//! mode (each request to one worker) or disaggregated mode (a prefill leg, then a
//! decode leg, over vLLM's `kv_transfer_params` protocol). It depends on no engine
//! code: tandem and vLLM workers look the same to it.
//!
//! - [`config`]: settings (TOML and flags).
//! - [`registry`]: workers, their load, health and circuit state.
//! - [`policy`]: selection policies (pure).
//! - [`health`]: circuit breakers and active health checks.
//! - [`disagg`]: the P/D request transformations (pure).
//! - [`dispatch`]: legs, selection, retries and the migration of broken streams.
//! - [`migration`]: which answers can move mid-stream and how their events are
//!   continued (pure).
//! - [`relay`]: upstream calls and streaming relay.
//! - [`tokens`]: prompt token counts for conditional disaggregation.
//! - [`prompt_tokens`]: a request's prompt token ids as the worker sees them (its
//!   `/tokenize`), for KV-aware routing.
//! - [`kv_index`]: which worker holds which prompt prefix, from KV-cache events (pure).
//! - [`kv_follow`]: the workers' KV event subscribers feeding that index.
//! - [`kv_routing`]: the dispatcher's side of `kv_aware` (token ids, predictions).
//! - [`membership`]: workers joining, draining, moving between pools and leaving at
//!   run time (admin API, etcd discovery, the planner).
//! - [`signals`]: finished requests' latencies, for the planner.
//! - [`rebalance`]: the online planner, moving workers between the P/D pools.
//! - [`federation`]: the workers' own metrics on the router's `/metrics`.
//! - [`live`]: the dashboard page and its stream of snapshots.
//! - [`secret`]: credentials that never print.
//! - [`api`], [`admin`]: the HTTP surface.
//! - [`metrics`]: metric names.

pub mod admin;
pub mod api;
pub mod config;
pub mod disagg;
pub mod dispatch;
mod error;
pub mod federation;
pub mod health;
pub mod kv_follow;
pub mod kv_index;
pub mod kv_routing;
pub mod live;
pub mod membership;
pub mod metrics;
pub mod migration;
pub mod policy;
pub mod prompt_tokens;
pub mod rebalance;
pub mod registry;
pub mod relay;
pub mod secret;
pub mod signals;
mod throttle;
pub mod tokens;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpSocket;
use tokio::sync::watch;

pub use config::{ClientParamsPolicy, ConfigError, Mode, RouterConfig};
pub use secret::Secret;

use dispatch::{Dispatcher, Policies};
use registry::{Registry, Role, Worker};
use relay::Upstream;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("building the HTTP client: {0}")]
    Client(#[from] relay::UpstreamError),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Tokenizer(#[from] tokens::TokenizerError),
    #[error(transparent)]
    KvFollow(#[from] kv_follow::FollowError),
    #[error(transparent)]
    Discovery(#[from] tandem_discovery::DiscoveryError),
}

/// Runs the router on `threads` threads until `shutdown` turns true, then lets
/// requests in flight finish for up to `grace`. Each thread has its own
/// single-threaded runtime, listener on the shared address (`SO_REUSEPORT`: the
/// kernel spreads connections) and upstream connection pool, so a request never
/// crosses threads; the registry, policies and metrics are shared. `ready` learns the
/// bound address before requests are served.
pub fn run(
    config: RouterConfig,
    metrics: Option<PrometheusHandle>,
    threads: usize,
    grace: Duration,
    ready: impl FnOnce(SocketAddr),
    shutdown: watch::Receiver<bool>,
) -> Result<(), RouterError> {
    let mode = config.validate()?;
    // Dropped (subscribers stopped, thread joined) when `run` returns.
    let follower = kv_follower(&config)?;
    // The workers' caches, from their KV events.
    let lookup = follower.as_ref().map(kv_follow::KvFollower::lookup);
    let shared = Shared {
        mode,
        registry: registry(&config)?,
        policies: Arc::new(policies(&config, mode, lookup.clone())),
        kv: kv_routing(&config, mode, lookup)?.map(Arc::new),
        conditional: Arc::new(conditional(&config, mode)?),
        metrics,
        kv_follow: follower.as_ref().map(kv_follow::KvFollower::handle),
        signals: Arc::new(signals::Signals::default()),
        planner: config
            .planner
            .clone()
            .map(|planner| Arc::new(rebalance::Journal::new(planner))),
        live: Arc::new(live::Live::default()),
    };
    let sockets = bind_sockets(&config.host, config.port, threads.max(1))?;
    let address = sockets[0].local_addr()?;
    let (listening_tx, listening_rx) = std::sync::mpsc::channel();
    let handles: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(index, socket)| {
            let (config, shared, shutdown) = (config.clone(), shared.clone(), shutdown.clone());
            let listening = listening_tx.clone();
            std::thread::Builder::new()
                .name(format!("tandem-router-{index}"))
                .spawn(move || {
                    serve_thread(index, socket, config, shared, grace, shutdown, listening)
                })
        })
        .collect::<Result<_, _>>()?;
    drop(listening_tx);
    // Announced only once every socket listens: a bound socket that does not listen
    // yet refuses connections, and callers connect as soon as they read the address.
    if listening_rx.iter().take(handles.len()).count() == handles.len() {
        ready(address);
    }
    let mut result = Ok(());
    for handle in handles {
        let outcome = handle.join().unwrap_or_else(|_| {
            Err(RouterError::Io(std::io::Error::other(
                "a router thread panicked",
            )))
        });
        result = result.and(outcome);
    }
    result
}

/// What every thread's state shares.
#[derive(Clone)]
struct Shared {
    mode: Mode,
    registry: Arc<Registry>,
    policies: Arc<Policies>,
    conditional: Arc<Option<dispatch::ConditionalDisagg>>,
    kv: Option<Arc<kv_routing::KvRouting>>,
    metrics: Option<PrometheusHandle>,
    /// The KV event subscribers, when any worker has a stream or the admin API may
    /// add one.
    kv_follow: Option<kv_follow::KvFollowHandle>,
    /// The streamed answers' latencies (the planner's and the live view's).
    signals: Arc<signals::Signals>,
    /// With the online planner: its journal.
    planner: Option<Arc<rebalance::Journal>>,
    /// The live view's latest snapshot.
    live: Arc<live::Live>,
}

/// The KV event follower: started when a worker has an event stream, or when the
/// admin API or discovery is on (they may add workers with one). A policy takes its view as
/// `follower.lookup()` (an `Arc<dyn PrefixLookup>`).
fn kv_follower(config: &RouterConfig) -> Result<Option<kv_follow::KvFollower>, RouterError> {
    if config.kv_events.is_empty() && config.admin_token.is_none() && config.discovery.is_none() {
        return Ok(None);
    }
    let streams = config
        .kv_events
        .iter()
        .map(kv_follow::stream_of)
        .collect::<Result<Vec<_>, _>>()?;
    let settings = kv_follow::FollowSettings::from_config(config);
    Ok(Some(kv_follow::KvFollower::start(settings, streams)?))
}

fn registry(config: &RouterConfig) -> Result<Arc<Registry>, RouterError> {
    let registry = Arc::new(Registry::new());
    for (urls, role) in [
        (&config.workers, Role::Both),
        (&config.prefill, Role::Prefill),
        (&config.decode, Role::Decode),
    ] {
        for url in urls {
            let url = config::normalize_url(url)?;
            if let Err(err) = registry.add(Worker::new(url, role, &config.circuit)) {
                tracing::warn!("{err}: listed twice, kept once");
            }
        }
    }
    Ok(registry)
}

/// `threads` sockets bound to one address (the first picks the port if it is 0).
fn bind_sockets(host: &str, port: u16, threads: usize) -> Result<Vec<TcpSocket>, RouterError> {
    let ip: IpAddr = match host {
        "localhost" => IpAddr::from([127, 0, 0, 1]),
        other => other
            .parse()
            .map_err(|_| ConfigError::Invalid(format!("--host {other} is not an IP address")))?,
    };
    let mut address = SocketAddr::new(ip, port);
    let mut sockets = Vec::with_capacity(threads);
    for _ in 0..threads {
        let socket = if ip.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.set_nodelay(true)?;
        socket.bind(address)?;
        address = socket.local_addr()?;
        sockets.push(socket);
    }
    Ok(sockets)
}

fn serve_thread(
    index: usize,
    socket: TcpSocket,
    config: RouterConfig,
    shared: Shared,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
    listening: std::sync::mpsc::Sender<()>,
) -> Result<(), RouterError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = socket.listen(tandem_httpd::LISTEN_BACKLOG)?;
        let _ = listening.send(());
        let upstream = Upstream::new(config.timeouts.clone(), config.worker_api_key.as_ref())?;
        let checks = (index == 0).then(|| {
            tokio::spawn(health::run_checks(
                shared.registry.clone(),
                upstream.client().clone(),
                config.health.clone(),
            ))
        });
        let state = api::AppState {
            dispatcher: Arc::new(Dispatcher {
                mode: shared.mode,
                registry: shared.registry,
                upstream,
                policies: shared.policies,
                retry: config.retry.clone(),
                conditional: shared.conditional,
                require_prefill: config.require_prefill,
                kv: shared.kv,
                migration_limit: config.migration_limit,
                signals: Some(shared.signals.clone()),
            }),
            api_key: config.api_key.clone(),
            admin_token: config.admin_token.clone(),
            client_params: config.client_kv_transfer_params,
            circuit: config.circuit.clone(),
            metrics: shared.metrics,
            kv: shared.kv_follow,
            planner: shared.planner.clone(),
            federate_worker_metrics: config.federate_worker_metrics,
            live: Some(shared.live.clone()),
        };
        let state = Arc::new(state);
        let planner = match (index, &shared.planner) {
            (0, Some(journal)) => Some(tokio::spawn(rebalance::run(
                state.clone(),
                shared.signals.clone(),
                journal.clone(),
            ))),
            _ => None,
        };
        let live_view = (index == 0).then(|| {
            tokio::spawn(live::run(
                state.clone(),
                shared.live.clone(),
                shared.signals.clone(),
            ))
        });
        if index == 0
            && let Some(discovery) = &config.discovery
        {
            membership::spawn_discovery(state.clone(), discovery)?;
        }
        let limits = config.http_limits();
        let app = api::router(state, limits.max_body_bytes);
        let mut stopping = shutdown.clone();
        let live = shared.live.clone();
        let stopped = async move {
            let _ = stopping.wait_for(|stop| *stop).await;
            // Dashboard streams never end by themselves: end them, so they do not
            // hold the graceful shutdown open.
            live.close();
        };
        let server = tandem_httpd::serve(listener, app, limits, stopped);
        tokio::select! {
            () = server => {}
            _ = async {
                let _ = shutdown.wait_for(|stop| *stop).await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!("requests still in flight after {grace:?}; stopping");
            }
        }
        for task in [checks, planner, live_view].into_iter().flatten() {
            task.abort();
        }
        Ok(())
    })
}

/// Conditional disaggregation, when asked for (P/D mode only).
fn conditional(
    config: &RouterConfig,
    mode: Mode,
) -> Result<Option<dispatch::ConditionalDisagg>, RouterError> {
    let (Mode::Disaggregated, Some(threshold)) = (mode, config.local_prefill_threshold) else {
        return Ok(None);
    };
    let counter = match &config.tokenizer {
        Some(path) => tokens::TokenCounter::from_file(path)?,
        None => tokens::TokenCounter::Estimate,
    };
    Ok(Some(dispatch::ConditionalDisagg {
        threshold,
        counter,
        cache: policy::PrefixCache::new(config.prefix.max_tree_chars),
    }))
}

/// Whether a pool of the mode routes by `kv_aware`.
fn uses_kv_aware(config: &RouterConfig, mode: Mode) -> bool {
    let kv_aware = policy::PolicyKind::KvAware;
    match mode {
        Mode::Replicated => config.policy == kv_aware,
        Mode::Disaggregated => {
            config.prefill_policy() == kv_aware || config.decode_policy() == kv_aware
        }
    }
}

/// What the dispatcher needs for the workers' caches: with a `kv_aware` pool, or with
/// conditional disaggregation on followed KV events (it then uses the decode worker's
/// exact cached prefix).
fn kv_routing(
    config: &RouterConfig,
    mode: Mode,
    lookup: Option<Arc<dyn policy::PrefixLookup>>,
) -> Result<Option<kv_routing::KvRouting>, RouterError> {
    let conditional_on_events =
        config.local_prefill_threshold.is_some() && !config.kv_events.is_empty();
    if !(uses_kv_aware(config, mode) || conditional_on_events) {
        return Ok(None);
    }
    let Some(lookup) = lookup else {
        tracing::warn!(
            "kv_aware without --kv-events: no worker's cache is known, so it routes as \
             least_loaded"
        );
        return Ok(None);
    };
    let counter = match &config.tokenizer {
        Some(path) => tokens::TokenCounter::from_file(path)?,
        None => tokens::TokenCounter::Estimate,
    };
    let timeout = Duration::from_millis(config.kv_aware.tokenize_timeout_ms);
    Ok(Some(kv_routing::KvRouting::new(lookup, counter, timeout)))
}

fn policies(
    config: &RouterConfig,
    mode: Mode,
    lookup: Option<Arc<dyn policy::PrefixLookup>>,
) -> Policies {
    let settings = policy::PolicySettings {
        prefix: config.prefix.clone(),
        kv_aware: config.kv_aware.clone(),
        lookup,
    };
    let build = |kind| policy::build(kind, &settings);
    let mut by_role = HashMap::new();
    match mode {
        Mode::Replicated => {
            by_role.insert(Role::Both, build(config.policy));
        }
        Mode::Disaggregated => {
            by_role.insert(Role::Prefill, build(config.prefill_policy()));
            by_role.insert(Role::Decode, build(config.decode_policy()));
        }
    }
    Policies(by_role)
}
