//! Turning a row of logits into the next token: logits adjusted (bias, end tokens
//! held back, repetition, presence and frequency penalties), then greedy, or
//! temperature sampling restricted by top-k, min-p and top-p, reproducible with a
//! seed.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Seed for reproducible sampling; `None` draws one from the OS.
    pub seed: Option<u64>,
    /// Subtracted from the logit of every token already generated (OpenAI semantics).
    pub presence_penalty: f32,
    /// Subtracted once per earlier occurrence of a token in the output.
    pub frequency_penalty: f32,
    /// Divides a positive logit (multiplies a negative one) of every token already in
    /// the prompt or the output (vLLM's and Hugging Face's semantics; 1 = off).
    pub repetition_penalty: f32,
    /// Drops tokens less likely than `min_p` times the most likely one (0 = off).
    pub min_p: f32,
    /// Added to the logits of these tokens (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// The end tokens cannot be sampled before this many output tokens.
    pub min_tokens: usize,
    /// Report each token's log probability and those of this many most likely tokens.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            min_p: 0.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    fn is_greedy(&self) -> bool {
        self.temperature < 1e-5 || self.top_k == 1
    }

    /// Whether the logits change before sampling (penalties, biases, end tokens held
    /// back), which needs a copy of them.
    fn adjusts_logits(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
            || !self.logit_bias.is_empty()
            || self.min_tokens > 0
    }
}

/// One row's sampling as a device replays it ([`Sampler::device_draw`]): the filters,
/// the draw this sampler would have made, and the changes its adjustments make to
/// single logits. Laid out as the GPU kernel `sample_rows` reads it (after
/// `adjust_start`/`adjust_count`, which the runner fills in).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceDraw {
    /// 0: greedy (the argmax of the adjusted logits).
    pub temperature: f32,
    /// 0: every token.
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    /// In [0, 1), from this sampler's generator (0 when greedy: no draw is made).
    pub uniform: f32,
    /// At most one per token.
    pub adjustments: Vec<LogitAdjustment>,
}

impl DeviceDraw {
    /// Greedy with nothing adjusted: the plain argmax.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature == 0.0 && self.adjustments.is_empty()
    }
}

/// What [`Sampler`]'s adjustments do to one token's logit, in their order: `bias`
/// added, held back (-inf) when `banned`, divided (if positive) or multiplied (if
/// not) by `repetition`, then `penalty` subtracted.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct LogitAdjustment {
    pub token: u32,
    pub bias: f32,
    pub banned: u32,
    pub repetition: f32,
    pub penalty: f32,
}

impl LogitAdjustment {
    fn none(token: u32) -> Self {
        Self {
            token,
            bias: 0.0,
            banned: 0,
            repetition: 1.0,
            penalty: 0.0,
        }
    }
}

fn adjustment_of(by_token: &mut HashMap<u32, LogitAdjustment>, token: u32) -> &mut LogitAdjustment {
    by_token
        .entry(token)
        .or_insert_with(|| LogitAdjustment::none(token))
}

/// Sets the logits of tokens whose bit is clear in `allowed` to -inf.
fn mask_disallowed(logits: &mut [f32], allowed: &[u32]) {
    for (chunk_index, chunk) in logits.chunks_mut(32).enumerate() {
        let bits = allowed.get(chunk_index).copied().unwrap_or(0);
        if bits == u32::MAX {
            continue;
        }
        for (bit, logit) in chunk.iter_mut().enumerate() {
            if bits & (1 << bit) == 0 {
                *logit = f32::NEG_INFINITY;
            }
        }
    }
}

/// Candidates examined before falling back to sorting the whole vocabulary for top-p.
const TOP_P_FIRST_PASS: usize = 256;

/// Samples tokens for one sequence.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    candidates: Vec<(u32, f32)>,
    /// Occurrences of each token this sampler has produced (only with adjustments).
    output_counts: HashMap<u32, u32>,
    /// Tokens produced so far.
    produced: usize,
    /// The prompt's distinct tokens (only with a repetition penalty).
    prompt_tokens: Vec<u32>,
    /// Tokens that end the output (held back before `min_tokens`).
    end_tokens: Vec<u32>,
    penalized: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            candidates: Vec::new(),
            output_counts: HashMap::new(),
            produced: 0,
            prompt_tokens: Vec::new(),
            end_tokens: Vec::new(),
            penalized: Vec::new(),
        }
    }

    /// A sampler for a sequence: `prompt` for the repetition penalty, `end_tokens`
    /// held back until `min_tokens` tokens were produced.
    pub fn for_sequence(params: SamplingParams, prompt: &[u32], end_tokens: &[u32]) -> Self {
        let mut sampler = Self::new(params);
        if sampler.params.repetition_penalty != 1.0 {
            let mut distinct = prompt.to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            sampler.prompt_tokens = distinct;
        }
        if sampler.params.min_tokens > 0 {
            sampler.end_tokens = end_tokens.to_vec();
        }
        sampler
    }

    /// The next token; penalties count the tokens this sampler returned before.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.sample_allowed(logits, None)
    }

    /// The next token among those whose bit is set in `allowed` (a bit per token id,
    /// 32 to a word, low bit first), as a grammar allows them.
    pub fn sample_within(&mut self, logits: &[f32], allowed: &[u32]) -> u32 {
        self.sample_allowed(logits, Some(allowed))
    }

    fn sample_allowed(&mut self, logits: &[f32], allowed: Option<&[u32]>) -> u32 {
        if !self.params.adjusts_logits() && allowed.is_none() {
            self.produced += 1;
            return self.sample_from(logits);
        }
        let mut adjusted = std::mem::take(&mut self.penalized);
        adjusted.clear();
        adjusted.extend_from_slice(logits);
        self.adjust(&mut adjusted);
        if let Some(allowed) = allowed {
            mask_disallowed(&mut adjusted, allowed);
        }
        let token = self.sample_from(&adjusted);
        self.penalized = adjusted;
        *self.output_counts.entry(token).or_insert(0) += 1;
        self.produced += 1;
        token
    }

    /// Whether each token's log probabilities are reported (which needs the logits).
    pub fn reports_logprobs(&self) -> bool {
        self.params.logprobs.is_some()
    }

    /// This sampler's next choice for a device that holds the logits: the draw is
    /// made now, and the device picks what [`Sampler::sample`] would pick with it.
    /// `None` when the logits themselves are reported (log probabilities). Follow it
    /// with [`Sampler::record_device_token`].
    pub fn device_draw(&mut self) -> Option<DeviceDraw> {
        let params = &self.params;
        if params.logprobs.is_some() {
            return None;
        }
        let greedy = params.is_greedy();
        let adjustments = if params.adjusts_logits() {
            self.adjustments()
        } else {
            Vec::new()
        };
        Some(DeviceDraw {
            temperature: if greedy { 0.0 } else { params.temperature },
            top_k: params.top_k.min(u32::MAX as usize) as u32,
            top_p: params.top_p,
            min_p: params.min_p,
            uniform: if greedy {
                0.0
            } else {
                self.rng.random::<f32>()
            },
            adjustments,
        })
    }

    /// Counts a token a device picked for [`Sampler::device_draw`].
    pub fn record_device_token(&mut self, token: u32) {
        if self.params.adjusts_logits() {
            *self.output_counts.entry(token).or_insert(0) += 1;
        }
        self.produced += 1;
    }

    /// [`Sampler::adjust`]'s changes, one entry per token it touches.
    fn adjustments(&self) -> Vec<LogitAdjustment> {
        let params = &self.params;
        let mut by_token: HashMap<u32, LogitAdjustment> = HashMap::new();
        for &(token, bias) in &params.logit_bias {
            adjustment_of(&mut by_token, token).bias += bias;
        }
        if self.produced < params.min_tokens {
            for &token in &self.end_tokens {
                adjustment_of(&mut by_token, token).banned = 1;
            }
        }
        if params.repetition_penalty != 1.0 {
            for &token in self.prompt_tokens.iter().chain(self.output_counts.keys()) {
                adjustment_of(&mut by_token, token).repetition = params.repetition_penalty;
            }
        }
        for (&token, &count) in &self.output_counts {
            adjustment_of(&mut by_token, token).penalty =
                params.presence_penalty + params.frequency_penalty * count as f32;
        }
        let mut adjustments: Vec<LogitAdjustment> = by_token.into_values().collect();
        adjustments.sort_unstable_by_key(|a| a.token);
        adjustments
    }

    /// `token`'s log probabilities under the raw `logits`, when they are reported.
    pub fn logprobs(&self, logits: &[f32], token: u32) -> Option<TokenLogprobs> {
        self.params.logprobs.map(|k| logprobs_of(logits, token, k))
    }

    /// vLLM's order: logit bias, end tokens held back, the repetition penalty (prompt
    /// and output), then presence and frequency penalties (output).
    fn adjust(&self, logits: &mut [f32]) {
        let params = &self.params;
        for &(token, bias) in &params.logit_bias {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit += bias;
            }
        }
        if self.produced < params.min_tokens {
            for &token in &self.end_tokens {
                if let Some(logit) = logits.get_mut(token as usize) {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        if params.repetition_penalty != 1.0 {
            // Each seen token once: the prompt's (distinct, sorted), then the output's
            // that the prompt lacks.
            let output_only = self
                .output_counts
                .keys()
                .filter(|token| self.prompt_tokens.binary_search(token).is_err());
            for &token in self.prompt_tokens.iter().chain(output_only) {
                if let Some(logit) = logits.get_mut(token as usize) {
                    *logit = if *logit > 0.0 {
                        *logit / params.repetition_penalty
                    } else {
                        *logit * params.repetition_penalty
                    };
                }
            }
        }
        for (&token, &count) in &self.output_counts {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit -= params.presence_penalty + params.frequency_penalty * count as f32;
            }
        }
    }

    fn sample_from(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        self.candidates.clear();
        let inv_t = 1.0 / self.params.temperature;
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l * inv_t)),
        );
        let k = match self.params.top_k {
            0 => self.candidates.len(),
            k => k.min(self.candidates.len()),
        };
        keep_top(&mut self.candidates, k);
        to_probabilities(&mut self.candidates);
        if self.params.min_p > 0.0 {
            self.apply_min_p();
        }
        if self.params.top_p < 1.0 {
            self.apply_top_p();
        }
        // The draw walks the kept tokens in index order, which a GPU can follow without
        // sorting (`DeviceDraw`); top-k and top-p left them in another.
        if k < logits.len() || self.params.top_p < 1.0 {
            self.candidates.sort_unstable_by_key(|c| c.0);
        }
        // Sums over a vocabulary in f64: in f32 their rounding grows with the number of
        // tokens and, over a flat distribution, outgrows a single token's probability.
        let total: f64 = self.candidates.iter().map(|c| f64::from(c.1)).sum();
        let mut target = f64::from(self.rng.random::<f32>()) * total;
        let candidates = &self.candidates;
        for &(token, p) in candidates {
            target -= f64::from(p);
            if target <= 0.0 {
                return token;
            }
        }
        candidates.last().map_or(0, |c| c.0)
    }

    /// Drops candidates less likely than `min_p` times the most likely one.
    fn apply_min_p(&mut self) {
        let best = self.candidates.iter().map(|c| c.1).fold(0.0, f32::max);
        let floor = self.params.min_p * best;
        self.candidates.retain(|c| c.1 >= floor);
        let total: f64 = self.candidates.iter().map(|c| f64::from(c.1)).sum();
        for c in &mut self.candidates {
            c.1 = (f64::from(c.1) / total) as f32;
        }
    }

    /// Keeps the most likely candidates whose cumulative probability reaches top_p.
    fn apply_top_p(&mut self) {
        let p = self.params.top_p;
        let candidates = &mut self.candidates;
        // A peaked distribution reaches p within its few hundred likeliest tokens:
        // sort only those, and the whole vocabulary only when they fall short.
        let first_pass = TOP_P_FIRST_PASS.min(candidates.len());
        if first_pass < candidates.len() {
            candidates.select_nth_unstable_by(first_pass, |a, b| b.1.total_cmp(&a.1));
        }
        sort_descending(&mut candidates[..first_pass]);
        let kept = match smallest_set_reaching(&candidates[..first_pass], p) {
            Some(kept) => kept,
            None => {
                sort_descending(candidates);
                smallest_set_reaching(candidates, p).unwrap_or(candidates.len())
            }
        };
        candidates.truncate(kept);
    }
}

/// How many of `sorted` (most likely first) it takes for their probabilities to reach
/// `p`; `None` when all of them fall short.
fn smallest_set_reaching(sorted: &[(u32, f32)], p: f32) -> Option<usize> {
    let mut cumulative = 0.0f64;
    sorted
        .iter()
        .position(|c| {
            cumulative += f64::from(c.1);
            cumulative >= f64::from(p)
        })
        .map(|i| i + 1)
}

/// The log probability of a sampled token and of the most likely tokens, from the
/// model's raw logits (vLLM's default `raw_logprobs`: before penalties, biases and
/// temperature).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// The token's place among all tokens, most likely first (1 for the most likely).
    pub rank: u32,
    /// The `k` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// [`TokenLogprobs`] of `token` and the `k` most likely tokens under `logits`.
pub fn logprobs_of(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    let log_total = max + sum.ln();
    let logprob = |l: f32| (l - log_total).max(-9999.0);
    let mut top: Vec<(u32, f32)> = Vec::new();
    if k > 0 {
        top = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        keep_top(&mut top, k);
        sort_descending(&mut top);
        top.iter_mut().for_each(|entry| entry.1 = logprob(entry.1));
    }
    let logit = logits
        .get(token as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    TokenLogprobs {
        logprob: logprob(logit),
        rank: 1 + logits.iter().filter(|&&l| l > logit).count() as u32,
        top,
    }
}

/// Index of the largest logit (the first one on ties, as llama.cpp; NaN skipped, an
/// all-NaN or empty row gives 0).
pub fn argmax(logits: &[f32]) -> u32 {
    crate::kernels::ops::argmax(logits).unwrap_or(0) as u32
}

/// Keeps the `k` largest candidates (unordered).
fn keep_top(candidates: &mut Vec<(u32, f32)>, k: usize) {
    if k < candidates.len() {
        candidates.select_nth_unstable_by(k, |a, b| b.1.total_cmp(&a.1));
        candidates.truncate(k);
    }
}

fn sort_descending(candidates: &mut [(u32, f32)]) {
    candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
}

/// Softmax over the candidates' scaled logits.
fn to_probabilities(candidates: &mut [(u32, f32)]) {
    let max = candidates
        .iter()
        .map(|c| c.1)
        .fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for c in candidates.iter_mut() {
        c.1 = (c.1 - max).exp();
        sum += f64::from(c.1);
    }
    for c in candidates.iter_mut() {
        c.1 = (f64::from(c.1) / sum) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_first_maximum() {
        let mut sampler = Sampler::new(SamplingParams::greedy());
        assert_eq!(sampler.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
    }

    #[test]
    fn only_allowed_tokens_are_chosen() {
        // 40 tokens: the best (7) is not allowed; 33 (second word) and 2 are.
        let mut logits = vec![0.0f32; 40];
        logits[7] = 9.0;
        logits[33] = 5.0;
        logits[2] = 4.0;
        let allowed = [1 << 2, 1 << 1];
        let mut greedy = Sampler::new(SamplingParams::greedy());
        assert_eq!(greedy.sample_within(&logits, &allowed), 33);
        let mut sampled = Sampler::new(SamplingParams {
            temperature: 2.0,
            seed: Some(3),
            ..SamplingParams::default()
        });
        for _ in 0..200 {
            assert!([2, 33].contains(&sampled.sample_within(&logits, &allowed)));
        }
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let params = SamplingParams {
            temperature: 5.0,
            top_k: 1,
            seed: Some(1),
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(params);
        for _ in 0..50 {
            assert_eq!(sampler.sample(&[0.0, 0.5, 0.4]), 1);
        }
    }

    #[test]
    fn top_k_never_samples_outside_the_k_best() {
        let params = SamplingParams {
            temperature: 10.0,
            top_k: 2,
            seed: Some(7),
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(params);
        let logits = [1.0, 5.0, 4.9, 0.0, 4.8];
        for _ in 0..500 {
            let t = sampler.sample(&logits);
            assert!(t == 1 || t == 2, "sampled {t}");
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps tokens 0 and 1.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.8,
            seed: Some(3),
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(params);
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[sampler.sample(&logits) as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        assert!(seen[0] > seen[1] && seen[1] > 0, "{seen:?}");
    }

    #[test]
    fn a_device_draw_adjusts_the_logits_as_the_host_does() {
        let params = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            repetition_penalty: 1.5,
            logit_bias: vec![(1, 2.0), (6, -1.0), (99, 5.0)],
            min_tokens: 3,
            seed: Some(1),
            ..SamplingParams::default()
        };
        let logits = [0.5f32, -1.0, 2.0, -0.25, 1.0, 0.0, 3.0, -2.0];
        let mut sampler = Sampler::for_sequence(params, &[2, 3, 2], &[7]);
        for token in [4, 4, 0] {
            let draw = sampler.device_draw().unwrap();
            // What the kernel does with the draw's adjustments.
            let mut device = logits.to_vec();
            for a in &draw.adjustments {
                let Some(logit) = device.get_mut(a.token as usize) else {
                    continue;
                };
                let mut l = *logit + a.bias;
                if a.banned != 0 {
                    l = f32::NEG_INFINITY;
                }
                if a.repetition != 1.0 {
                    l = if l > 0.0 {
                        l / a.repetition
                    } else {
                        l * a.repetition
                    };
                }
                *logit = l - a.penalty;
            }
            let mut host = logits.to_vec();
            sampler.adjust(&mut host);
            assert_eq!(device, host, "after {} tokens", sampler.produced);
            assert!(draw.uniform >= 0.0 && draw.uniform < 1.0);
            sampler.record_device_token(token);
        }
        // Held back until min_tokens were produced, then not.
        let draw = sampler.device_draw().unwrap();
        assert!(draw.adjustments.iter().all(|a| a.banned == 0));
    }

    #[test]
    fn a_greedy_device_draw_draws_nothing_and_logprobs_stay_on_the_host() {
        let mut greedy = Sampler::new(SamplingParams::greedy());
        let draw = greedy.device_draw().unwrap();
        assert!(draw.is_plain_greedy() && draw.uniform == 0.0);
        let mut reporting = Sampler::new(SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy()
        });
        assert_eq!(reporting.device_draw(), None);
    }

    #[test]
    fn top_p_looks_past_the_first_candidates_of_a_flat_distribution() {
        // 1,000 equally likely tokens: top_p 0.9 keeps 900 of them, far more than the
        // first pass examines.
        let logits = vec![0.0f32; 1000];
        let mut sampler = Sampler::new(SamplingParams {
            top_p: 0.9,
            seed: Some(5),
            ..SamplingParams::default()
        });
        let mut seen = vec![false; logits.len()];
        for _ in 0..20_000 {
            seen[sampler.sample(&logits) as usize] = true;
        }
        let distinct = seen.iter().filter(|&&s| s).count();
        // 900 thousandths may add up to just under 0.9 in f32: then 901 are kept.
        assert!(
            (850..=901).contains(&distinct),
            "{distinct} distinct tokens"
        );
    }

    #[test]
    fn penalties_push_away_from_repeats() {
        let logits = [2.0f32, 1.9, 0.0];
        let mut plain = Sampler::new(SamplingParams::greedy());
        assert_eq!((plain.sample(&logits), plain.sample(&logits)), (0, 0));
        let mut presence = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            ..SamplingParams::greedy()
        });
        assert_eq!(presence.sample(&logits), 0);
        assert_eq!(presence.sample(&logits), 1, "token 0 penalised by 0.5");
        // Both used once now: 1.5 vs 1.4.
        assert_eq!(presence.sample(&logits), 0);
        let mut frequency = Sampler::new(SamplingParams {
            frequency_penalty: 0.06,
            ..SamplingParams::greedy()
        });
        let picks: Vec<u32> = (0..4).map(|_| frequency.sample(&logits)).collect();
        // 2.0, then 1.94 vs 1.9, then 1.88 vs 1.9 -> 1, then 1.88 vs 1.84 -> 0.
        assert_eq!(picks, vec![0, 0, 1, 0]);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        // Token 0 is in the prompt: 3.0 / 2 = 1.5 < 2.0.
        let mut sampler = Sampler::for_sequence(params.clone(), &[0, 0], &[]);
        assert_eq!(sampler.sample(&[3.0, 2.0, -1.0]), 1);
        // Now 1 is in the output too: 1.5, 1.0, and -1.0 untouched.
        assert_eq!(sampler.sample(&[3.0, 2.0, -1.0]), 0);
        let mut negative = Sampler::for_sequence(params, &[0], &[]);
        // -1 * 2 = -2 < -1.5.
        assert_eq!(negative.sample(&[-1.0, -1.5]), 1);
    }

    #[test]
    fn logit_bias_and_min_tokens_move_the_choice() {
        let biased = SamplingParams {
            logit_bias: vec![(2, 5.0)],
            ..SamplingParams::greedy()
        };
        assert_eq!(Sampler::new(biased).sample(&[1.0, 0.0, -1.0]), 2);
        let held = SamplingParams {
            min_tokens: 2,
            ..SamplingParams::greedy()
        };
        // Token 0 ends the output: held back for two tokens.
        let mut sampler = Sampler::for_sequence(held, &[], &[0]);
        let logits = [5.0, 1.0, 0.0];
        let picks: Vec<u32> = (0..3).map(|_| sampler.sample(&logits)).collect();
        assert_eq!(picks, vec![1, 1, 0]);
    }

    #[test]
    fn min_p_drops_tokens_far_below_the_best() {
        // p ~ [0.66, 0.24, 0.09, 0.01]: min_p 0.2 keeps tokens 0 and 1 (floor 0.13).
        let logits = [3.0f32, 2.0, 1.0, -1.0];
        let mut sampler = Sampler::new(SamplingParams {
            min_p: 0.2,
            seed: Some(5),
            ..SamplingParams::default()
        });
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[sampler.sample(&logits) as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        assert!(seen[1] > 0, "{seen:?}");
    }

    #[test]
    fn logprobs_are_the_log_softmax_and_the_top_tokens_come_first() {
        // softmax([ln 3, ln 1, ln 0.5... ]) with logits ln(6), ln(3), ln(1): p = .6, .3, .1.
        let logits = [6f32.ln(), 3f32.ln(), 1f32.ln()];
        let lp = logprobs_of(&logits, 1, 2);
        assert!((lp.logprob - 0.3f32.ln()).abs() < 1e-5, "{lp:?}");
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!((lp.top[0].1 - 0.6f32.ln()).abs() < 1e-5);
        assert!(logprobs_of(&logits, 2, 0).top.is_empty());
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let params = SamplingParams {
            temperature: 0.9,
            seed: Some(42),
            ..SamplingParams::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(params);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([ln 3, 0]) = [0.75, 0.25]
        let logits = [3f32.ln(), 0.0];
        let mut sampler = Sampler::new(SamplingParams {
            seed: Some(11),
            ..SamplingParams::default()
        });
        let zeros = (0..4000).filter(|_| sampler.sample(&logits) == 0).count();
        let share = zeros as f64 / 4000.0;
        assert!((share - 0.75).abs() < 0.03, "share of token 0: {share}");
    }
}
