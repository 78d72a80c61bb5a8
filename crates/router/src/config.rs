//! The router's settings: one serde type, read from `--config router.toml` and
//! overridden by command-line flags (the CLI does the merge). Every duration is in
//! seconds or milliseconds as its name says.

use std::time::Duration;

use serde::Deserialize;
use tandem_httpd::HttpLimits;

use crate::policy::{KvAwareConfig, PolicyKind, PrefixConfig};
use crate::secret::Secret;

/// Everything `tandem route` can be told.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    pub host: String,
    pub port: u16,
    /// Replicated mode: workers that do everything (one = single mode).
    pub workers: Vec<String>,
    /// Disaggregated mode: prefill workers…
    pub prefill: Vec<String>,
    /// …and decode workers.
    pub decode: Vec<String>,
    /// Replicated mode's policy, and the default of both P/D pools.
    pub policy: PolicyKind,
    pub prefill_policy: Option<PolicyKind>,
    pub decode_policy: Option<PolicyKind>,
    pub prefix: PrefixConfig,
    /// Tuning of the `kv_aware` policy (`[kv_aware]`).
    pub kv_aware: KvAwareConfig,
    /// Clients must send `Authorization: Bearer <api_key>`.
    pub api_key: Option<Secret>,
    /// The admin API (`/workers`) needs `Authorization: Bearer <admin_token>`; without
    /// one it is disabled.
    pub admin_token: Option<Secret>,
    /// Sent to every worker as `Authorization: Bearer <worker_api_key>` (both legs,
    /// retries, `/v1/models`, health checks). Without one, no `Authorization` goes
    /// upstream; the client's own is never forwarded.
    pub worker_api_key: Option<Secret>,
    /// What a client's own `kv_transfer_params` get: removed, or a 400.
    pub client_kv_transfer_params: ClientParamsPolicy,
    /// P/D mode: with no prefill worker to reach, answer 503 instead of letting the
    /// decode worker compute the prompt.
    pub require_prefill: bool,
    pub timeouts: Timeouts,
    pub retry: RetryConfig,
    /// How many times a streamed answer whose worker fails mid-stream may continue on
    /// another worker (0: never; docs/router.md, "Request migration").
    pub migration_limit: u32,
    pub health: HealthConfig,
    pub circuit: CircuitConfig,
    /// Largest request body accepted, bytes (413 above it). Keep it below what the
    /// workers accept, so an oversized body gets the router's 413 rather than a
    /// worker's: the default leaves room for what the router adds to a body.
    pub max_body_bytes: usize,
    /// Bytes of request bodies held at once (503 with `Retry-After` past it): the
    /// router keeps a body, its parsed form and the legs' re-encoded copies until the
    /// answer begins.
    pub max_body_bytes_in_flight: usize,
    /// Seconds a client connection gets to send complete request headers (also the
    /// longest a kept-alive connection stays idle).
    pub header_read_timeout_secs: u64,
    /// Seconds a request gets to send its whole body once its headers are in (408).
    pub body_read_timeout_secs: u64,
    /// P/D mode: a prompt with fewer uncached tokens than this (on the decode worker
    /// chosen first) skips the prefill leg. `None`: always disaggregate.
    pub local_prefill_threshold: Option<usize>,
    /// The model's `tokenizer.json`, to count prompt tokens exactly (else estimated).
    pub tokenizer: Option<std::path::PathBuf>,
    /// Workers' KV event streams (`[[kv_events]]`), followed into the KV index.
    pub kv_events: Vec<KvEventsSource>,
    /// The topic the workers publish KV events under (vLLM's `KVEventsConfig.topic`).
    pub kv_events_topic: String,
    /// The KV index and its subscribers.
    pub kv_index: KvIndexConfig,
    /// Workers registered in etcd join and leave the pool live (`[discovery]`).
    pub discovery: Option<DiscoveryConfig>,
    /// P/D mode: the online planner moves workers between the pools against an SLO
    /// (`[planner]`, docs/planner.md).
    pub planner: Option<PlannerConfig>,
    /// `/metrics` also carries each worker's own series, labelled `worker`.
    pub federate_worker_metrics: bool,
}

/// Following the workers registered in etcd (`--discovery etcd://…`); the key layout
/// is in docs/discovery.md.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// `etcd://HOST:PORT[,HOST:PORT…]`.
    pub etcd: String,
    /// Whose workers: `/tandem/<namespace>/workers/…` [default: "default"].
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Prefill and decode workers (P/D); otherwise workers of role `both`. Implied by
    /// static `prefill`/`decode` lists.
    #[serde(default)]
    pub disaggregated: bool,
    /// Only workers serving this model (default: any).
    #[serde(default)]
    pub model: Option<String>,
}

pub fn default_namespace() -> String {
    "default".into()
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8192,
            workers: Vec::new(),
            prefill: Vec::new(),
            decode: Vec::new(),
            policy: PolicyKind::RoundRobin,
            prefill_policy: None,
            decode_policy: None,
            prefix: PrefixConfig::default(),
            kv_aware: KvAwareConfig::default(),
            api_key: None,
            admin_token: None,
            worker_api_key: None,
            client_kv_transfer_params: ClientParamsPolicy::Strip,
            require_prefill: false,
            timeouts: Timeouts::default(),
            retry: RetryConfig::default(),
            migration_limit: 0,
            health: HealthConfig::default(),
            circuit: CircuitConfig::default(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_body_bytes_in_flight: tandem_httpd::DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
            header_read_timeout_secs: tandem_httpd::DEFAULT_HEADER_READ_TIMEOUT.as_secs(),
            body_read_timeout_secs: tandem_httpd::DEFAULT_BODY_READ_TIMEOUT.as_secs(),
            local_prefill_threshold: None,
            tokenizer: None,
            kv_events: Vec::new(),
            kv_events_topic: String::new(),
            kv_index: KvIndexConfig::default(),
            discovery: None,
            planner: None,
            federate_worker_metrics: false,
        }
    }
}

/// What the router does with `kv_transfer_params` a client sent: only the router
/// may ask a worker to hold KV for a remote decode or to pull KV from an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientParamsPolicy {
    /// Removed from the request, which is served as if they were never sent.
    #[default]
    Strip,
    /// The request is refused with a 400 naming the param.
    Reject,
}

impl ClientParamsPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientParamsPolicy::Strip => "strip",
            ClientParamsPolicy::Reject => "reject",
        }
    }
}

/// A name other than `strip` or `reject`.
#[derive(Debug, thiserror::Error)]
#[error("unknown client kv_transfer_params policy `{0}`; expected strip or reject")]
pub struct UnknownClientParamsPolicy(String);

impl std::str::FromStr for ClientParamsPolicy {
    type Err = UnknownClientParamsPolicy;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        [ClientParamsPolicy::Strip, ClientParamsPolicy::Reject]
            .into_iter()
            .find(|policy| policy.as_str() == name)
            .ok_or_else(|| UnknownClientParamsPolicy(name.to_owned()))
    }
}

/// The router's default body limit: a worker's default less room for what the
/// router adds to a body (`kv_transfer_params` on the decode leg).
pub const DEFAULT_MAX_BODY_BYTES: usize = tandem_httpd::DEFAULT_MAX_BODY_BYTES - (256 << 10);

/// How the router serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One pool; each request goes to one worker.
    Replicated,
    /// Prefill leg on a prefill worker, then the decode leg on a decode worker.
    Disaggregated,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Replicated => "replicated",
            Mode::Disaggregated => "disaggregated",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "no workers: give --worker URL (replicated) or --prefill URL and --decode URL (disaggregated)"
    )]
    NoWorkers,
    #[error(
        "--worker cannot be combined with --prefill/--decode: choose replicated or disaggregated mode"
    )]
    MixedModes,
    #[error("disaggregated mode needs at least one --prefill and one --decode worker")]
    HalfDisaggregated,
    #[error("`{0}` is not a worker URL: expected http://host:port")]
    BadUrl(String),
    /// The URL is shown with its credentials replaced.
    #[error(
        "worker URL `{0}` carries credentials (user:password@): they would show in logs and \
         metrics; give the workers' key with --worker-api-key instead"
    )]
    Credentials(String),
    #[error("the worker API key must be visible ASCII (it is sent as an HTTP header)")]
    WorkerKey,
    #[error("`{0}` is not a KV events endpoint: expected tcp://host:port")]
    BadEndpoint(String),
    #[error("{0}")]
    Invalid(String),
    // Not a `source`: the message already carries it, and error chains would print it
    // twice.
    #[error("client connection limits: {0}")]
    Limits(tandem_httpd::LimitsError),
}

impl From<tandem_httpd::LimitsError> for ConfigError {
    fn from(error: tandem_httpd::LimitsError) -> Self {
        ConfigError::Limits(error)
    }
}

impl RouterConfig {
    /// The mode the worker lists describe, after checking them.
    pub fn mode(&self) -> Result<Mode, ConfigError> {
        let disaggregated = !self.prefill.is_empty() || !self.decode.is_empty();
        if let Some(discovery) = &self.discovery {
            // The pool fills from etcd: static lists may be partial or empty.
            let pd = disaggregated || discovery.disaggregated;
            return match (self.workers.is_empty(), pd) {
                (false, true) => Err(ConfigError::MixedModes),
                (_, true) => Ok(Mode::Disaggregated),
                (_, false) => Ok(Mode::Replicated),
            };
        }
        match (self.workers.is_empty(), disaggregated) {
            (true, false) => Err(ConfigError::NoWorkers),
            (false, true) => Err(ConfigError::MixedModes),
            (false, false) => Ok(Mode::Replicated),
            (true, true) if self.prefill.is_empty() || self.decode.is_empty() => {
                Err(ConfigError::HalfDisaggregated)
            }
            (true, true) => Ok(Mode::Disaggregated),
        }
    }

    /// Checks everything the router relies on; the mode on success.
    pub fn validate(&self) -> Result<Mode, ConfigError> {
        let mode = self.mode()?;
        for url in self.workers.iter().chain(&self.prefill).chain(&self.decode) {
            normalize_url(url)?;
        }
        if let Some(key) = &self.worker_api_key
            && !key.expose().bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ConfigError::WorkerKey);
        }
        if self.retry.max_attempts == 0 {
            return Err(ConfigError::Invalid(
                "retry.max_attempts must be at least 1".into(),
            ));
        }
        if self.health.failure_threshold == 0 || self.health.success_threshold == 0 {
            return Err(ConfigError::Invalid(
                "health thresholds must be at least 1".into(),
            ));
        }
        if self.circuit.failure_threshold == 0 || self.circuit.success_threshold == 0 {
            return Err(ConfigError::Invalid(
                "circuit thresholds must be at least 1".into(),
            ));
        }
        self.kv_aware
            .validate()
            .map_err(|err| ConfigError::Invalid(err.to_string()))?;
        self.http_limits().validate()?;
        self.validate_kv_events()?;
        if let Some(discovery) = &self.discovery {
            tandem_discovery::EtcdAddress::parse(&discovery.etcd)
                .and_then(|_| tandem_discovery::validate_namespace(&discovery.namespace))
                .map_err(|err| ConfigError::Invalid(err.to_string()))?;
        }
        if let Some(planner) = &self.planner {
            if mode != Mode::Disaggregated {
                return Err(ConfigError::Invalid(
                    "the planner moves workers between P/D pools: it needs prefill and decode workers".into(),
                ));
            }
            planner.validate()?;
        }
        Ok(mode)
    }

    /// What the router accepts from its clients.
    pub fn http_limits(&self) -> HttpLimits {
        HttpLimits {
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
            body_read_timeout: Duration::from_secs(self.body_read_timeout_secs),
            max_body_bytes: self.max_body_bytes,
            max_body_bytes_in_flight: self.max_body_bytes_in_flight,
        }
    }

    /// Each KV event stream names a configured worker once, with valid endpoints.
    fn validate_kv_events(&self) -> Result<(), ConfigError> {
        let workers: Vec<String> = self
            .workers
            .iter()
            .chain(&self.prefill)
            .chain(&self.decode)
            .filter_map(|url| normalize_url(url).ok())
            .collect();
        let mut seen = Vec::new();
        for source in &self.kv_events {
            let worker = normalize_url(&source.worker)?;
            if !workers.contains(&worker) {
                return Err(ConfigError::Invalid(format!(
                    "KV events for {worker}, which is not a configured worker"
                )));
            }
            if seen.contains(&worker) {
                return Err(ConfigError::Invalid(format!(
                    "KV events for {worker} are given twice"
                )));
            }
            seen.push(worker);
            validate_zmq_endpoint(&source.endpoint)?;
            if let Some(replay) = &source.replay_endpoint {
                validate_zmq_endpoint(replay)?;
            }
        }
        if self.kv_index.max_blocks == 0 || self.kv_index.replay_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "kv_index.max_blocks and kv_index.replay_timeout_ms must be at least 1".into(),
            ));
        }
        Ok(())
    }

    pub fn prefill_policy(&self) -> PolicyKind {
        self.prefill_policy.unwrap_or(self.policy)
    }

    pub fn decode_policy(&self) -> PolicyKind {
        self.decode_policy.unwrap_or(self.policy)
    }
}

/// `http://host:port` without a trailing slash; an error for anything else, and for a
/// URL with credentials in it (`user:password@host`), which would be shown wherever
/// the worker is named (logs, `/metrics`, the admin API).
pub fn normalize_url(url: &str) -> Result<String, ConfigError> {
    if let Some(redacted) = without_userinfo(url) {
        return Err(ConfigError::Credentials(redacted));
    }
    let bad = || ConfigError::BadUrl(url.to_owned());
    let trimmed = url.trim().trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"))
        .ok_or_else(bad)?;
    if rest.is_empty() || rest.contains(char::is_whitespace) || rest.contains('?') {
        return Err(bad());
    }
    Ok(trimmed.to_owned())
}

/// A ZMQ endpoint the router may connect to: `tcp://host:port` (the only transport
/// the router's ZMQ build has), with a host and a port other than 0, and no wildcard
/// (`*` binds; the router connects).
pub fn validate_zmq_endpoint(endpoint: &str) -> Result<(), ConfigError> {
    let bad = || ConfigError::BadEndpoint(endpoint.to_owned());
    let rest = endpoint.strip_prefix("tcp://").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && host != "*"
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
    match port.parse::<u16>() {
        Ok(port) if port != 0 && host_ok => Ok(()),
        _ => Err(bad()),
    }
}

/// `url` with its userinfo replaced by `***`, if it has any (an `@` in the
/// authority, scheme or not).
fn without_userinfo(url: &str) -> Option<String> {
    let url = url.trim();
    let (scheme, rest) = match url.find("://") {
        Some(at) => url.split_at(at + 3),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let (_, host) = authority.rsplit_once('@')?;
    Some(format!("{scheme}***@{host}{path}"))
}

/// Deadlines of upstream calls.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    pub connect_ms: u64,
    /// The whole prefill leg (it returns one token, after the full prompt).
    pub prefill_secs: u64,
    /// From sending a request to its response headers (replicated and decode legs).
    pub first_byte_secs: u64,
    /// Longest silence between two chunks of a relayed body.
    pub idle_secs: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect_ms: 3000,
            prefill_secs: 600,
            first_byte_secs: 600,
            idle_secs: 300,
        }
    }
}

impl Timeouts {
    pub fn connect(&self) -> Duration {
        Duration::from_millis(self.connect_ms)
    }
    pub fn prefill(&self) -> Duration {
        Duration::from_secs(self.prefill_secs)
    }
    pub fn first_byte(&self) -> Duration {
        Duration::from_secs(self.first_byte_secs)
    }
    pub fn idle(&self) -> Duration {
        Duration::from_secs(self.idle_secs)
    }
}

/// Retries of a leg that failed before any byte reached the client.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Tries per leg, the first included.
    pub max_attempts: usize,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub multiplier: f64,
    /// Each wait is scaled by a random factor in [1 − jitter, 1 + jitter].
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff_ms: 20,
            max_backoff_ms: 2000,
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryConfig {
    /// The wait before retry number `retry` (1 = the first retry).
    pub fn backoff(&self, retry: usize, unit_random: f64) -> Duration {
        let exponent = retry.saturating_sub(1).min(30) as i32;
        let base = self.initial_backoff_ms as f64 * self.multiplier.max(1.0).powi(exponent);
        let capped = base.min(self.max_backoff_ms as f64);
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 - jitter + 2.0 * jitter * unit_random.clamp(0.0, 1.0);
        Duration::from_secs_f64((capped * factor).max(0.0) / 1000.0)
    }
}

/// The online planner (`[planner]`): every `interval_ms` it judges the streamed
/// requests finished in the last `window_secs` (and since its last move) against the
/// SLO, and moves one worker from the pool with room to the pool that misses. With
/// `max_workers` it also asks for a worker to be started where no move helps (an
/// actuator such as `tandem up` starts it and adds it through the admin API) and
/// stops one the load leaves idle.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlannerConfig {
    /// Time to first token limit, seconds.
    pub ttft_secs: f64,
    /// Time per output token limit, seconds.
    pub tpot_secs: f64,
    /// The percentile held to the limits (0.9: p90).
    pub percentile: f64,
    pub interval_ms: u64,
    pub window_secs: u64,
    /// Fewer finished requests in a window than this: no verdict.
    pub min_samples: usize,
    /// Consecutive identical verdicts before a worker moves.
    pub confirm: u32,
    /// Seconds after a move before another.
    pub cooldown_secs: u64,
    /// Share of its limit the giving pool may reach with one worker fewer.
    pub headroom: f64,
    /// Longest a moving worker's requests may take to finish before the move is given up.
    pub drain_limit_secs: u64,
    /// Workers both pools may have together (the slot budget); unset: the planner
    /// only moves workers.
    pub max_workers: Option<usize>,
    /// With a budget: a pool gives back a worker when every figure is under this
    /// share of its limit, its own with one worker fewer.
    pub stop_below: f64,
    /// Longest a worker asked for may take to join its pool before the start is given up.
    pub start_limit_secs: u64,
    /// Share of their KV caches a pool's workers may fill, on average, once it has given
    /// up a worker (moved or stopped); read from their `vllm:kv_cache_usage_perc`.
    pub kv_headroom: f64,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            ttft_secs: 2.0,
            tpot_secs: 0.1,
            percentile: 0.9,
            interval_ms: 2000,
            window_secs: 20,
            min_samples: 8,
            confirm: 3,
            cooldown_secs: 30,
            headroom: 0.9,
            drain_limit_secs: 120,
            max_workers: None,
            stop_below: 0.5,
            start_limit_secs: 180,
            kv_headroom: 0.9,
        }
    }
}

impl PlannerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let invalid = |what: &str| Err(ConfigError::Invalid(format!("planner: {what}")));
        if !positive(self.ttft_secs) || !positive(self.tpot_secs) {
            return invalid("ttft_secs and tpot_secs must be positive");
        }
        if !(positive(self.percentile) && self.percentile <= 1.0) {
            return invalid("percentile must be in (0, 1]");
        }
        if !(positive(self.headroom) && self.headroom <= 1.0) {
            return invalid("headroom must be in (0, 1]");
        }
        if !(positive(self.kv_headroom) && self.kv_headroom <= 1.0) {
            return invalid("kv_headroom must be in (0, 1]");
        }
        if !(positive(self.stop_below) && self.stop_below < self.headroom) {
            return invalid("stop_below must be in (0, headroom)");
        }
        if self.max_workers.is_some_and(|max| max < 2) {
            return invalid("max_workers must be at least 2 (a prefill and a decode worker)");
        }
        if self.interval_ms < 100 || self.window_secs == 0 || self.confirm == 0 {
            return invalid("interval_ms must be at least 100, window_secs and confirm at least 1");
        }
        Ok(())
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    pub fn window(&self) -> Duration {
        Duration::from_secs(self.window_secs)
    }

    pub fn drain_limit(&self) -> Duration {
        Duration::from_secs(self.drain_limit_secs)
    }

    pub fn start_limit(&self) -> Duration {
        Duration::from_secs(self.start_limit_secs)
    }
}

/// Active health checks (`GET /health` on every worker).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failed checks that take a healthy worker out.
    pub failure_threshold: u32,
    /// Consecutive good checks that put an unhealthy worker back.
    pub success_threshold: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval_ms: 2000,
            timeout_ms: 2000,
            failure_threshold: 2,
            success_threshold: 1,
        }
    }
}

/// One worker's KV event stream, from the operator (`[[kv_events]]`, `--kv-events`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvEventsSource {
    /// The worker's URL, as configured among the workers (any role).
    pub worker: String,
    /// Its PUB socket, `tcp://host:port` (vLLM's `KVEventsConfig.endpoint`).
    pub endpoint: String,
    /// Its replay ROUTER socket (`KVEventsConfig.replay_endpoint`), to fill gaps.
    #[serde(default)]
    pub replay_endpoint: Option<String>,
}

/// The KV index and its subscribers (`[kv_index]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvIndexConfig {
    /// (worker, block) entries the index holds at most, all workers together.
    pub max_blocks: usize,
    /// Longest a replay (connect, request, every reply) may take.
    pub replay_timeout_ms: u64,
    /// A worker sent requests this long ago and no event since: its cache is unknown.
    pub stale_after_secs: u64,
    /// Most payload bytes one replay may bring back.
    pub max_replay_bytes: usize,
}

impl Default for KvIndexConfig {
    fn default() -> Self {
        Self {
            max_blocks: 1 << 21,
            replay_timeout_ms: 2000,
            stale_after_secs: 10,
            max_replay_bytes: 64 << 20,
        }
    }
}

/// The per-worker circuit breaker on request outcomes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitConfig {
    /// Consecutive failed requests that open the circuit.
    pub failure_threshold: u32,
    /// Consecutive successes in half-open state that close it again.
    pub success_threshold: u32,
    /// How long an open circuit refuses requests before letting one through.
    pub open_ms: u64,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            success_threshold: 2,
            open_ms: 10_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_events_must_name_a_worker_once_with_tcp_endpoints() {
        let mut config = RouterConfig {
            prefill: vec!["http://p:1".into()],
            decode: vec!["http://d:1".into()],
            ..RouterConfig::default()
        };
        let source = |worker: &str, endpoint: &str| KvEventsSource {
            worker: worker.into(),
            endpoint: endpoint.into(),
            replay_endpoint: None,
        };
        config.kv_events = vec![source("http://d:1/", "tcp://d:5557")];
        assert_eq!(config.validate(), Ok(Mode::Disaggregated));
        config.kv_events.push(source("http://d:1", "tcp://d:5558"));
        assert!(matches!(config.validate(), Err(ConfigError::Invalid(_))));
        config.kv_events = vec![source("http://x:1", "tcp://x:5557")];
        assert!(matches!(config.validate(), Err(ConfigError::Invalid(_))));
        for bad in [
            "tcp://*:5557",
            "ipc:///tmp/kv",
            "tcp://d",
            "tcp://d:0",
            "http://d:1",
            "tcp://:1",
            "tcp://d:1 x",
        ] {
            config.kv_events = vec![source("http://p:1", bad)];
            assert_eq!(
                config.validate(),
                Err(ConfigError::BadEndpoint(bad.into())),
                "{bad}"
            );
        }
        config.kv_events = vec![KvEventsSource {
            replay_endpoint: Some("tcp://p".into()),
            ..source("http://p:1", "tcp://127.0.0.1:5557")
        }];
        assert!(matches!(
            config.validate(),
            Err(ConfigError::BadEndpoint(_))
        ));
        config.kv_events[0].replay_endpoint = Some("tcp://[::1]:5558".into());
        assert_eq!(config.validate(), Ok(Mode::Disaggregated));
    }

    #[test]
    fn modes_follow_the_worker_lists() {
        let mut config = RouterConfig::default();
        assert_eq!(config.validate(), Err(ConfigError::NoWorkers));
        config.workers = vec!["http://a:1".into()];
        assert_eq!(config.validate(), Ok(Mode::Replicated));
        config.prefill = vec!["http://p:1".into()];
        assert_eq!(config.validate(), Err(ConfigError::MixedModes));
        config.workers.clear();
        assert_eq!(config.validate(), Err(ConfigError::HalfDisaggregated));
        config.decode = vec!["http://d:1/".into()];
        assert_eq!(config.validate(), Ok(Mode::Disaggregated));
        config.decode = vec!["d:1".into()];
        assert!(matches!(config.validate(), Err(ConfigError::BadUrl(_))));
    }

    #[test]
    fn discovery_fills_or_completes_the_pool() {
        let mut config: RouterConfig =
            toml::from_str("[discovery]\netcd = \"etcd://127.0.0.1:2379\"\n").unwrap();
        let discovery = config.discovery.clone().unwrap();
        assert_eq!(discovery.namespace, "default");
        assert_eq!(
            config.validate(),
            Ok(Mode::Replicated),
            "no static worker needed"
        );
        config.prefill = vec!["http://p:1".into()];
        assert_eq!(
            config.validate(),
            Ok(Mode::Disaggregated),
            "half a P/D pool is fine"
        );
        config.workers = vec!["http://a:1".into()];
        assert_eq!(config.validate(), Err(ConfigError::MixedModes));
        config.workers.clear();
        config.prefill.clear();
        config.discovery.as_mut().unwrap().disaggregated = true;
        assert_eq!(config.validate(), Ok(Mode::Disaggregated));
        for (etcd, namespace) in [("http://x:1", "default"), ("etcd://x:1", "A/B")] {
            let discovery = config.discovery.as_mut().unwrap();
            discovery.etcd = etcd.into();
            discovery.namespace = namespace.into();
            assert!(
                matches!(config.validate(), Err(ConfigError::Invalid(_))),
                "{etcd} {namespace}"
            );
        }
    }

    #[test]
    fn toml_holds_the_same_settings() {
        let config: RouterConfig = toml::from_str(
            r#"
            port = 9000
            prefill = ["http://127.0.0.1:8100"]
            decode = ["http://127.0.0.1:8200", "http://127.0.0.1:8201"]
            policy = "least_loaded"
            decode_policy = "prefix"
            [retry]
            max_attempts = 5
            "#,
        )
        .unwrap();
        assert_eq!(config.port, 9000);
        assert_eq!(config.validate(), Ok(Mode::Disaggregated));
        assert_eq!(config.prefill_policy(), PolicyKind::LeastLoaded);
        assert_eq!(config.decode_policy(), PolicyKind::Prefix);
        assert_eq!(config.retry.max_attempts, 5);
        assert_eq!(config.retry.multiplier, 2.0, "unset fields keep defaults");
        let typo = toml::from_str::<RouterConfig>("prot = 1");
        assert!(typo.is_err(), "unknown keys are errors");
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let retry = RetryConfig::default();
        assert_eq!(retry.backoff(1, 0.5), Duration::from_millis(20));
        assert_eq!(retry.backoff(2, 0.5), Duration::from_millis(40));
        assert_eq!(retry.backoff(20, 0.5), Duration::from_millis(2000));
        assert_eq!(retry.backoff(1, 0.0), Duration::from_millis(16));
        assert_eq!(retry.backoff(1, 1.0), Duration::from_millis(24));
    }

    #[test]
    fn client_limits_default_below_a_workers_and_are_checked() {
        let mut config: RouterConfig =
            toml::from_str("workers = [\"http://a:1\"]\nheader_read_timeout_secs = 2").unwrap();
        let limits = config.http_limits();
        assert_eq!(limits.header_read_timeout, Duration::from_secs(2));
        assert_eq!(
            limits.body_read_timeout,
            tandem_httpd::DEFAULT_BODY_READ_TIMEOUT
        );
        assert!(limits.max_body_bytes < HttpLimits::default().max_body_bytes);
        config.body_read_timeout_secs = 0;
        assert!(matches!(config.validate(), Err(ConfigError::Limits(_))));
    }

    #[test]
    fn urls_are_normalized() {
        assert_eq!(normalize_url("http://h:1/").unwrap(), "http://h:1");
        assert!(normalize_url("ftp://h").is_err());
        assert!(normalize_url("http://").is_err());
    }

    #[test]
    fn urls_with_credentials_are_refused_without_showing_them() {
        for url in [
            "http://user:pw-123@h:1",
            "https://pw-123@h:1/v1",
            "user:pw-123@h:1",
            "http://a:b@c:pw-123@h:1",
        ] {
            let err = normalize_url(url).unwrap_err();
            assert!(matches!(err, ConfigError::Credentials(_)), "{url}");
            assert!(!err.to_string().contains("pw-123"), "{err}");
        }
        assert_eq!(
            normalize_url("http://h:1/a@b").unwrap(),
            "http://h:1/a@b",
            "an @ in the path is no credential"
        );
    }

    #[test]
    fn debug_never_shows_credentials() {
        let config: RouterConfig = toml::from_str(
            r#"
            workers = ["http://127.0.0.1:1"]
            api_key = "client-key-1"
            admin_token = "admin-token-1"
            worker_api_key = "worker-key-1"
            client_kv_transfer_params = "reject"
            require_prefill = true
            "#,
        )
        .unwrap();
        let debug = format!("{config:?}");
        for secret in ["client-key-1", "admin-token-1", "worker-key-1"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        assert_eq!(config.client_kv_transfer_params, ClientParamsPolicy::Reject);
        assert!(config.require_prefill);
        assert_eq!(
            RouterConfig::default().client_kv_transfer_params,
            ClientParamsPolicy::Strip
        );
    }

    #[test]
    fn worker_keys_must_fit_a_header() {
        let mut config = RouterConfig {
            workers: vec!["http://a:1".into()],
            worker_api_key: Some(Secret::new("two words")),
            ..RouterConfig::default()
        };
        assert_eq!(config.validate(), Err(ConfigError::WorkerKey));
        config.worker_api_key = Some(Secret::new("k-1"));
        assert_eq!(config.validate(), Ok(Mode::Replicated));
    }
}
