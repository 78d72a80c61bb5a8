//! Worker selection policies behind one pure trait: no HTTP types, no runtime, so each
//! is unit-tested on plain data. The router asks a policy to pick among the workers
//! that can take a request now (healthy, not draining, not excluded by a retry).
//!
//! - `round_robin`, `random`: load-blind.
//! - `least_loaded`: fewest in-flight requests, then fewest in-flight tokens.
//! - `power_of_two`: two random candidates, the less loaded of them.
//! - `prefix`: cache-aware; an approximate prefix tree of recent request texts per
//!   worker, falling back to the least-loaded worker when load is imbalanced.
//! - `kv_aware`: cache-aware from the workers' own KV events ([`PrefixLookup`]): the
//!   lowest cost of prompt still to compute plus KV already held.

use std::fmt::Debug;
use std::sync::Arc;

/// One worker that could take the request, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// The worker's base URL: its stable identity.
    pub url: &'a str,
    /// Requests routed to it that have not finished.
    pub in_flight_requests: usize,
    /// The tokens those requests still make the worker compute: their prompt tokens,
    /// minus those `kv_aware` predicted it holds, plus their maximum output. On a
    /// compute-bound worker this, not the KV footprint, is the queue a new request
    /// waits behind.
    pub in_flight_tokens: usize,
}

/// What a policy may look at in the request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestInfo<'a> {
    /// The prompt text (for chat, the messages' contents joined), for `prefix`.
    pub text: &'a str,
    /// The prompt's token ids as the workers see them (chat template applied), when
    /// the router has them (`kv_aware`); `None` otherwise.
    pub tokens: Option<&'a [u32]>,
}

/// What `kv_aware` asks of the router's view of the workers' KV caches (built from
/// their KV events): per worker, how many leading tokens of a prompt it holds.
pub trait PrefixLookup: Send + Sync + Debug {
    /// For each of `urls`, in order: the number of leading `tokens` that worker holds
    /// in its KV cache (whole blocks only), or `None` when its cache is unknown (no
    /// event stream, stream lost or stale).
    fn cached_prefix_tokens(&self, urls: &[&str], tokens: &[u32]) -> Vec<Option<usize>>;

    /// The router just sent a request to `url`: events from it are due (a worker that
    /// takes requests but sends no events has lost its stream).
    fn note_routed(&self, _url: &str) {}
}

/// A policy's choice, with what it expects of the chosen worker's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    /// The index in the candidates.
    pub index: usize,
    /// Prompt tokens the policy expects the worker to find cached, if it knows.
    pub predicted_cached_tokens: Option<usize>,
}

impl Pick {
    /// A choice that predicts nothing about the cache.
    pub fn plain(index: usize) -> Self {
        Self {
            index,
            predicted_cached_tokens: None,
        }
    }
}

/// Picks one of the candidates; `None` only when there are none.
pub trait Policy: Send + Sync + Debug {
    fn name(&self) -> &'static str;

    /// The index in `candidates` of the chosen worker.
    fn select(&self, candidates: &[Candidate<'_>], request: &RequestInfo<'_>) -> Option<usize>;

    /// [`Self::select`], with the policy's cache prediction when it makes one.
    fn pick(&self, candidates: &[Candidate<'_>], request: &RequestInfo<'_>) -> Option<Pick> {
        self.select(candidates, request).map(Pick::plain)
    }

    /// Forgets a worker that left the pool.
    fn forget(&self, _url: &str) {}
}

/// The policies by name (`--policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    RoundRobin,
    Random,
    LeastLoaded,
    PowerOfTwo,
    Prefix,
    KvAware,
}

mod kv_aware;
mod least_loaded;
mod power_of_two;
mod prefix;
mod random;
mod round_robin;

pub use kv_aware::{KvAware, KvAwareConfig, KvAwareConfigError, reusable_part};
pub use least_loaded::LeastLoaded;
pub use power_of_two::PowerOfTwo;
pub use prefix::{PrefixCache, PrefixConfig, PrefixPolicy};
pub use random::Random;
pub use round_robin::RoundRobin;

impl PolicyKind {
    /// Every policy, in the order the CLI lists them.
    pub const ALL: [PolicyKind; 6] = [
        PolicyKind::RoundRobin,
        PolicyKind::Random,
        PolicyKind::LeastLoaded,
        PolicyKind::PowerOfTwo,
        PolicyKind::Prefix,
        PolicyKind::KvAware,
    ];

    /// The name used on the command line, in config files and by `Policy::name`.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::RoundRobin => "round_robin",
            PolicyKind::Random => "random",
            PolicyKind::LeastLoaded => "least_loaded",
            PolicyKind::PowerOfTwo => "power_of_two",
            PolicyKind::Prefix => "prefix",
            PolicyKind::KvAware => "kv_aware",
        }
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy name that is not one of `PolicyKind::ALL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownPolicy(pub String);

impl std::fmt::Display for UnknownPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let choices: Vec<&str> = PolicyKind::ALL.iter().map(|kind| kind.as_str()).collect();
        write!(
            f,
            "unknown policy `{}`; expected one of: {}",
            self.0,
            choices.join(", ")
        )
    }
}

impl std::error::Error for UnknownPolicy {}

impl std::str::FromStr for PolicyKind {
    type Err = UnknownPolicy;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == name)
            .ok_or_else(|| UnknownPolicy(name.to_owned()))
    }
}

/// What the policies need beyond their kind.
#[derive(Debug, Clone, Default)]
pub struct PolicySettings {
    pub prefix: PrefixConfig,
    pub kv_aware: KvAwareConfig,
    /// The workers' KV caches as their events tell; `kv_aware` without it knows no
    /// cache and is `least_loaded`.
    pub lookup: Option<Arc<dyn PrefixLookup>>,
}

/// A lookup for routers that follow no KV events: every cache is unknown.
#[derive(Debug)]
struct NoEvents;

impl PrefixLookup for NoEvents {
    fn cached_prefix_tokens(&self, urls: &[&str], _tokens: &[u32]) -> Vec<Option<usize>> {
        vec![None; urls.len()]
    }
}

/// The policy of that kind, configured from `settings`.
pub fn build(kind: PolicyKind, settings: &PolicySettings) -> Box<dyn Policy> {
    match kind {
        PolicyKind::RoundRobin => Box::new(RoundRobin::new()),
        PolicyKind::Random => Box::new(Random::new()),
        PolicyKind::LeastLoaded => Box::new(LeastLoaded::new()),
        PolicyKind::PowerOfTwo => Box::new(PowerOfTwo::new()),
        PolicyKind::Prefix => Box::new(PrefixPolicy::new(settings.prefix.clone())),
        PolicyKind::KvAware => {
            let lookup = settings
                .lookup
                .clone()
                .unwrap_or_else(|| Arc::new(NoEvents));
            Box::new(KvAware::new(settings.kv_aware.clone(), lookup))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_the_built_policy() {
        for kind in PolicyKind::ALL {
            assert_eq!(kind.as_str().parse::<PolicyKind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.as_str());
            assert_eq!(
                build(kind, &PolicySettings::default()).name(),
                kind.as_str()
            );
        }
    }

    #[test]
    fn unknown_name_lists_the_choices() {
        let error = "cache_aware".parse::<PolicyKind>().unwrap_err();
        assert_eq!(
            error.to_string(),
            "unknown policy `cache_aware`; expected one of: \
             round_robin, random, least_loaded, power_of_two, prefix, kv_aware"
        );
    }

    #[test]
    fn every_policy_gives_none_for_no_candidates_and_forgets_unknown_workers() {
        for kind in PolicyKind::ALL {
            let policy = build(kind, &PolicySettings::default());
            assert_eq!(
                policy.select(
                    &[],
                    &RequestInfo {
                        text: "hi",
                        tokens: None
                    }
                ),
                None
            );
            policy.forget("http://never-seen");
        }
    }

    #[test]
    fn every_policy_picks_the_only_candidate() {
        let only = [Candidate {
            url: "http://only",
            in_flight_requests: 7,
            in_flight_tokens: 700,
        }];
        for kind in PolicyKind::ALL {
            let policy = build(kind, &PolicySettings::default());
            for _ in 0..3 {
                assert_eq!(
                    policy.select(
                        &only,
                        &RequestInfo {
                            text: "hi",
                            tokens: None
                        }
                    ),
                    Some(0)
                );
            }
        }
    }

    #[test]
    fn prefix_config_reads_partial_toml() {
        let config: PrefixConfig = toml::from_str("cache_threshold = 0.3").unwrap();
        assert_eq!(
            config,
            PrefixConfig {
                cache_threshold: 0.3,
                ..PrefixConfig::default()
            }
        );
        let empty: PrefixConfig = toml::from_str("").unwrap();
        assert_eq!(empty, PrefixConfig::default());
        assert!(toml::from_str::<PrefixConfig>("cache_treshold = 0.3").is_err());
    }
}
