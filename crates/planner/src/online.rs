//! The online planner's decisions, with no runtime types: given what the router saw
//! over a window (each answered request's time to first token and time per output
//! token, and how long the requests still unanswered have waited) and how many workers
//! each P/D pool has, whether to move one worker from one pool to the other, and why.
//!
//! The rule is the SLO's: TTFT over its limit is the prefill pool's problem (prompts
//! queue there), TPOT over its limit the decode pool's. A request still waiting for its
//! first token after longer than the TTFT limit is a miss already, whenever its token
//! comes: it counts as a TTFT sample at once, so a prefill backlog is seen while it
//! builds rather than once its prompts are answered. A worker moves to the pool
//! that misses only when the pool that gives it has room to lose it — its own figure
//! scaled by the load each of its remaining workers would take, `n / (n - 1)`, stays
//! under `headroom` of its limit — and only after the same verdict `confirm` times in
//! a row (hysteresis), never within `cooldown_secs` of the last move (the new layout
//! gets time to show). When both miss, or the missing pool cannot be given a worker,
//! the SLO cannot be met with these workers: that is a decision too, reported rather
//! than acted on, so the planner never thrashes.
//!
//! With a slot budget (`max_workers`, both pools together) the planner also starts a
//! worker where no move can help and a slot is free, and stops one when the load
//! leaves a pool idle: both figures under `stop_below` of their limits, and the pool
//! that loses a worker still under it with `n − 1` workers. Starting and stopping are
//! confirmed and cooled down as moves are; a move is preferred, since it costs no slot.
//!
//! A pool's latency grows gently with its load until its workers' KV caches fill; then
//! requests are preempted or wait, a cliff that its latency figure does not foresee. So
//! a pool also gives up a worker (moved or stopped) only while its workers' mean KV
//! usage, scaled by `n / (n - 1)` as its figure is, stays under `kv_headroom`. Unknown
//! KV usage (no worker reported it) does not hold anything back.

use std::fmt;

/// A P/D pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pool {
    Prefill,
    Decode,
}

impl Pool {
    pub fn as_str(self) -> &'static str {
        match self {
            Pool::Prefill => "prefill",
            Pool::Decode => "decode",
        }
    }

    fn other(self) -> Pool {
        match self {
            Pool::Prefill => Pool::Decode,
            Pool::Decode => Pool::Prefill,
        }
    }
}

/// How the planner judges a window.
#[derive(Debug, Clone, PartialEq)]
pub struct OnlineConfig {
    /// Time to first token limit, seconds.
    pub ttft_secs: f64,
    /// Time per output token limit, seconds.
    pub tpot_secs: f64,
    /// Which percentile of the window is held to the limits (0.9: p90).
    pub percentile: f64,
    /// Fewer samples of a figure than this in a window: that figure is unknown.
    pub min_samples: usize,
    /// Consecutive identical verdicts before a worker moves.
    pub confirm: u32,
    /// Seconds after a move during which no other move is made.
    pub cooldown_secs: f64,
    /// Share of its limit the giving pool may reach once it has one worker fewer.
    pub headroom: f64,
    /// Workers both pools may have together; `None`: none are started or stopped.
    pub max_workers: Option<usize>,
    /// With a budget: a pool loses a worker when every figure is under this share of
    /// its limit, its own with one worker fewer.
    pub stop_below: f64,
    /// Share of their KV caches a pool's workers may fill, on average, once it has one
    /// worker fewer.
    pub kv_headroom: f64,
}

impl Default for OnlineConfig {
    fn default() -> Self {
        Self {
            ttft_secs: 2.0,
            tpot_secs: 0.1,
            percentile: 0.9,
            min_samples: 8,
            confirm: 3,
            cooldown_secs: 30.0,
            headroom: 0.9,
            max_workers: None,
            stop_below: 0.5,
            kv_headroom: 0.9,
        }
    }
}

/// What the router saw: the pools' sizes now and the window's samples.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// Seconds on the caller's clock (only differences matter).
    pub now_secs: f64,
    pub prefill_workers: usize,
    pub decode_workers: usize,
    /// Times to first token, seconds (one per request).
    pub ttft: Vec<f64>,
    /// Times per output token, seconds (one per stretch of a streamed answer).
    pub tpot: Vec<f64>,
    /// How long each request not yet given its first token has waited, seconds.
    pub waiting: Vec<f64>,
    /// Each pool's workers' mean KV cache usage now (0 to 1).
    pub kv_usage: KvUsage,
}

/// The mean KV cache usage (0 to 1) of each pool's workers; `None` where no worker
/// reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KvUsage {
    pub prefill: Option<f64>,
    pub decode: Option<f64>,
}

impl KvUsage {
    pub fn of(&self, pool: Pool) -> Option<f64> {
        match pool {
            Pool::Prefill => self.prefill,
            Pool::Decode => self.decode,
        }
    }
}

impl Observation {
    fn workers(&self, pool: Pool) -> usize {
        match pool {
            Pool::Prefill => self.prefill_workers,
            Pool::Decode => self.decode_workers,
        }
    }

    fn total(&self) -> usize {
        self.prefill_workers + self.decode_workers
    }

    /// `pool`'s mean KV usage with one worker fewer, when known (its load spread over
    /// the rest); `None` also for a pool of fewer than two.
    fn kv_usage_without_one(&self, pool: Pool) -> Option<f64> {
        let n = self.workers(pool);
        let usage = self.kv_usage.of(pool)?;
        (n >= 2).then(|| usage * n as f64 / (n - 1) as f64)
    }
}

/// The window's figures against the limits: each is the percentile over its limit
/// (above 1: missed). `None` when the window has too few such samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pressure {
    pub ttft: Option<f64>,
    pub tpot: Option<f64>,
}

impl Pressure {
    fn of(&self, pool: Pool) -> Option<f64> {
        match pool {
            Pool::Prefill => self.ttft,
            Pool::Decode => self.tpot,
        }
    }
}

/// What the planner decided about one window.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Move one worker `from` → `to` now.
    Move { from: Pool, to: Pool, why: String },
    /// Start a worker for `pool` in a free slot of the budget.
    Start { pool: Pool, why: String },
    /// Stop one of `pool`'s workers: the load leaves it idle.
    Stop { pool: Pool, why: String },
    /// The SLO is missed and no move of these workers can fix it.
    CannotMeet { why: String },
    /// Nothing to do.
    Hold(Hold),
}

/// Why nothing moves.
#[derive(Debug, Clone, PartialEq)]
pub enum Hold {
    /// Too few samples of either figure to judge.
    FewSamples { samples: usize },
    /// Both limits are met.
    Meets,
    /// A move, start or stop is under way.
    Moving,
    /// A move was made less than the cooldown ago.
    Cooling { left_secs: f64 },
    /// The same verdict has been seen `seen` times of `confirm`.
    Confirming { intent: Intent, seen: u32 },
    /// The pool `to` misses, but the other one has no room to give a worker.
    NoRoom { to: Pool, why: String },
}

/// What a verdict, once confirmed, does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Move a worker from the other pool into this one.
    MoveTo(Pool),
    /// Start a worker for this pool.
    Start(Pool),
    /// Stop one of this pool's workers.
    Stop(Pool),
}

impl fmt::Display for Intent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Intent::MoveTo(pool) => write!(f, "{} needs a worker moved to it", pool.as_str()),
            Intent::Start(pool) => write!(f, "{} needs a worker started", pool.as_str()),
            Intent::Stop(pool) => write!(f, "{} can do with a worker fewer", pool.as_str()),
        }
    }
}

impl Decision {
    /// A short name for metrics: `move_to_prefill`, `move_to_decode`,
    /// `start_prefill`, `start_decode`, `stop_prefill`, `stop_decode`, `cannot_meet`,
    /// or the hold's kind.
    pub fn action(&self) -> &'static str {
        match self {
            Decision::Move {
                to: Pool::Prefill, ..
            } => "move_to_prefill",
            Decision::Move {
                to: Pool::Decode, ..
            } => "move_to_decode",
            Decision::Start {
                pool: Pool::Prefill,
                ..
            } => "start_prefill",
            Decision::Start {
                pool: Pool::Decode, ..
            } => "start_decode",
            Decision::Stop {
                pool: Pool::Prefill,
                ..
            } => "stop_prefill",
            Decision::Stop {
                pool: Pool::Decode, ..
            } => "stop_decode",
            Decision::CannotMeet { .. } => "cannot_meet",
            Decision::Hold(Hold::FewSamples { .. }) => "few_samples",
            Decision::Hold(Hold::Meets) => "meets",
            Decision::Hold(Hold::Moving) => "moving",
            Decision::Hold(Hold::Cooling { .. }) => "cooling",
            Decision::Hold(Hold::Confirming { .. }) => "confirming",
            Decision::Hold(Hold::NoRoom { .. }) => "no_room",
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Move { from, to, why } => {
                write!(
                    f,
                    "move a worker {} → {}: {why}",
                    from.as_str(),
                    to.as_str()
                )
            }
            Decision::Start { pool, why } => {
                write!(f, "start a {} worker: {why}", pool.as_str())
            }
            Decision::Stop { pool, why } => write!(f, "stop a {} worker: {why}", pool.as_str()),
            Decision::CannotMeet { why } => write!(f, "the SLO cannot be met: {why}"),
            Decision::Hold(Hold::FewSamples { samples }) => {
                write!(f, "too few samples to judge ({samples})")
            }
            Decision::Hold(Hold::Meets) => write!(f, "both limits met"),
            Decision::Hold(Hold::Moving) => write!(f, "a worker is moving, starting or stopping"),
            Decision::Hold(Hold::Cooling { left_secs }) => {
                write!(f, "cooling down for {left_secs:.0} s more")
            }
            Decision::Hold(Hold::Confirming { intent, seen }) => {
                write!(f, "{intent}; seen {seen} time(s)")
            }
            Decision::Hold(Hold::NoRoom { to, why }) => {
                write!(f, "{} misses, but {why}", to.as_str())
            }
        }
    }
}

/// The planner's state between windows: the pending verdict and the last move.
#[derive(Debug, Clone)]
pub struct Controller {
    config: OnlineConfig,
    pending: Option<(Intent, u32)>,
    last_move_secs: Option<f64>,
    /// A move was decided and the caller has not said it is over.
    moving: bool,
}

impl Controller {
    pub fn new(config: OnlineConfig) -> Self {
        Self {
            config,
            pending: None,
            last_move_secs: None,
            moving: false,
        }
    }

    pub fn config(&self) -> &OnlineConfig {
        &self.config
    }

    /// The window's percentiles over the limits.
    pub fn pressure(&self, observation: &Observation) -> Pressure {
        let p = self.config.percentile;
        let judged = |values: &[f64], limit: f64| {
            (values.len() >= self.config.min_samples)
                .then(|| percentile(values, p))
                .flatten()
                .map(|v| v / limit)
        };
        Pressure {
            ttft: judged(&self.judged_ttft(observation), self.config.ttft_secs),
            tpot: judged(&observation.tpot, self.config.tpot_secs),
        }
    }

    /// The TTFT samples a window is judged by: the answered requests', and the waits of
    /// those still unanswered past the limit (misses, whatever their first token's time).
    /// Waits under the limit are not samples: they may still end either side of it.
    pub fn judged_ttft(&self, observation: &Observation) -> Vec<f64> {
        let limit = self.config.ttft_secs;
        let overdue = observation.waiting.iter().copied().filter(|&w| w > limit);
        observation.ttft.iter().copied().chain(overdue).collect()
    }

    /// Judges one window. A `Move` is a promise the caller keeps or reports failed
    /// with [`Controller::moved`]: the cooldown starts when the worker has moved.
    pub fn observe(&mut self, observation: &Observation) -> Decision {
        let samples = self
            .judged_ttft(observation)
            .len()
            .max(observation.tpot.len());
        if samples < self.config.min_samples {
            return Decision::Hold(Hold::FewSamples { samples });
        }
        if self.moving {
            return Decision::Hold(Hold::Moving);
        }
        if let Some(left_secs) = self.cooling(observation.now_secs) {
            self.pending = None;
            return Decision::Hold(Hold::Cooling { left_secs });
        }
        let pressure = self.pressure(observation);
        let intent = match self.verdict(observation, pressure) {
            Ok(Some(intent)) => intent,
            Ok(None) => {
                self.pending = None;
                return Decision::Hold(Hold::Meets);
            }
            Err(decision) => {
                self.pending = None;
                return decision;
            }
        };
        let seen = match self.pending {
            Some((pending, seen)) if pending == intent => seen + 1,
            _ => 1,
        };
        if seen < self.config.confirm {
            self.pending = Some((intent, seen));
            return Decision::Hold(Hold::Confirming { intent, seen });
        }
        self.pending = None;
        self.moving = true;
        match intent {
            Intent::MoveTo(to) => Decision::Move {
                from: to.other(),
                to,
                why: describe_miss(to, pressure, &self.config),
            },
            Intent::Start(pool) => Decision::Start {
                pool,
                why: format!(
                    "{}, and {} of {} slots are in use",
                    describe_miss(pool, pressure, &self.config),
                    observation.total(),
                    self.config.max_workers.unwrap_or(0)
                ),
            },
            Intent::Stop(pool) => Decision::Stop {
                pool,
                why: format!(
                    "{} with {} prefill and {} decode workers",
                    figures(pressure, &self.config),
                    observation.prefill_workers,
                    observation.decode_workers
                ),
            },
        }
    }

    /// The move, start or stop decided last has finished or was given up; the
    /// cooldown runs from `now_secs` either way, so a failing one is not retried at once.
    pub fn finished(&mut self, now_secs: f64) {
        self.moving = false;
        self.last_move_secs = Some(now_secs);
    }

    fn cooling(&self, now_secs: f64) -> Option<f64> {
        let last = self.last_move_secs?;
        let left = last + self.config.cooldown_secs - now_secs;
        (left > 0.0).then_some(left)
    }

    /// What the window calls for (`Ok(None)`: nothing), or why nothing can be done.
    fn verdict(
        &self,
        observation: &Observation,
        pressure: Pressure,
    ) -> Result<Option<Intent>, Decision> {
        let missed = |pool: Pool| pressure.of(pool).is_some_and(|v| v > 1.0);
        let wanted = match (missed(Pool::Prefill), missed(Pool::Decode)) {
            (false, false) => return Ok(self.surplus(observation, pressure).map(Intent::Stop)),
            (true, true) => {
                let worse = if pressure.ttft >= pressure.tpot {
                    Pool::Prefill
                } else {
                    Pool::Decode
                };
                if self.has_free_slot(observation) {
                    return Ok(Some(Intent::Start(worse)));
                }
                return Err(Decision::CannotMeet {
                    why: format!(
                        "both limits missed ({}) with {} prefill and {} decode workers{}",
                        figures(pressure, &self.config),
                        observation.prefill_workers,
                        observation.decode_workers,
                        self.slots_note(observation)
                    ),
                });
            }
            (true, false) => Pool::Prefill,
            (false, true) => Pool::Decode,
        };
        match self.giver_room(observation, pressure, wanted) {
            Ok(()) => Ok(Some(Intent::MoveTo(wanted))),
            Err(_) if self.has_free_slot(observation) => Ok(Some(Intent::Start(wanted))),
            Err(decision) => Err(decision),
        }
    }

    /// Whether the pool that would give `wanted` a worker can spare one.
    fn giver_room(
        &self,
        observation: &Observation,
        pressure: Pressure,
        wanted: Pool,
    ) -> Result<(), Decision> {
        let giver = wanted.other();
        let givers = observation.workers(giver);
        if givers <= 1 {
            return Err(Decision::CannotMeet {
                why: format!(
                    "{} ({}), and the {} pool has {givers} worker(s) to give{}",
                    describe_miss(wanted, pressure, &self.config),
                    figures(pressure, &self.config),
                    giver.as_str(),
                    self.slots_note(observation)
                ),
            });
        }
        let Some(giver_pressure) = pressure.of(giver) else {
            return Err(Decision::Hold(Hold::NoRoom {
                to: wanted,
                why: format!(
                    "the {} pool's figure is unknown (no samples)",
                    giver.as_str()
                ),
            }));
        };
        let after = giver_pressure * givers as f64 / (givers - 1) as f64;
        if after > self.config.headroom {
            return Err(Decision::Hold(Hold::NoRoom {
                to: wanted,
                why: format!(
                    "the {} pool would reach {:.0}% of its limit with one worker fewer",
                    giver.as_str(),
                    after * 100.0
                ),
            }));
        }
        if let Some(kv) = self.kv_too_full_without_one(observation, giver) {
            return Err(Decision::Hold(Hold::NoRoom {
                to: wanted,
                why: format!(
                    "the {} pool's KV caches would be {:.0}% full with one worker fewer \
                     (kv_headroom {:.0}%)",
                    giver.as_str(),
                    kv * 100.0,
                    self.config.kv_headroom * 100.0
                ),
            }));
        }
        Ok(())
    }

    /// `pool`'s KV usage with one worker fewer, when that is past `kv_headroom`.
    fn kv_too_full_without_one(&self, observation: &Observation, pool: Pool) -> Option<f64> {
        observation
            .kv_usage_without_one(pool)
            .filter(|&kv| kv > self.config.kv_headroom)
    }

    fn has_free_slot(&self, observation: &Observation) -> bool {
        self.config
            .max_workers
            .is_some_and(|max| observation.total() < max)
    }

    /// `, and all N slots are in use` when a budget is set.
    fn slots_note(&self, observation: &Observation) -> String {
        match self.config.max_workers {
            Some(max) => format!(", and {} of {max} slots are in use", observation.total()),
            None => String::new(),
        }
    }

    /// With a budget, the pool that can best do with a worker fewer while every figure
    /// stays under `stop_below` of its limit (its own with `n − 1` workers); unknown
    /// figures stop nothing.
    fn surplus(&self, observation: &Observation, pressure: Pressure) -> Option<Pool> {
        self.config.max_workers?;
        let (ttft, tpot) = (pressure.ttft?, pressure.tpot?);
        let limit = self.config.stop_below;
        if ttft.max(tpot) > limit {
            return None;
        }
        [Pool::Prefill, Pool::Decode]
            .into_iter()
            .filter(|&pool| observation.workers(pool) >= 2)
            .filter(|&pool| self.kv_too_full_without_one(observation, pool).is_none())
            .map(|pool| {
                let n = observation.workers(pool) as f64;
                let after = pressure.of(pool).unwrap_or(0.0) * n / (n - 1.0);
                (pool, after)
            })
            .filter(|&(_, after)| after <= limit)
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(pool, _)| pool)
    }
}

fn describe_miss(pool: Pool, pressure: Pressure, config: &OnlineConfig) -> String {
    let pct = (config.percentile * 100.0).round();
    match pool {
        Pool::Prefill => format!(
            "TTFT p{pct} is {:.0}% of its {} s limit",
            pressure.ttft.unwrap_or(0.0) * 100.0,
            config.ttft_secs
        ),
        Pool::Decode => format!(
            "TPOT p{pct} is {:.0}% of its {} s limit",
            pressure.tpot.unwrap_or(0.0) * 100.0,
            config.tpot_secs
        ),
    }
}

fn figures(pressure: Pressure, config: &OnlineConfig) -> String {
    let show = |v: Option<f64>, limit: f64| match v {
        Some(v) => format!("{:.3} s", v * limit),
        None => "unknown".into(),
    };
    format!(
        "TTFT {} of {} s, TPOT {} of {} s",
        show(pressure.ttft, config.ttft_secs),
        config.ttft_secs,
        show(pressure.tpot, config.tpot_secs),
        config.tpot_secs
    )
}

/// The `p` quantile (0..=1) of `values` by nearest rank; `None` when empty.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OnlineConfig {
        OnlineConfig {
            ttft_secs: 1.0,
            tpot_secs: 0.1,
            percentile: 0.9,
            min_samples: 4,
            confirm: 2,
            cooldown_secs: 10.0,
            headroom: 0.9,
            max_workers: None,
            stop_below: 0.5,
            kv_headroom: 0.9,
        }
    }

    fn window(now: f64, p: usize, d: usize, ttft: f64, tpot: f64) -> Observation {
        Observation {
            now_secs: now,
            prefill_workers: p,
            decode_workers: d,
            ttft: vec![ttft; 10],
            tpot: vec![tpot; 10],
            waiting: Vec::new(),
            kv_usage: KvUsage::default(),
        }
    }

    #[test]
    fn prompts_waiting_past_the_ttft_limit_are_misses_before_they_are_answered() {
        let planner = Controller::new(config());
        // Decode has room (TPOT 20% of its limit with 2 workers → 40% with 1); every
        // answered prompt was quick, but a backlog has built behind them.
        let backlog = Observation {
            now_secs: 0.0,
            prefill_workers: 1,
            decode_workers: 2,
            ttft: vec![0.2; 4],
            tpot: vec![0.02; 10],
            waiting: vec![0.5, 0.9, 3.0, 4.0, 5.0, 6.0, 7.0],
            kv_usage: KvUsage::default(),
        };
        // The five waits past the 1 s limit are samples; the two under it are not.
        assert_eq!(planner.judged_ttft(&backlog).len(), 9);
        let pressure = planner.pressure(&backlog);
        assert!(pressure.ttft.unwrap() > 1.0, "{pressure:?}");
        let mut planner = Controller::new(config());
        assert_eq!(
            planner.observe(&backlog),
            Decision::Hold(Hold::Confirming {
                intent: Intent::MoveTo(Pool::Prefill),
                seen: 1
            })
        );
        let decision = planner.observe(&Observation {
            now_secs: 1.0,
            ..backlog.clone()
        });
        assert!(
            matches!(
                decision,
                Decision::Move {
                    from: Pool::Decode,
                    to: Pool::Prefill,
                    ..
                }
            ),
            "{decision:?}"
        );
        // Before any prompt is answered, waits past the limit are enough to judge by…
        let nothing_answered = Observation {
            ttft: Vec::new(),
            ..backlog.clone()
        };
        assert!(
            Controller::new(config())
                .pressure(&nothing_answered)
                .ttft
                .unwrap()
                > 1.0
        );
        // (judged, not held for too few samples: here the decode pool's figure is the
        // unknown one)
        let judged = Controller::new(config()).observe(&Observation {
            tpot: Vec::new(),
            ..nothing_answered
        });
        assert!(
            matches!(
                judged,
                Decision::Hold(Hold::NoRoom {
                    to: Pool::Prefill,
                    ..
                })
            ),
            "{judged:?}"
        );
        // …waits under it are not: no figure, whatever their number.
        let early = Observation {
            ttft: Vec::new(),
            waiting: vec![0.5; 20],
            ..backlog
        };
        assert_eq!(Controller::new(config()).pressure(&early).ttft, None);
    }

    #[test]
    fn a_missed_tpot_moves_a_prefill_worker_after_confirmation() {
        let mut planner = Controller::new(config());
        let slow_decode = window(0.0, 2, 1, 0.2, 0.2);
        assert_eq!(
            planner.observe(&slow_decode),
            Decision::Hold(Hold::Confirming {
                intent: Intent::MoveTo(Pool::Decode),
                seen: 1
            })
        );
        let decision = planner.observe(&Observation {
            now_secs: 2.0,
            ..slow_decode
        });
        let Decision::Move { from, to, why } = decision else {
            panic!("expected a move, got {decision:?}");
        };
        assert_eq!((from, to), (Pool::Prefill, Pool::Decode));
        assert!(why.contains("TPOT p90 is 200%"), "{why}");
    }

    #[test]
    fn an_interrupted_verdict_starts_over() {
        let mut planner = Controller::new(config());
        planner.observe(&window(0.0, 2, 2, 2.0, 0.01));
        assert_eq!(
            planner.observe(&window(1.0, 2, 2, 0.1, 0.01)),
            Decision::Hold(Hold::Meets)
        );
        assert_eq!(
            planner.observe(&window(2.0, 2, 2, 2.0, 0.01)),
            Decision::Hold(Hold::Confirming {
                intent: Intent::MoveTo(Pool::Prefill),
                seen: 1
            })
        );
    }

    #[test]
    fn no_move_until_the_cooldown_after_the_last_one_ends() {
        let mut planner = Controller::new(config());
        planner.observe(&window(0.0, 2, 2, 2.0, 0.01));
        assert!(matches!(
            planner.observe(&window(1.0, 2, 2, 2.0, 0.01)),
            Decision::Move { .. }
        ));
        // The move is under way: nothing else is decided, however long it takes.
        assert_eq!(
            planner.observe(&window(100.0, 3, 1, 0.1, 0.5)),
            Decision::Hold(Hold::Moving)
        );
        planner.finished(100.0);
        assert!(matches!(
            planner.observe(&window(105.0, 3, 1, 2.0, 0.01)),
            Decision::Hold(Hold::Cooling { .. })
        ));
        assert_eq!(
            planner.observe(&window(111.0, 3, 1, 2.0, 0.01)),
            Decision::CannotMeet {
                why: "TTFT p90 is 200% of its 1 s limit (TTFT 2.000 s of 1 s, TPOT 0.010 s of 0.1 s), and the decode pool has 1 worker(s) to give".into()
            }
        );
    }

    #[test]
    fn the_giving_pool_must_have_room_for_the_load_it_keeps() {
        let mut planner = Controller::new(config());
        // Two decode workers at 50% of the TPOT limit would reach 100% as one.
        assert!(matches!(
            planner.observe(&window(0.0, 1, 2, 3.0, 0.05)),
            Decision::Hold(Hold::NoRoom {
                to: Pool::Prefill,
                ..
            })
        ));
        // At 40% they would reach 80%: room.
        planner.observe(&window(1.0, 1, 2, 3.0, 0.04));
        assert!(matches!(
            planner.observe(&window(2.0, 1, 2, 3.0, 0.04)),
            Decision::Move { .. }
        ));
    }

    #[test]
    fn both_limits_missed_cannot_be_fixed_by_moving() {
        let mut planner = Controller::new(config());
        let decision = planner.observe(&window(0.0, 2, 2, 3.0, 0.3));
        assert_eq!(decision.action(), "cannot_meet");
        assert!(
            decision.to_string().contains("both limits missed"),
            "{decision}"
        );
    }

    #[test]
    fn few_samples_or_unknown_tpot_decide_nothing() {
        let mut planner = Controller::new(config());
        let mut sparse = window(0.0, 2, 2, 3.0, 0.01);
        sparse.ttft.truncate(3);
        sparse.tpot.truncate(2);
        assert_eq!(
            planner.observe(&sparse),
            Decision::Hold(Hold::FewSamples { samples: 3 })
        );
        // Enough TPOT samples, too few TTFT ones: TTFT is unknown, not met.
        let mut few_ttft = window(0.0, 2, 2, 3.0, 0.5);
        few_ttft.ttft.truncate(3);
        assert_eq!(planner.observe(&few_ttft).action(), "no_room");
        let mut unstreamed = window(0.0, 2, 2, 3.0, 0.01);
        unstreamed.tpot.clear();
        assert_eq!(planner.observe(&unstreamed).action(), "no_room");
    }

    fn budget(max_workers: usize) -> OnlineConfig {
        OnlineConfig {
            max_workers: Some(max_workers),
            ..config()
        }
    }

    #[test]
    fn a_free_slot_starts_a_worker_where_no_move_can_help() {
        let mut planner = Controller::new(budget(3));
        // TPOT misses and the prefill pool has one worker to give: start a decode one.
        planner.observe(&window(0.0, 1, 1, 0.1, 0.3));
        let decision = planner.observe(&window(1.0, 1, 1, 0.1, 0.3));
        let Decision::Start { pool, why } = &decision else {
            panic!("expected a start, got {decision:?}");
        };
        assert_eq!(*pool, Pool::Decode);
        assert!(why.contains("2 of 3 slots are in use"), "{why}");
        assert_eq!(decision.action(), "start_decode");
        assert_eq!(
            planner.observe(&window(2.0, 1, 1, 0.1, 0.3)),
            Decision::Hold(Hold::Moving)
        );
        planner.finished(30.0);
        // The budget is spent: the next miss is reported, not acted on.
        let full = planner.observe(&window(41.0, 1, 2, 3.0, 0.3));
        assert_eq!(full.action(), "cannot_meet");
        assert!(
            full.to_string().contains("3 of 3 slots are in use"),
            "{full}"
        );
    }

    #[test]
    fn a_move_is_preferred_to_a_start() {
        let mut planner = Controller::new(budget(8));
        planner.observe(&window(0.0, 2, 2, 3.0, 0.02));
        assert!(matches!(
            planner.observe(&window(1.0, 2, 2, 3.0, 0.02)),
            Decision::Move {
                to: Pool::Prefill,
                ..
            }
        ));
    }

    #[test]
    fn both_missed_with_a_free_slot_starts_for_the_worse_pool() {
        let mut planner = Controller::new(budget(5));
        planner.observe(&window(0.0, 2, 2, 1.5, 0.4));
        assert_eq!(
            planner.observe(&window(1.0, 2, 2, 1.5, 0.4)).action(),
            "start_decode"
        );
    }

    #[test]
    fn an_idle_pool_gives_back_a_worker_only_with_a_budget_and_known_figures() {
        let quiet = window(0.0, 3, 2, 0.1, 0.02);
        // No budget: nothing is ever stopped.
        let mut unbudgeted = Controller::new(config());
        unbudgeted.observe(&quiet);
        assert_eq!(unbudgeted.observe(&quiet), Decision::Hold(Hold::Meets));
        let mut planner = Controller::new(budget(5));
        assert_eq!(
            planner.observe(&quiet),
            Decision::Hold(Hold::Confirming {
                intent: Intent::Stop(Pool::Prefill),
                seen: 1
            })
        );
        // Prefill at 10% → 15% with 2 of 3; decode at 20% → 40% with 1 of 2: prefill.
        let decision = planner.observe(&Observation {
            now_secs: 1.0,
            ..quiet.clone()
        });
        assert_eq!(decision.action(), "stop_prefill", "{decision}");
        planner.finished(1.0);
        // A pool near its limit, or one whose figure is unknown, keeps its workers.
        let mut busy = Controller::new(budget(5));
        busy.observe(&window(0.0, 2, 2, 0.6, 0.02));
        assert_eq!(
            busy.observe(&window(1.0, 2, 2, 0.6, 0.02)),
            Decision::Hold(Hold::Meets)
        );
        let mut unknown = window(0.0, 2, 2, 0.1, 0.01);
        unknown.tpot.clear();
        let mut blind = Controller::new(budget(5));
        blind.observe(&unknown);
        assert_eq!(blind.observe(&unknown), Decision::Hold(Hold::Meets));
        // One worker per pool is the floor.
        let mut floor = Controller::new(budget(5));
        floor.observe(&window(0.0, 1, 1, 0.01, 0.001));
        assert_eq!(
            floor.observe(&window(1.0, 1, 1, 0.01, 0.001)),
            Decision::Hold(Hold::Meets)
        );
    }

    fn with_kv(observation: Observation, prefill: Option<f64>, decode: Option<f64>) -> Observation {
        Observation {
            kv_usage: KvUsage { prefill, decode },
            ..observation
        }
    }

    #[test]
    fn a_pool_whose_kv_caches_would_fill_gives_no_worker() {
        // TTFT misses; decode's TPOT has room (20% of its limit → 40% with one of two
        // workers), but its caches are half full: 100% with one worker fewer.
        let mut planner = Controller::new(config());
        let full = with_kv(window(0.0, 2, 2, 2.0, 0.02), Some(0.1), Some(0.5));
        let decision = planner.observe(&full);
        let Decision::Hold(Hold::NoRoom { to, why }) = &decision else {
            panic!("expected no room, got {decision:?}");
        };
        assert_eq!(*to, Pool::Prefill);
        assert!(
            why.contains("decode pool's KV caches would be 100% full"),
            "{why}"
        );
        // At 40% (80% with one fewer, under the 90% headroom) the move goes ahead.
        let roomy = |now| with_kv(window(now, 2, 2, 2.0, 0.02), Some(0.1), Some(0.4));
        planner.observe(&roomy(1.0));
        assert!(matches!(
            planner.observe(&roomy(2.0)),
            Decision::Move {
                from: Pool::Decode,
                to: Pool::Prefill,
                ..
            }
        ));
        // With a free slot, a worker is started instead.
        let mut budgeted = Controller::new(budget(5));
        budgeted.observe(&full);
        assert_eq!(
            budgeted
                .observe(&Observation {
                    now_secs: 1.0,
                    ..full
                })
                .action(),
            "start_prefill"
        );
    }

    #[test]
    fn an_idle_pool_whose_kv_caches_would_fill_is_not_stopped() {
        // Both pools idle (figures at 10% and 20% of their limits); prefill's caches
        // would be 120% full with one of 2 workers fewer, so decode gives one back.
        let quiet = |now| with_kv(window(now, 2, 3, 0.1, 0.02), Some(0.6), Some(0.3));
        let mut planner = Controller::new(budget(5));
        planner.observe(&quiet(0.0));
        assert_eq!(planner.observe(&quiet(1.0)).action(), "stop_decode");
        // Neither can spare one: nothing stops.
        let crowded = |now| with_kv(window(now, 2, 3, 0.1, 0.02), Some(0.6), Some(0.7));
        let mut planner = Controller::new(budget(5));
        planner.observe(&crowded(0.0));
        assert_eq!(planner.observe(&crowded(1.0)), Decision::Hold(Hold::Meets));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.9), Some(9.0));
        assert_eq!(percentile(&values, 0.5), Some(5.0));
        assert_eq!(percentile(&values, 1.0), Some(10.0));
        assert_eq!(percentile(&[], 0.9), None);
    }
}
