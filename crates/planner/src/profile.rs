//! A hardware profile: what one worker of a given size (cores) costs on this machine
//! for this model, from measured points, and what moving a prompt's KV costs.
//!
//! Measured points are fitted, not looked up: prefill time as `a + b·t + c·t²` in the
//! prompt's tokens `t` (weights, per-token work, attention over the prompt), a decode
//! step as `a + b·n + c·n·x` in the batch `n` and its mean context `x` (weights read
//! once a step, per-sequence work, each sequence reading its KV). Least squares over
//! the points keeps a noisy measurement from bending the curve, and the forms
//! extrapolate the way the costs grow.

use serde::{Deserialize, Serialize};

/// What a profile was measured on and for; a plan refuses a profile for another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// The machine, as `tandem plan` describes it (CPU model, or GPU).
    pub hardware: String,
    /// The model's name, as its workers serve it.
    pub model: String,
    /// KV bytes one token takes (all layers, keys and values).
    pub kv_bytes_per_token: u64,
    /// Moving a prompt's KV from a prefill to a decode worker.
    pub handoff: HandoffCost,
    /// Measured worker sizes (by cores), at least one.
    pub workers: Vec<WorkerProfile>,
}

/// A hand-off's time: `fixed_seconds + bytes · seconds_per_byte`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HandoffCost {
    pub fixed_seconds: f64,
    pub seconds_per_byte: f64,
}

/// One worker size's measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerProfile {
    /// Cores (threads) the worker ran with.
    pub cores: usize,
    /// Most tokens one step computes (the worker's `--max-num-batched-tokens`).
    pub max_batched_tokens: usize,
    /// Most sequences it runs at once (`--max-num-seqs`).
    pub max_sequences: usize,
    /// A whole prompt computed alone.
    pub prefill: Vec<PrefillPoint>,
    /// Decode steps of a batch.
    pub decode: Vec<DecodePoint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrefillPoint {
    pub tokens: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DecodePoint {
    pub batch: usize,
    /// Mean context (tokens held) of the batch's sequences.
    pub context: usize,
    pub seconds: f64,
}

/// Why a profile cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProfileError {
    #[error("the profile is for model `{profile}`, not `{wanted}`; profile this model")]
    OtherModel { profile: String, wanted: String },
    #[error(
        "the profile was measured on `{profile}`, not on this machine (`{here}`); profile this machine"
    )]
    OtherHardware { profile: String, here: String },
    #[error("the profile has no measurement for workers of {cores} cores")]
    NoWorkerSize { cores: usize },
    #[error("worker size {cores}: {problem}")]
    Unusable { cores: usize, problem: String },
    #[error("the profile does not parse: {0}")]
    Parse(String),
}

/// A fitted cost: `a + b·u + c·v` for the model's terms `u`, `v`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Fit([f64; 3]);

/// One worker size's costs, fitted.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerCost {
    pub cores: usize,
    pub max_batched_tokens: usize,
    pub max_sequences: usize,
    prefill: Fit,
    decode: Fit,
}

impl Profile {
    pub fn from_toml(text: &str) -> Result<Self, ProfileError> {
        let profile: Self = toml::from_str(text).map_err(|e| ProfileError::Parse(e.to_string()))?;
        for worker in &profile.workers {
            worker.cost()?;
        }
        Ok(profile)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a profile serializes")
    }

    /// Refuses a profile measured for another model or machine.
    pub fn check_matches(&self, model: &str, hardware: &str) -> Result<(), ProfileError> {
        if self.model != model {
            return Err(ProfileError::OtherModel {
                profile: self.model.clone(),
                wanted: model.to_owned(),
            });
        }
        if self.hardware != hardware {
            return Err(ProfileError::OtherHardware {
                profile: self.hardware.clone(),
                here: hardware.to_owned(),
            });
        }
        Ok(())
    }

    /// The fitted costs of workers of `cores` cores.
    pub fn worker(&self, cores: usize) -> Result<WorkerCost, ProfileError> {
        self.workers
            .iter()
            .find(|w| w.cores == cores)
            .ok_or(ProfileError::NoWorkerSize { cores })?
            .cost()
    }

    /// Seconds to move the KV of `tokens` tokens to a decode worker.
    pub fn handoff_seconds(&self, tokens: usize) -> f64 {
        let bytes = tokens as f64 * self.kv_bytes_per_token as f64;
        self.handoff.fixed_seconds + bytes * self.handoff.seconds_per_byte
    }
}

impl WorkerProfile {
    /// Fits the measurements; refuses too few or impossible ones.
    pub fn cost(&self) -> Result<WorkerCost, ProfileError> {
        let unusable = |problem: String| ProfileError::Unusable {
            cores: self.cores,
            problem,
        };
        if self.cores == 0 || self.max_batched_tokens == 0 || self.max_sequences == 0 {
            return Err(unusable(
                "cores, max_batched_tokens and max_sequences must be positive".into(),
            ));
        }
        let bad_time = |s: f64| !(s.is_finite() && s > 0.0);
        if self.prefill.iter().any(|p| bad_time(p.seconds))
            || self.decode.iter().any(|p| bad_time(p.seconds))
        {
            return Err(unusable("every measured time must be positive".into()));
        }
        let prefill_rows: Vec<_> = self
            .prefill
            .iter()
            .map(|p| {
                let t = p.tokens as f64;
                ([1.0, t, t * t], p.seconds)
            })
            .collect();
        let decode_rows: Vec<_> = self
            .decode
            .iter()
            .map(|p| {
                let (n, x) = (p.batch as f64, p.context as f64);
                ([1.0, n, n * x], p.seconds)
            })
            .collect();
        let prefill = fit(&prefill_rows)
            .ok_or_else(|| unusable("prefill needs 3 or more prompt lengths".into()))?;
        let decode = fit(&decode_rows).ok_or_else(|| {
            unusable("decode needs 3 or more points spanning batch sizes and contexts".into())
        })?;
        Ok(WorkerCost {
            cores: self.cores,
            max_batched_tokens: self.max_batched_tokens,
            max_sequences: self.max_sequences,
            prefill,
            decode,
        })
    }
}

impl WorkerCost {
    /// Seconds to compute prompt positions `from..to` of one prompt.
    pub fn prefill_seconds(&self, from: usize, to: usize) -> f64 {
        (self.prefill_whole(to) - self.prefill_whole(from)).max(0.0)
    }

    /// Seconds to compute a whole prompt of `tokens` tokens (0 for none).
    fn prefill_whole(&self, tokens: usize) -> f64 {
        if tokens == 0 {
            return 0.0;
        }
        let t = tokens as f64;
        let [a, b, c] = self.prefill.0;
        (a + b * t + c * t * t).max(f64::EPSILON)
    }

    /// Seconds of one step that computes the prompt `chunks` (positions `from..to` of
    /// each) and decodes `batch` sequences of mean `context`: the work of each part,
    /// but a step's fixed cost (the weights read, the pass's overhead) once — the
    /// larger of prefill's and decode's, as one pass does both.
    pub fn step_seconds(&self, chunks: &[(usize, usize)], batch: usize, context: f64) -> f64 {
        let [prefill_fixed, ..] = self.prefill.0;
        let [decode_fixed, ..] = self.decode.0;
        let prefill: f64 = chunks
            .iter()
            .map(|&(from, to)| self.prefill_work(from, to))
            .sum();
        let decode = self.decode_step_seconds(batch, context);
        let fixed = match (chunks.is_empty(), batch) {
            (true, 0) => return 0.0,
            (true, _) => return decode,
            (false, 0) => prefill_fixed,
            (false, _) => prefill_fixed.max(decode_fixed),
        };
        (fixed + prefill + decode - decode_fixed.min(decode)).max(f64::EPSILON)
    }

    /// A chunk's cost beyond the step's fixed one.
    fn prefill_work(&self, from: usize, to: usize) -> f64 {
        let [_, b, c] = self.prefill.0;
        let at = |t: usize| b * t as f64 + c * (t * t) as f64;
        (at(to) - at(from)).max(0.0)
    }

    /// Seconds of one decode step of `batch` sequences holding `context` tokens on
    /// average.
    pub fn decode_step_seconds(&self, batch: usize, context: f64) -> f64 {
        if batch == 0 {
            return 0.0;
        }
        let n = batch as f64;
        let [a, b, c] = self.decode.0;
        (a + b * n + c * n * context).max(f64::EPSILON)
    }
}

/// Least squares for `y ≈ w·row` with three terms; `None` when the rows do not pin
/// all three down.
fn fit(rows: &[([f64; 3], f64)]) -> Option<Fit> {
    let mut normal = [[0.0; 4]; 3];
    for (x, y) in rows {
        for i in 0..3 {
            for j in 0..3 {
                normal[i][j] += x[i] * x[j];
            }
            normal[i][3] += x[i] * y;
        }
    }
    solve3(normal).map(Fit)
}

/// Gaussian elimination with partial pivoting on an augmented 3×4 system.
fn solve3(mut m: [[f64; 4]; 3]) -> Option<[f64; 3]> {
    let scale = m.iter().flatten().fold(0.0_f64, |s, v| s.max(v.abs()));
    for col in 0..3 {
        let pivot = (col..3).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))?;
        if m[pivot][col].abs() <= scale * 1e-12 {
            return None;
        }
        m.swap(col, pivot);
        let pivot_row = m[col];
        for (row, values) in m.iter_mut().enumerate() {
            if row != col {
                let factor = values[col] / pivot_row[col];
                for (value, pivot_value) in values.iter_mut().zip(pivot_row).skip(col) {
                    *value -= factor * pivot_value;
                }
            }
        }
    }
    Some([m[0][3] / m[0][0], m[1][3] / m[1][1], m[2][3] / m[2][2]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker whose costs follow the model's forms exactly.
    pub(crate) fn exact_worker(cores: usize) -> WorkerProfile {
        let prefill = [16, 128, 512, 1024]
            .map(|t| PrefillPoint {
                tokens: t,
                seconds: 0.002 + 1e-4 * t as f64 + 2e-8 * (t * t) as f64,
            })
            .to_vec();
        let decode = [(1, 100), (8, 100), (8, 1000), (32, 500)]
            .map(|(n, x)| DecodePoint {
                batch: n,
                context: x,
                seconds: 0.01 + 5e-4 * n as f64 + 1e-6 * (n * x) as f64,
            })
            .to_vec();
        WorkerProfile {
            cores,
            max_batched_tokens: 2048,
            max_sequences: 64,
            prefill,
            decode,
        }
    }

    #[test]
    fn costs_are_fitted_from_the_points() {
        let cost = exact_worker(1).cost().unwrap();
        let whole = 0.002 + 1e-4 * 300.0 + 2e-8 * 90000.0;
        assert!((cost.prefill_seconds(0, 300) - whole).abs() < 1e-9);
        // A chunk costs the difference: later positions attend to more.
        let (first, second) = (
            cost.prefill_seconds(0, 512),
            cost.prefill_seconds(512, 1024),
        );
        assert!(second > first - 0.002);
        let step = 0.01 + 5e-4 * 16.0 + 1e-6 * 16.0 * 250.0;
        assert!((cost.decode_step_seconds(16, 250.0) - step).abs() < 1e-9);
        assert_eq!(cost.decode_step_seconds(0, 0.0), 0.0);
        // One pass computing a prompt chunk and decoding pays the fixed cost once (the
        // larger one, decode's 10 ms here), not prefill's 2 ms besides.
        let mixed = cost.step_seconds(&[(0, 300)], 16, 250.0);
        assert!((mixed - (whole - 0.002 + step)).abs() < 1e-9, "{mixed}");
        assert_eq!(cost.step_seconds(&[], 0, 0.0), 0.0);
    }

    #[test]
    fn too_few_or_impossible_points_are_refused_with_the_reason() {
        let mut worker = exact_worker(2);
        worker.prefill.truncate(2);
        let error = worker.cost().unwrap_err().to_string();
        assert!(error.contains("3 or more prompt lengths"), "{error}");
        let mut worker = exact_worker(2);
        // Every point at one batch size cannot tell per-sequence from fixed cost.
        worker.decode.iter_mut().for_each(|p| p.batch = 4);
        assert!(worker.cost().unwrap_err().to_string().contains("decode"));
        let mut worker = exact_worker(2);
        worker.decode[0].seconds = -1.0;
        assert!(worker.cost().unwrap_err().to_string().contains("positive"));
    }

    #[test]
    fn a_profile_for_another_model_or_machine_is_refused() {
        let profile = Profile {
            hardware: "AMD EPYC 9B14 (2 cores)".into(),
            model: "SmolLM2-135M-Instruct.Q4_1".into(),
            kv_bytes_per_token: 23040,
            handoff: HandoffCost {
                fixed_seconds: 0.002,
                seconds_per_byte: 1e-9,
            },
            workers: vec![exact_worker(1)],
        };
        let back = Profile::from_toml(&profile.to_toml()).unwrap();
        assert_eq!(back, profile);
        assert!(
            back.check_matches("SmolLM2-135M-Instruct.Q4_1", "AMD EPYC 9B14 (2 cores)")
                .is_ok()
        );
        let other_model = back.check_matches("Llama-3.1-8B", "AMD EPYC 9B14 (2 cores)");
        assert!(matches!(other_model, Err(ProfileError::OtherModel { .. })));
        let other_machine = back.check_matches("SmolLM2-135M-Instruct.Q4_1", "Intel Xeon");
        assert!(matches!(
            other_machine,
            Err(ProfileError::OtherHardware { .. })
        ));
        assert_eq!(
            back.worker(4).unwrap_err(),
            ProfileError::NoWorkerSize { cores: 4 }
        );
        assert!((back.handoff_seconds(1000) - (0.002 + 23040.0 * 1000.0 * 1e-9)).abs() < 1e-12);
    }
}
