//! `kv_aware`: picks the worker by what it would cost to serve the request there, from
//! the workers' own KV-cache events (Dynamo's KV router cost, see
//! `../shared/reference/routers-survey.md` §5.2):
//!
//! ```text
//! cost(w) = overlap_weight × prefill_blocks(w) + decode_blocks(w)
//! prefill_blocks(w) = ⌈(prompt tokens − tokens w holds) / block_size⌉
//! decode_blocks(w)  = in-flight tokens on w / block_size
//! ```
//!
//! The first term is the prompt w would have to compute, the second the KV its running
//! requests hold (the router's own estimate: prompt plus maximum output of each). With
//! `temperature = 0` the cheapest worker wins (ties: fewer in-flight requests, then
//! turns); above 0, a worker is drawn with probability ∝ `exp(−normalised cost / T)`,
//! so that several routers with the same view do not all herd onto the same worker.
//!
//! The cached prefixes come from a [`PrefixLookup`]; a worker whose cache is unknown
//! counts as holding nothing. Without the prompt's token ids (the router could not
//! tokenize it) the policy is `least_loaded`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;

use super::least_loaded::least_loaded_from;
use super::{Candidate, Pick, Policy, PrefixLookup, RequestInfo};

/// Tuning for `kv_aware` (a TOML table `[kv_aware]`; every field optional, unknown
/// fields are errors).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvAwareConfig {
    /// Weight of one block of this prompt still to compute against one block of work
    /// the worker already has (see `Candidate::in_flight_tokens`): higher follows the
    /// cache harder, 0 ignores it. 2, not Dynamo's 1: a prefix computed again costs
    /// capacity every later request waits for, which a per-request cost misses; on
    /// four one-thread workers (docs/benchmarks.md) 1 reached 66–78% of the oracle's
    /// hit rate on shared prefixes at concurrency 4, 2 reached it.
    pub overlap_weight: f64,
    /// 0: always the cheapest worker. Above 0: a softmax draw over normalised costs.
    pub temperature: f64,
    /// Tokens per block in the cost when a worker's own block size is not known.
    pub block_size: usize,
    /// How long the router waits for a worker's `/tokenize` before routing the request
    /// without the cache (the dispatcher's setting; the policy does not read it).
    pub tokenize_timeout_ms: u64,
}

impl Default for KvAwareConfig {
    fn default() -> Self {
        Self {
            overlap_weight: 2.0,
            temperature: 0.0,
            block_size: 16,
            tokenize_timeout_ms: 2000,
        }
    }
}

/// A `KvAwareConfig` that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KvAwareConfigError {
    #[error("kv_aware.overlap_weight must be a finite number >= 0, not {0}")]
    OverlapWeight(f64),
    #[error("kv_aware.temperature must be a finite number >= 0, not {0}")]
    Temperature(f64),
    #[error("kv_aware.block_size must be at least 1")]
    BlockSize,
    #[error("kv_aware.tokenize_timeout_ms must be at least 1")]
    TokenizeTimeout,
}

impl KvAwareConfig {
    pub fn validate(&self) -> Result<(), KvAwareConfigError> {
        if !(self.overlap_weight.is_finite() && self.overlap_weight >= 0.0) {
            return Err(KvAwareConfigError::OverlapWeight(self.overlap_weight));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(KvAwareConfigError::Temperature(self.temperature));
        }
        if self.block_size == 0 {
            return Err(KvAwareConfigError::BlockSize);
        }
        if self.tokenize_timeout_ms == 0 {
            return Err(KvAwareConfigError::TokenizeTimeout);
        }
        Ok(())
    }
}

pub struct KvAware {
    config: KvAwareConfig,
    lookup: Arc<dyn PrefixLookup>,
    /// Where tie-breaking scans start; advances on every call.
    rotation: AtomicUsize,
}

impl std::fmt::Debug for KvAware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvAware")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl KvAware {
    pub fn new(config: KvAwareConfig, lookup: Arc<dyn PrefixLookup>) -> Self {
        Self {
            config,
            lookup,
            rotation: AtomicUsize::new(0),
        }
    }

    /// Each candidate's cost for a prompt of `prompt_len` tokens of which it holds
    /// `cached[i]`.
    fn costs(&self, candidates: &[Candidate<'_>], prompt_len: usize, cached: &[usize]) -> Vec<f64> {
        let block = self.config.block_size as f64;
        candidates
            .iter()
            .zip(cached)
            .map(|(candidate, &held)| {
                let to_compute = prompt_len.saturating_sub(held) as f64;
                let prefill_blocks = (to_compute / block).ceil();
                let decode_blocks = candidate.in_flight_tokens as f64 / block;
                self.config.overlap_weight * prefill_blocks + decode_blocks
            })
            .collect()
    }

    /// The cheapest candidate; ties go to fewer in-flight requests, then to the first
    /// at or after `start`.
    fn cheapest(&self, candidates: &[Candidate<'_>], costs: &[f64], start: usize) -> Option<usize> {
        let len = candidates.len();
        (0..len)
            .map(|step| (start % len + step) % len)
            .min_by_key(|&index| {
                (
                    OrderedCost(costs[index]),
                    candidates[index].in_flight_requests,
                )
            })
    }

    fn draw(&self, costs: &[f64]) -> usize {
        let weights = softmax_weights(costs, self.config.temperature);
        let total: f64 = weights.iter().sum();
        let mut point = rand::rng().random_range(0.0..total);
        for (index, weight) in weights.iter().enumerate() {
            if point < *weight {
                return index;
            }
            point -= weight;
        }
        weights.len() - 1
    }
}

impl Policy for KvAware {
    fn name(&self) -> &'static str {
        "kv_aware"
    }

    fn select(&self, candidates: &[Candidate<'_>], request: &RequestInfo<'_>) -> Option<usize> {
        self.pick(candidates, request).map(|pick| pick.index)
    }

    fn pick(&self, candidates: &[Candidate<'_>], request: &RequestInfo<'_>) -> Option<Pick> {
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        let Some(tokens) = request.tokens else {
            let index = least_loaded_from(candidates, start)?;
            return Some(Pick::plain(index));
        };
        if candidates.is_empty() {
            return None;
        }
        let urls: Vec<&str> = candidates.iter().map(|c| c.url).collect();
        let known = self
            .lookup
            .cached_prefix_tokens(&urls, reusable_part(tokens));
        let cached: Vec<usize> = known.iter().map(|held| held.unwrap_or(0)).collect();
        let costs = self.costs(candidates, tokens.len(), &cached);
        let index = if self.config.temperature > 0.0 {
            self.draw(&costs)
        } else {
            self.cheapest(candidates, &costs, start)?
        };
        Some(Pick {
            index,
            predicted_cached_tokens: known.get(index).copied().flatten(),
        })
    }
}

/// The part of a prompt a worker can take from its cache: all but the last token,
/// which engines always compute (they need its logits).
pub fn reusable_part(tokens: &[u32]) -> &[u32] {
    &tokens[..tokens.len().saturating_sub(1)]
}

/// Softmax weights of `exp(−(cost − min) / range / temperature)`: costs normalised to
/// 0..1 so that the temperature means the same whatever the prompt length.
fn softmax_weights(costs: &[f64], temperature: f64) -> Vec<f64> {
    let min = costs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = costs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let range = max - min;
    costs
        .iter()
        .map(|cost| {
            if range <= 0.0 {
                1.0
            } else {
                (-((cost - min) / range) / temperature).exp()
            }
        })
        .collect()
}

/// An `f64` cost with a total order (costs are finite and never NaN: sums and
/// products of finite non-negative numbers).
#[derive(Debug, Clone, Copy)]
struct OrderedCost(f64);

impl PartialEq for OrderedCost {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for OrderedCost {}

impl PartialOrd for OrderedCost {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrderedCost {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;

    /// A lookup answering fixed cached-token counts per URL (`None`: unknown).
    #[derive(Debug, Default)]
    struct FixedLookup {
        held: Mutex<HashMap<String, Option<usize>>>,
    }

    impl FixedLookup {
        fn with(entries: &[(&str, Option<usize>)]) -> Arc<Self> {
            let held = entries
                .iter()
                .map(|(url, held)| ((*url).to_owned(), *held))
                .collect();
            Arc::new(Self {
                held: Mutex::new(held),
            })
        }
    }

    impl PrefixLookup for FixedLookup {
        fn cached_prefix_tokens(&self, urls: &[&str], tokens: &[u32]) -> Vec<Option<usize>> {
            let held = self.held.lock().unwrap();
            urls.iter()
                .map(|url| {
                    held.get(*url)
                        .copied()
                        .flatten()
                        .map(|n| n.min(tokens.len()))
                })
                .collect()
        }
    }

    fn candidate(url: &'static str, requests: usize, tokens: usize) -> Candidate<'static> {
        Candidate {
            url,
            in_flight_requests: requests,
            in_flight_tokens: tokens,
        }
    }

    fn prompt(len: usize) -> Vec<u32> {
        (0..len as u32).collect()
    }

    fn policy(lookup: Arc<dyn PrefixLookup>, config: KvAwareConfig) -> KvAware {
        KvAware::new(config, lookup)
    }

    #[test]
    fn follows_the_worker_holding_the_prefix_when_loads_are_equal() {
        let lookup = FixedLookup::with(&[("a", Some(0)), ("b", Some(480)), ("c", Some(160))]);
        let policy = policy(lookup, KvAwareConfig::default());
        let candidates = [
            candidate("a", 1, 100),
            candidate("b", 1, 100),
            candidate("c", 1, 100),
        ];
        let tokens = prompt(500);
        let request = RequestInfo {
            text: "",
            tokens: Some(&tokens),
        };
        for _ in 0..5 {
            let pick = policy.pick(&candidates, &request).unwrap();
            assert_eq!(pick.index, 1);
            assert_eq!(pick.predicted_cached_tokens, Some(480));
        }
    }

    #[test]
    fn load_outweighs_a_small_cache_advantage() {
        // b holds 2 more blocks than a but runs 100 blocks' worth of requests.
        let lookup = FixedLookup::with(&[("a", Some(0)), ("b", Some(32))]);
        let policy = policy(lookup, KvAwareConfig::default());
        let candidates = [candidate("a", 0, 0), candidate("b", 4, 1600)];
        let tokens = prompt(64);
        let request = RequestInfo {
            text: "",
            tokens: Some(&tokens),
        };
        assert_eq!(policy.select(&candidates, &request), Some(0));
    }

    #[test]
    fn the_overlap_weight_trades_cache_against_load() {
        // a: nothing cached, idle. b: the whole 320-token prompt cached, 10 blocks busy.
        let lookup = FixedLookup::with(&[("a", Some(0)), ("b", Some(320))]);
        let candidates = [candidate("a", 0, 0), candidate("b", 2, 160)];
        let tokens = prompt(320);
        let request = RequestInfo {
            text: "",
            tokens: Some(&tokens),
        };
        // cost a = w × 20, cost b = 10.
        let follow = |w| {
            let config = KvAwareConfig {
                overlap_weight: w,
                ..KvAwareConfig::default()
            };
            policy(lookup.clone(), config).select(&candidates, &request)
        };
        assert_eq!(follow(1.0), Some(1));
        assert_eq!(follow(0.25), Some(0));
        assert_eq!(follow(0.0), Some(0));
    }

    #[test]
    fn unknown_caches_count_as_empty_and_predict_nothing() {
        let lookup = FixedLookup::with(&[("a", None), ("b", Some(0))]);
        let policy = policy(lookup, KvAwareConfig::default());
        let candidates = [candidate("a", 0, 0), candidate("b", 0, 0)];
        let tokens = prompt(100);
        let request = RequestInfo {
            text: "",
            tokens: Some(&tokens),
        };
        let mut predictions = Vec::new();
        for _ in 0..4 {
            let pick = policy.pick(&candidates, &request).unwrap();
            predictions.push((pick.index, pick.predicted_cached_tokens));
        }
        // Equal costs take turns; a's prediction is unknown, b's is "nothing cached".
        assert!(predictions.contains(&(0, None)), "{predictions:?}");
        assert!(predictions.contains(&(1, Some(0))), "{predictions:?}");
    }

    #[test]
    fn without_tokens_it_is_least_loaded() {
        let lookup = FixedLookup::with(&[("a", Some(1000)), ("b", Some(0))]);
        let policy = policy(lookup, KvAwareConfig::default());
        let candidates = [candidate("a", 3, 0), candidate("b", 1, 0)];
        let pick = policy.pick(&candidates, &RequestInfo::default()).unwrap();
        assert_eq!(pick, Pick::plain(1));
    }

    #[test]
    fn ties_go_to_fewer_requests_then_take_turns() {
        let lookup = FixedLookup::with(&[]);
        let policy = policy(lookup, KvAwareConfig::default());
        let tokens = prompt(16);
        let request = RequestInfo {
            text: "",
            tokens: Some(&tokens),
        };
        let fewer = [candidate("a", 2, 0), candidate("b", 1, 0)];
        assert_eq!(policy.select(&fewer, &request), Some(1));
        let equal = [
            candidate("a", 0, 0),
            candidate("b", 0, 0),
            candidate("c", 0, 0),
        ];
        let mut hits = [0; 3];
        for _ in 0..9 {
            hits[policy.select(&equal, &request).unwrap()] += 1;
        }
        assert_eq!(hits, [3, 3, 3]);
    }

    #[test]
    fn temperature_spreads_picks_but_favours_the_cheapest() {
        let lookup = FixedLookup::with(&[("a", Some(0)), ("b", Some(512))]);
        let config = KvAwareConfig {
            temperature: 0.5,
            ..KvAwareConfig::default()
        };
        let policy = policy(lookup, config);
        let candidates = [candidate("a", 0, 0), candidate("b", 0, 0)];
        let tokens = prompt(512);
        let request = RequestInfo {
            text: "",
            tokens: Some(&tokens),
        };
        let mut hits = [0; 2];
        for _ in 0..2000 {
            hits[policy.select(&candidates, &request).unwrap()] += 1;
        }
        // P(a) = e^-2 / (1 + e^-2) ≈ 0.12: both are drawn, b far more often.
        assert!(hits[0] > 100 && hits[0] < 400, "{hits:?}");
    }

    #[test]
    fn the_last_token_is_never_reusable() {
        assert_eq!(reusable_part(&[1, 2, 3]), &[1, 2]);
        assert_eq!(reusable_part(&[]), &[] as &[u32]);
    }

    #[test]
    fn softmax_of_equal_costs_is_uniform() {
        assert_eq!(softmax_weights(&[3.0, 3.0], 1.0), vec![1.0, 1.0]);
        let weights = softmax_weights(&[0.0, 10.0], 1.0);
        assert_eq!(weights[0], 1.0);
        assert!((weights[1] - (-1.0f64).exp()).abs() < 1e-12);
    }

    #[test]
    fn config_is_validated_and_reads_partial_toml() {
        assert!(KvAwareConfig::default().validate().is_ok());
        let bad = |config: KvAwareConfig| config.validate().unwrap_err();
        assert_eq!(
            bad(KvAwareConfig {
                temperature: -1.0,
                ..KvAwareConfig::default()
            }),
            KvAwareConfigError::Temperature(-1.0)
        );
        assert!(matches!(
            bad(KvAwareConfig {
                overlap_weight: f64::NAN,
                ..KvAwareConfig::default()
            }),
            KvAwareConfigError::OverlapWeight(_)
        ));
        assert_eq!(
            bad(KvAwareConfig {
                block_size: 0,
                ..KvAwareConfig::default()
            }),
            KvAwareConfigError::BlockSize
        );
        let config: KvAwareConfig = toml::from_str("temperature = 0.2").unwrap();
        assert_eq!(config.temperature, 0.2);
        assert_eq!(config.overlap_weight, 2.0);
        assert!(toml::from_str::<KvAwareConfig>("temprature = 0.2").is_err());
    }
}
