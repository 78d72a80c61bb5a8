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
//! - [`dispatch`]: legs, selection and retries.
//! - [`relay`]: upstream calls and streaming relay.
//! - [`tokens`]: prompt token counts for conditional disaggregation.
//! - [`api`], [`admin`]: the HTTP surface.
//! - [`metrics`]: metric names.

pub mod admin;
pub mod api;
pub mod config;
pub mod disagg;
pub mod dispatch;
mod error;
pub mod health;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod relay;
pub mod tokens;

use std::collections::HashMap;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

pub use config::{ConfigError, Mode, RouterConfig};

use dispatch::{Dispatcher, Policies};
use registry::{Registry, Role, Worker};
use relay::Upstream;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("building the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Tokenizer(#[from] tokens::TokenizerError),
}

/// Serves `config` on `listener` until `shutdown` completes, then until the requests
/// in flight have finished.
pub async fn serve(
    config: RouterConfig,
    listener: tokio::net::TcpListener,
    metrics: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    let mode = config.validate()?;
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
    let upstream = Upstream::new(config.timeouts.clone())?;
    let checks = tokio::spawn(health::run_checks(
        registry.clone(),
        upstream.client().clone(),
        config.health.clone(),
    ));
    let state = api::AppState {
        dispatcher: Dispatcher {
            mode,
            registry,
            upstream,
            policies: policies(&config, mode),
            retry: config.retry.clone(),
            conditional: conditional(&config, mode)?,
        },
        api_key: config.api_key.clone(),
        admin_token: config.admin_token.clone(),
        circuit: config.circuit.clone(),
        metrics,
    };
    let app = api::router(state, config.max_body_bytes);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    checks.abort();
    Ok(served?)
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

fn policies(config: &RouterConfig, mode: Mode) -> Policies {
    let build = |kind| policy::build(kind, &config.prefix);
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
