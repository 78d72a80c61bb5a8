//! Worker selection policies behind one pure trait: no HTTP types, no runtime, so each
//! is unit-tested on plain data. The router asks a policy to pick among the workers
//! that can take a request now (healthy, not draining, not excluded by a retry).
//!
//! - `round_robin`, `random`: load-blind.
//! - `least_loaded`: fewest in-flight requests, then fewest in-flight tokens.
//! - `power_of_two`: two random candidates, the less loaded of them.
//! - `prefix`: cache-aware; an approximate prefix tree of recent request texts per
//!   worker, falling back to the least-loaded worker when load is imbalanced.

use std::fmt::Debug;

/// One worker that could take the request, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// The worker's base URL: its stable identity.
    pub url: &'a str,
    /// Requests routed to it that have not finished.
    pub in_flight_requests: usize,
    /// Prompt plus maximum output tokens of those requests (an estimate).
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
}

/// Picks one of the candidates; `None` only when there are none.
pub trait Policy: Send + Sync + Debug {
    fn name(&self) -> &'static str;

    /// The index in `candidates` of the chosen worker.
    fn select(&self, candidates: &[Candidate<'_>], request: &RequestInfo<'_>) -> Option<usize>;

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
}

mod least_loaded;
mod power_of_two;
mod prefix;
mod random;
mod round_robin;

pub use least_loaded::LeastLoaded;
pub use power_of_two::PowerOfTwo;
pub use prefix::{PrefixCache, PrefixConfig, PrefixPolicy};
pub use random::Random;
pub use round_robin::RoundRobin;

impl PolicyKind {
    /// Every policy, in the order the CLI lists them.
    pub const ALL: [PolicyKind; 5] = [
        PolicyKind::RoundRobin,
        PolicyKind::Random,
        PolicyKind::LeastLoaded,
        PolicyKind::PowerOfTwo,
        PolicyKind::Prefix,
    ];

    /// The name used on the command line, in config files and by `Policy::name`.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::RoundRobin => "round_robin",
            PolicyKind::Random => "random",
            PolicyKind::LeastLoaded => "least_loaded",
            PolicyKind::PowerOfTwo => "power_of_two",
            PolicyKind::Prefix => "prefix",
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

/// The policy of that kind; `prefix` is only read by `PolicyKind::Prefix`.
pub fn build(kind: PolicyKind, prefix: &PrefixConfig) -> Box<dyn Policy> {
    match kind {
        PolicyKind::RoundRobin => Box::new(RoundRobin::new()),
        PolicyKind::Random => Box::new(Random::new()),
        PolicyKind::LeastLoaded => Box::new(LeastLoaded::new()),
        PolicyKind::PowerOfTwo => Box::new(PowerOfTwo::new()),
        PolicyKind::Prefix => Box::new(PrefixPolicy::new(prefix.clone())),
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
            assert_eq!(build(kind, &PrefixConfig::default()).name(), kind.as_str());
        }
    }

    #[test]
    fn unknown_name_lists_the_choices() {
        let error = "cache_aware".parse::<PolicyKind>().unwrap_err();
        assert_eq!(
            error.to_string(),
            "unknown policy `cache_aware`; expected one of: \
             round_robin, random, least_loaded, power_of_two, prefix"
        );
    }

    #[test]
    fn every_policy_gives_none_for_no_candidates_and_forgets_unknown_workers() {
        for kind in PolicyKind::ALL {
            let policy = build(kind, &PrefixConfig::default());
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
            let policy = build(kind, &PrefixConfig::default());
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
