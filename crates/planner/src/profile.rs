//! A hardware profile: what one worker of a given size (cores) costs on this machine
//! for this model, from measured points, and what moving a prompt's KV costs.
//!
//! Measured points are fitted, not looked up. A step that computes prompt tokens costs
//! `a + b·T + c·Σt²`: `T` the prompt tokens in the step (every row goes through the
//! same matrix products), `Σt²` over each prompt's own tokens (attention within a
//! prompt; a chunk of positions `s..e` counts `e² − s²`). It is fitted, by least
//! squares on relative error, to prompts timed alone (`T = t`) and, where the profile
//! has them, to steps of several prompts computed together, with or without decode
//! rows beside them ([`StepPoint`]; the decode rows' own cost is taken off first). A
//! decode step costs `a + b·n + c·n·x` in the batch `n` and its mean context `x`
//! (weights read once a step, per-sequence work, each sequence reading its KV). Least
//! squares keeps a noisy measurement from bending the curve, and the forms extrapolate
//! the way the costs grow.
//!
//! Profiles measured before step points existed have none: their prompt cost is fitted
//! to the single prompts alone, the same form, so they load and plan as before.
//!
//! A worker size may be measured twice: alone on the machine, and alongside busy
//! workers on the other cores (`measured_alongside`). Co-located workers slow each
//! other, so [`WorkerCosts`] keeps both fits and the model charges each step by
//! whether the worker's neighbours are busy then; with one measurement, it serves both.

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
    /// How fast each core the workers ran on computed and read when they were measured
    /// (`tandem plan profile --launch` times them; empty where the cores were not known).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub core_speeds: Vec<CoreSpeed>,
}

/// One core's rates at two fixed single-threaded loops, with the machine otherwise idle
/// and with every measured core running them at once: f32 multiply-adds in registers
/// (`alone`, `together`, GFLOP/s) and a read of a buffer larger than any core's own
/// caches (`read_alone`, `read_together`, GB/s: the shared cache and memory, which
/// other tenants of a VM's host contend for). A VM's cores need not run at one speed
/// (the host places its vCPUs where the guest cannot see), and a worker on a slow core
/// is slower than a profile measured on another says.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CoreSpeed {
    pub core: usize,
    pub alone: f64,
    pub together: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_alone: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_together: Option<f64>,
}

/// Which of a [`CoreSpeed`]'s two rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoreRate {
    Compute,
    Read,
}

impl CoreSpeed {
    /// `rate` alone and together, where measured.
    pub fn rates(&self, rate: CoreRate) -> Option<(f64, f64)> {
        match rate {
            CoreRate::Compute => Some((self.alone, self.together)),
            CoreRate::Read => Some((self.read_alone?, self.read_together?)),
        }
    }
}

/// The slowest of `speeds` by its lower `rate`, alone or together: `(core, rate)`.
pub fn slowest_core(speeds: &[CoreSpeed], rate: CoreRate) -> Option<(usize, f64)> {
    speeds
        .iter()
        .filter_map(|s| {
            s.rates(rate)
                .map(|(alone, together)| (s.core, alone.min(together)))
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
}

/// The highest `rate` alone among `speeds` (0 for none).
pub fn fastest_alone(speeds: &[CoreSpeed], rate: CoreRate) -> f64 {
    speeds
        .iter()
        .filter_map(|s| s.rates(rate).map(|(alone, _)| alone))
        .fold(0.0, f64::max)
}

/// The slowest of `speeds` by `rate` (see [`slowest_core`]) as a share of the fastest
/// of `reference` alone: `(core, share)`; `None` where either has no such rate.
pub fn slowest_share(
    speeds: &[CoreSpeed],
    reference: &[CoreSpeed],
    rate: CoreRate,
) -> Option<(usize, f64)> {
    let fastest = fastest_alone(reference, rate);
    let (core, slowest) = slowest_core(speeds, rate)?;
    (fastest > 0.0).then_some((core, slowest / fastest))
}

/// "core 0 61.2 GFLOP/s, 38.0 GB/s alone, 60.8, 35.1 together; core 1 …" ("not timed"
/// for none).
pub fn describe_core_speeds(speeds: &[CoreSpeed]) -> String {
    if speeds.is_empty() {
        return "not timed".into();
    }
    let cores: Vec<String> = speeds
        .iter()
        .map(|s| match s.rates(CoreRate::Read) {
            Some((read_alone, read_together)) => format!(
                "core {} {:.1} GFLOP/s, {:.1} GB/s alone, {:.1}, {:.1} together",
                s.core, s.alone, read_alone, s.together, read_together
            ),
            None => format!(
                "core {} {:.1} GFLOP/s alone, {:.1} together",
                s.core, s.alone, s.together
            ),
        })
        .collect();
    cores.join("; ")
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
    /// Steps of several prompts computed together (absent from older profiles).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepPoint>,
    /// Workers on the machine's other cores that were given the same measurements at
    /// the same time (0: measured alone). Co-located workers slow each other (shared
    /// caches, memory, SMT siblings), so a profile meant for layouts that fill the
    /// machine is measured with them busy.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub measured_alongside: usize,
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

/// One step that computed `prompts` whole prompts of about equal length, `tokens`
/// prompt tokens in all, beside `decode_batch` decoding sequences of mean context
/// `decode_context` (none in a prompts-only step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepPoint {
    pub prompts: usize,
    pub tokens: usize,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub decode_batch: usize,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub decode_context: usize,
    pub seconds: f64,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl StepPoint {
    /// The step's prompt chunks: `prompts` whole prompts sharing `tokens` evenly.
    pub fn chunks(&self) -> Vec<(usize, usize)> {
        let prompts = self.prompts.max(1);
        (0..prompts)
            .map(|i| {
                (
                    0,
                    self.tokens / prompts + usize::from(i < self.tokens % prompts),
                )
            })
            .collect()
    }
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
    #[error(
        "the profile has two measurements of {cores}-core workers {how}; keep one (`tandem plan \
         profile` replaces the one it measures again)"
    )]
    Duplicate { cores: usize, how: &'static str },
    #[error("worker size {cores}: {problem}")]
    Unusable { cores: usize, problem: String },
    #[error("the profile does not parse: {0}")]
    Parse(String),
}

/// A fitted cost: `a + b·u + c·v` for the model's terms `u`, `v`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Fit([f64; 3]);

/// One worker size's fitted costs with its neighbours idle and busy (the same fit
/// where the profile measured the size only one way).
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerCosts {
    pub alone: WorkerCost,
    pub crowded: WorkerCost,
}

/// One measurement's costs, fitted.
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
        for (i, worker) in profile.workers.iter().enumerate() {
            worker.cost()?;
            let twin = profile.workers[..i]
                .iter()
                .any(|w| w.cores == worker.cores && w.alongside() == worker.alongside());
            if twin {
                return Err(ProfileError::Duplicate {
                    cores: worker.cores,
                    how: if worker.alongside() {
                        "alongside busy neighbours"
                    } else {
                        "alone"
                    },
                });
            }
        }
        for cores in profile.worker_sizes() {
            profile.worker(cores)?;
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

    /// The fitted costs of workers of `cores` cores, alone and beside busy neighbours.
    pub fn worker(&self, cores: usize) -> Result<WorkerCosts, ProfileError> {
        let measured = |alongside: bool| {
            self.workers
                .iter()
                .find(|w| w.cores == cores && w.alongside() == alongside)
        };
        let (alone, crowded) = match (measured(false), measured(true)) {
            (None, None) => return Err(ProfileError::NoWorkerSize { cores }),
            (Some(only), None) | (None, Some(only)) => (only, only),
            (Some(alone), Some(crowded)) => (alone, crowded),
        };
        if (alone.max_batched_tokens, alone.max_sequences)
            != (crowded.max_batched_tokens, crowded.max_sequences)
        {
            return Err(ProfileError::Unusable {
                cores,
                problem: format!(
                    "measured alone with a step budget of {} tokens and {} sequences, \
                     alongside with {} and {}: the two measurements are of different workers",
                    alone.max_batched_tokens,
                    alone.max_sequences,
                    crowded.max_batched_tokens,
                    crowded.max_sequences
                ),
            });
        }
        Ok(WorkerCosts {
            alone: alone.cost()?,
            crowded: crowded.cost()?,
        })
    }

    /// The measured worker sizes (cores), each once, smallest first.
    pub fn worker_sizes(&self) -> Vec<usize> {
        let mut sizes: Vec<usize> = self.workers.iter().map(|w| w.cores).collect();
        sizes.sort_unstable();
        sizes.dedup();
        sizes
    }

    /// Adds a measurement, replacing the one of the same size measured the same way
    /// (alone, or alongside busy neighbours).
    pub fn put_worker(&mut self, worker: WorkerProfile) {
        self.workers
            .retain(|w| !(w.cores == worker.cores && w.alongside() == worker.alongside()));
        self.workers.push(worker);
        self.workers
            .sort_by_key(|w| (w.cores, w.measured_alongside));
    }

    /// Seconds to move the KV of `tokens` tokens to a decode worker.
    pub fn handoff_seconds(&self, tokens: usize) -> f64 {
        let bytes = tokens as f64 * self.kv_bytes_per_token as f64;
        self.handoff.fixed_seconds + bytes * self.handoff.seconds_per_byte
    }
}

impl WorkerProfile {
    /// Whether it was measured with busy workers on the machine's other cores.
    pub fn alongside(&self) -> bool {
        self.measured_alongside > 0
    }

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
        if let Some(step) = self
            .steps
            .iter()
            .find(|p| p.prompts == 0 || p.tokens < p.prompts)
        {
            return Err(unusable(format!(
                "a step of {} prompts and {} tokens is not a step of whole prompts",
                step.prompts, step.tokens
            )));
        }
        if let Some(step) = self.steps.iter().find(|p| bad_time(p.seconds)) {
            return Err(unusable(format!(
                "every measured time must be positive (a step of {} prompts took {} s)",
                step.prompts, step.seconds
            )));
        }
        if let Some(step) = self
            .steps
            .iter()
            .find(|p| p.tokens + p.decode_batch > self.max_batched_tokens)
        {
            return Err(unusable(format!(
                "a measured step of {} prompt tokens and {} decode rows exceeds the worker's \
                 {} tokens per step: it was more than one step",
                step.tokens, step.decode_batch, self.max_batched_tokens
            )));
        }
        let decode_rows: Vec<_> = self
            .decode
            .iter()
            .map(|p| {
                let (n, x) = (p.batch as f64, p.context as f64);
                ([1.0, n, n * x], p.seconds)
            })
            .collect();
        let decode = fit(&decode_rows).ok_or_else(|| {
            unusable("decode needs 3 or more points spanning batch sizes and contexts".into())
        })?;
        if self.prefill.len() < 3 {
            return Err(unusable("prefill needs 3 or more prompt lengths".into()));
        }
        let mut prefill_rows: Vec<_> = self
            .prefill
            .iter()
            .map(|p| (prompt_terms(&[(0, p.tokens)]), p.seconds))
            .collect();
        for step in &self.steps {
            // The decode rows' work, beyond the step's fixed cost, is the decode fit's.
            let decodes = decode_work(decode, step.decode_batch, step.decode_context as f64);
            let prompts = step.seconds - decodes;
            if prompts <= 0.0 {
                return Err(unusable(format!(
                    "a step of {} prompts beside {} decode rows took {} s, less than its \
                     decode rows alone ({decodes} s)",
                    step.prompts, step.decode_batch, step.seconds
                )));
            }
            prefill_rows.push((prompt_terms(&step.chunks()), prompts));
        }
        // Relative error: a 30 ms prompt counts as much as a 3 s one.
        let weighted: Vec<_> = prefill_rows
            .iter()
            .map(|(x, y)| (x.map(|v| v / y), 1.0))
            .collect();
        let prefill = fit(&weighted)
            .ok_or_else(|| unusable("prefill needs 3 or more prompt lengths".into()))?;
        Ok(WorkerCost {
            cores: self.cores,
            max_batched_tokens: self.max_batched_tokens,
            max_sequences: self.max_sequences,
            prefill,
            decode,
        })
    }
}

/// A step's prompt terms `[1, T, Σ(e² − s²)]` for its chunks `s..e`.
fn prompt_terms(chunks: &[(usize, usize)]) -> [f64; 3] {
    let tokens: usize = chunks.iter().map(|&(from, to)| to - from).sum();
    let attention: f64 = chunks
        .iter()
        .map(|&(from, to)| (to * to - from * from) as f64)
        .sum();
    [1.0, tokens as f64, attention]
}

/// Decode rows' cost beyond a step's fixed cost.
fn decode_work(decode: Fit, batch: usize, context: f64) -> f64 {
    let [_, b, c] = decode.0;
    let n = batch as f64;
    (b * n + c * n * context).max(0.0)
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
    /// each) and decodes `batch` sequences of mean `context`. A step with prompt tokens
    /// costs the fitted prompt-step cost (`a + b·T + c·Σ(e² − s²)`, its fixed cost
    /// once, however many prompts) plus the decode rows' work beyond a decode step's
    /// fixed cost — the form the profile's steps beside decode rows were fitted to —
    /// and never less than its decode rows alone; a step of decode rows only costs the
    /// decode step.
    pub fn step_seconds(&self, chunks: &[(usize, usize)], batch: usize, context: f64) -> f64 {
        let decode = self.decode_step_seconds(batch, context);
        if chunks.is_empty() {
            return decode;
        }
        let [prefill_fixed, ..] = self.prefill.0;
        let prompts: f64 = prefill_fixed
            + chunks
                .iter()
                .map(|&(from, to)| self.prefill_work(from, to))
                .sum::<f64>();
        let rows = decode_work(self.decode, batch, context);
        (prompts.max(decode - rows) + rows).max(f64::EPSILON)
    }

    /// A chunk's cost beyond the step's fixed one.
    fn prefill_work(&self, from: usize, to: usize) -> f64 {
        let [_, b, c] = self.prefill.0;
        let at = |t: usize| b * t as f64 + c * (t * t) as f64;
        (at(to) - at(from)).max(0.0)
    }

    /// What the fitted costs make of a measured step (to set beside its seconds).
    pub fn step_point_seconds(&self, step: &StepPoint) -> f64 {
        self.step_seconds(
            &step.chunks(),
            step.decode_batch,
            step.decode_context as f64,
        )
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
/// all three down. Each term is scaled to at most 1 first, so that terms of very
/// different sizes (1, tokens, tokens²) do not hide one another from the pivot test.
fn fit(rows: &[([f64; 3], f64)]) -> Option<Fit> {
    let mut scale = [0.0_f64; 3];
    for (x, _) in rows {
        for i in 0..3 {
            scale[i] = scale[i].max(x[i].abs());
        }
    }
    if scale.contains(&0.0) {
        return None;
    }
    let mut normal = [[0.0; 4]; 3];
    for (x, y) in rows {
        let x = [x[0] / scale[0], x[1] / scale[1], x[2] / scale[2]];
        for i in 0..3 {
            for j in 0..3 {
                normal[i][j] += x[i] * x[j];
            }
            normal[i][3] += x[i] * y;
        }
    }
    let w = solve3(normal)?;
    Some(Fit([w[0] / scale[0], w[1] / scale[1], w[2] / scale[2]]))
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
            steps: Vec::new(),
            measured_alongside: 0,
        }
    }

    /// The exact worker with steps of several prompts that cost less per prompt than
    /// alone (a smaller per-token term than its single prompts have), some beside
    /// decode rows, which cost what its decode points say beyond their fixed cost.
    fn stepped_worker() -> WorkerProfile {
        let mut worker = exact_worker(1);
        let step = |tokens: usize, attention: usize| {
            0.002 + 0.8e-4 * tokens as f64 + 2e-8 * attention as f64
        };
        for point in &mut worker.prefill {
            point.seconds = step(point.tokens, point.tokens * point.tokens);
        }
        let decodes = |n: usize, x: usize| 5e-4 * n as f64 + 1e-6 * (n * x) as f64;
        worker.steps = [
            (2, 256, 0, 0),
            (4, 256, 0, 0),
            (8, 128, 0, 0),
            (2, 512, 16, 300),
        ]
        .map(|(prompts, each, batch, context)| StepPoint {
            prompts,
            tokens: prompts * each,
            decode_batch: batch,
            decode_context: context,
            seconds: step(prompts * each, prompts * each * each) + decodes(batch, context),
        })
        .to_vec();
        worker
    }

    #[test]
    fn steps_of_several_prompts_are_fitted_with_the_single_prompts() {
        let worker = stepped_worker();
        let cost = worker.cost().unwrap();
        for point in &worker.steps {
            let fitted = cost.step_point_seconds(point);
            assert!((fitted - point.seconds).abs() < 1e-9, "{point:?}: {fitted}");
        }
        // Two prompts in one step cost one step's fixed cost less than two steps.
        let alone = cost.step_seconds(&[(0, 256)], 0, 0.0);
        let together = cost.step_seconds(&[(0, 256), (0, 256)], 0, 0.0);
        assert!((2.0 * alone - together - 0.002).abs() < 1e-9);
        // A chunk later in a prompt attends to more positions.
        assert!(cost.prefill_seconds(256, 512) > cost.prefill_seconds(0, 256));
    }

    /// The steps measured on the 2-core Xeon (`docs/planner/xeon-2core-profile.toml`):
    /// the fitted step cost reproduces each, with or without decode rows beside it.
    #[test]
    fn the_recorded_steps_are_reproduced() {
        let profile = Profile::from_toml(include_str!(
            "../../../docs/planner/xeon-2core-profile.toml"
        ))
        .unwrap();
        for worker in &profile.workers {
            assert!(worker.steps.len() >= 6, "cores {}", worker.cores);
            assert!(worker.steps.iter().any(|s| s.decode_batch > 0));
            let cost = worker.cost().unwrap();
            for point in &worker.steps {
                let ratio = cost.step_point_seconds(point) / point.seconds;
                assert!((0.93..1.07).contains(&ratio), "{point:?}: {ratio}");
            }
        }
    }

    #[test]
    fn a_profile_without_steps_is_fitted_from_its_single_prompts() {
        // Profiles measured before step points existed have no `steps`: they load, and
        // the same step cost is fitted to their single prompts alone.
        let worker = exact_worker(1);
        let text = toml::to_string(&worker).unwrap();
        assert!(!text.contains("steps"), "{text}");
        let back: WorkerProfile = toml::from_str(&text).unwrap();
        assert!(back.steps.is_empty());
        let cost = back.cost().unwrap();
        let four = [(0, 256); 4];
        let expected = 0.002 + 1e-4 * 1024.0 + 2e-8 * 4.0 * 65536.0;
        assert!((cost.step_seconds(&four, 0, 0.0) - expected).abs() < 1e-9);
        // Steps survive the round trip, decode-free ones without decode fields.
        let stepped = stepped_worker();
        let text = toml::to_string(&stepped).unwrap();
        assert_eq!(text.matches("decode_batch").count(), 1, "{text}");
        assert_eq!(toml::from_str::<WorkerProfile>(&text).unwrap(), stepped);
    }

    #[test]
    fn impossible_steps_are_refused_with_the_reason() {
        let refused = |change: fn(&mut StepPoint)| {
            let mut worker = stepped_worker();
            change(&mut worker.steps[3]);
            worker.cost().unwrap_err().to_string()
        };
        let over = refused(|s| s.tokens = 2040);
        assert!(over.contains("more than one step"), "{over}");
        let faster = refused(|s| s.seconds = 0.001);
        assert!(
            faster.contains("less than its decode rows alone"),
            "{faster}"
        );
        let empty = refused(|s| s.prompts = 0);
        assert!(empty.contains("not a step of whole prompts"), "{empty}");
        let negative = refused(|s| s.seconds = -1.0);
        assert!(negative.contains("positive"), "{negative}");
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
        // One pass computing a prompt chunk and decoding pays one fixed cost: the
        // prompt's, with the decode rows' work beside it (not decode's 10 ms besides).
        let mixed = cost.step_seconds(&[(0, 300)], 16, 250.0);
        assert!((mixed - (whole + step - 0.01)).abs() < 1e-9, "{mixed}");
        // A one-position chunk beside a decode batch costs no less than the batch (here
        // just the batch: the prompt part is under its fixed cost).
        let tiny = cost.step_seconds(&[(299, 300)], 16, 250.0);
        assert!((tiny - step).abs() < 1e-12, "{tiny} vs {step}");
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
    fn a_size_measured_alone_and_alongside_keeps_both_fits() {
        let mut profile = Profile {
            hardware: "test".into(),
            model: "test".into(),
            kv_bytes_per_token: 1000,
            handoff: HandoffCost {
                fixed_seconds: 0.001,
                seconds_per_byte: 1e-9,
            },
            workers: vec![exact_worker(2)],
            core_speeds: Vec::new(),
        };
        let alone = exact_worker(1);
        let mut crowded = exact_worker(1);
        crowded.measured_alongside = 1;
        crowded.decode.iter_mut().for_each(|p| p.seconds *= 1.5);
        profile.put_worker(crowded.clone());
        profile.put_worker(alone.clone());
        assert_eq!(profile.worker_sizes(), [1, 2]);
        let costs = profile.worker(1).unwrap();
        let ratio =
            costs.crowded.decode_step_seconds(8, 100.0) / costs.alone.decode_step_seconds(8, 100.0);
        assert!((ratio - 1.5).abs() < 1e-9, "{ratio}");
        // One measurement serves both; measuring again replaces only its own kind.
        let only = profile.worker(2).unwrap();
        assert_eq!(only.alone, only.crowded);
        let mut again = alone.clone();
        again.decode[0].seconds *= 1.01;
        profile.put_worker(again.clone());
        assert_eq!(profile.workers.len(), 3);
        assert!(profile.workers.contains(&again) && profile.workers.contains(&crowded));
        // Round trip, and a file with the same kind twice is refused by name.
        let text = profile.to_toml();
        assert_eq!(Profile::from_toml(&text).unwrap(), profile);
        let mut twice = profile.clone();
        twice.workers.push(crowded.clone());
        let error = Profile::from_toml(&twice.to_toml()).unwrap_err();
        assert_eq!(
            error,
            ProfileError::Duplicate {
                cores: 1,
                how: "alongside busy neighbours"
            }
        );
        // The two must describe the same worker: its step budget and sequence limit.
        let mut other_budget = profile.clone();
        let at = other_budget
            .workers
            .iter()
            .position(|w| w.cores == 1 && w.alongside())
            .unwrap();
        other_budget.workers[at].max_batched_tokens = 512;
        let error = other_budget.worker(1).unwrap_err().to_string();
        assert!(error.contains("step budget"), "{error}");
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
            core_speeds: vec![
                CoreSpeed {
                    core: 0,
                    alone: 60.0,
                    together: 58.0,
                    read_alone: Some(30.0),
                    read_together: Some(20.0),
                },
                CoreSpeed {
                    core: 1,
                    alone: 45.0,
                    together: 40.0,
                    read_alone: Some(28.0),
                    read_together: Some(25.0),
                },
            ],
        };
        let back = Profile::from_toml(&profile.to_toml()).unwrap();
        assert_eq!(back, profile);
        assert_eq!(
            slowest_core(&back.core_speeds, CoreRate::Compute),
            Some((1, 40.0))
        );
        assert_eq!(
            slowest_core(&back.core_speeds, CoreRate::Read),
            Some((0, 20.0))
        );
        assert_eq!(fastest_alone(&back.core_speeds, CoreRate::Compute), 60.0);
        assert_eq!(fastest_alone(&back.core_speeds, CoreRate::Read), 30.0);
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
