//! What a layout does under a workload: a discrete-event model of continuous batching
//! (DistServe's method: simulate, then read latency and SLO attainment off the
//! modelled requests).
//!
//! Each worker runs steps back to back while it has work, as `tandem serve` does: a step
//! decodes one token for every sequence past its prompt and spends the rest of the
//! step's token budget on prompt chunks, first come first served (the engine's own
//! order; see `Model::start_step`); its time is the profile's step cost of its prompt
//! tokens and decode rows together ([`WorkerCost::step_seconds`]). Co-located workers
//! slow each other, so a step has two costs ([`WorkerCosts`]): measured alone and
//! measured alongside busy neighbours. It advances at the rate of the first while no
//! other worker of the layout has work and of the second while one has, the rate
//! changing whenever a neighbour starts or runs out of work. A request goes to
//! the least loaded worker of its entry pool. On a prefill worker its prompt is
//! computed, its KV then moves (the profile's hand-off time) to the least loaded
//! decode worker, which computes the prompt's last position and samples the first
//! token, as a `tandem serve` decode leg does. Not modelled: KV capacity (preemption),
//! the router's own time, prefix-cache hits.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use crate::layout::{Layout, Role};
use crate::profile::{Profile, ProfileError, WorkerCost, WorkerCosts};
use crate::workload::{Request, Slo, Workload};

/// The modelled requests' latencies.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Per request, in arrival order: time to first token, and time per output token
    /// after the first (0 for one-token outputs).
    pub ttft: Vec<f64>,
    pub tpot: Vec<f64>,
    /// From the first arrival to the last finish.
    pub duration: f64,
    pub output_tokens: usize,
}

impl Prediction {
    /// The `p`-th percentile (0–100) of time to first token.
    pub fn ttft_percentile(&self, p: f64) -> f64 {
        percentile(&self.ttft, p)
    }

    pub fn tpot_percentile(&self, p: f64) -> f64 {
        percentile(&self.tpot, p)
    }

    pub fn mean_ttft(&self) -> f64 {
        self.ttft.iter().sum::<f64>() / self.ttft.len().max(1) as f64
    }

    /// The share of requests meeting both of the SLO's latencies.
    pub fn attainment(&self, slo: &Slo) -> f64 {
        let met = self
            .ttft
            .iter()
            .zip(&self.tpot)
            .filter(|&(&ttft, &tpot)| ttft <= slo.ttft_seconds && tpot <= slo.tpot_seconds)
            .count();
        met as f64 / self.ttft.len().max(1) as f64
    }

    /// Output tokens per second.
    pub fn throughput(&self) -> f64 {
        self.output_tokens as f64 / self.duration.max(f64::EPSILON)
    }

    /// Its percentiles (50, 90, 99) and throughput, for reports.
    pub fn summary(&self) -> Summary {
        let at = |values: &[f64]| [50.0, 90.0, 99.0].map(|p| percentile(values, p));
        Summary {
            ttft: at(&self.ttft),
            tpot: at(&self.tpot),
            throughput: self.throughput(),
        }
    }
}

/// A prediction's figures: TTFT and TPOT at the 50th, 90th and 99th percentiles
/// (seconds), output tokens per second.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Summary {
    pub ttft: [f64; 3],
    pub tpot: [f64; 3],
    pub throughput: f64,
}

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Models `workload` on `layout` with the costs of `profile`.
pub fn simulate(
    profile: &Profile,
    layout: &Layout,
    workload: &Workload,
) -> Result<Prediction, ProfileError> {
    simulate_requests(profile, layout, &workload.requests())
}

/// Models these requests (in arrival order) on `layout`: a measured run's own
/// arrivals, say.
pub fn simulate_requests(
    profile: &Profile,
    layout: &Layout,
    requests: &[Request],
) -> Result<Prediction, ProfileError> {
    let mut model = Model::new(profile, layout)?;
    for (index, request) in requests.iter().enumerate() {
        model.schedule(request.arrival, Event::Arrive(index));
    }
    model.run(requests);
    Ok(model.prediction(requests))
}

/// A sequence on a worker.
#[derive(Debug, Clone, Copy)]
struct Seq {
    request: usize,
    /// Prompt positions computed (on a decode worker, all but the last arrive with the
    /// KV).
    computed: usize,
    input: usize,
    output: usize,
    generated: usize,
}

impl Seq {
    fn in_prompt(&self) -> bool {
        self.computed < self.input
    }
}

struct Worker {
    role: Role,
    costs: WorkerCosts,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// The step under way: which running sequences decode, and each prompt chunk.
    step: Option<Step>,
    /// Counts the ends this worker's steps were given (see [`Pace::generation`]).
    generations: u64,
    /// Prompts whose KV this (decode) worker is pulling.
    pulling: usize,
}

#[derive(Default)]
struct Step {
    decoding: Vec<usize>,
    chunks: Vec<(usize, usize)>,
    pace: Pace,
}

/// How far a step is, and how fast it goes: it takes `alone` seconds with the other
/// workers idle and `crowded` with one of them busy.
#[derive(Default)]
struct Pace {
    alone: f64,
    crowded: f64,
    /// The share of the step still to run, as of `since`.
    left: f64,
    since: f64,
    is_crowded: bool,
    /// Which scheduled end is this step's: ends of earlier steps, and this step's own
    /// before a change of rate, are stale.
    generation: u64,
}

impl Pace {
    fn seconds(&self, crowded: bool) -> f64 {
        if crowded { self.crowded } else { self.alone }
    }

    /// Switches to the other rate at `now` under a new `generation`; returns when the
    /// step now ends.
    fn switch(&mut self, crowded: bool, now: f64, generation: u64) -> f64 {
        let ran = (now - self.since) / self.seconds(self.is_crowded);
        self.left = (self.left - ran).max(0.0);
        self.since = now;
        self.is_crowded = crowded;
        self.generation = generation;
        now + self.left * self.seconds(crowded)
    }
}

impl Worker {
    fn load(&self) -> usize {
        self.waiting.len() + self.running.len()
    }

    /// In a step, pulling a prompt's KV, or with work that starts a step at this
    /// instant.
    fn busy(&self) -> bool {
        self.step.is_some() || self.pulling > 0 || self.load() > 0
    }
}

#[derive(Debug, Clone, Copy)]
enum Event {
    Arrive(usize),
    /// A worker's step ended, unless its end was rescheduled since (the generation).
    StepDone(usize, u64),
    /// An idle worker was given work: it starts a step once every event of this
    /// instant is in (requests sent together share a step, as the engine takes every
    /// queued command before a step).
    Wake(usize),
    /// A prompt's KV reached decode worker `.1`.
    Handed(Seq, usize),
}

struct Scheduled {
    at: f64,
    order: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    /// Earliest first (a max-heap of the reverse), then in scheduling order.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .at
            .total_cmp(&self.at)
            .then(other.order.cmp(&self.order))
    }
}

struct Model<'a> {
    profile: &'a Profile,
    workers: Vec<Worker>,
    events: BinaryHeap<Scheduled>,
    scheduled: u64,
    first_token: Vec<f64>,
    finished: Vec<f64>,
}

impl<'a> Model<'a> {
    fn new(profile: &'a Profile, layout: &Layout) -> Result<Self, ProfileError> {
        let mut workers = Vec::new();
        for group in &layout.groups {
            let costs = profile.worker(group.cores)?;
            for _ in 0..group.count {
                workers.push(Worker {
                    role: group.role,
                    costs: costs.clone(),
                    waiting: VecDeque::new(),
                    running: Vec::new(),
                    step: None,
                    generations: 0,
                    pulling: 0,
                });
            }
        }
        Ok(Self {
            profile,
            workers,
            events: BinaryHeap::new(),
            scheduled: 0,
            first_token: Vec::new(),
            finished: Vec::new(),
        })
    }

    fn schedule(&mut self, at: f64, event: Event) {
        self.scheduled += 1;
        self.events.push(Scheduled {
            at,
            order: self.scheduled,
            event,
        });
    }

    fn run(&mut self, requests: &[Request]) {
        self.first_token = vec![f64::NAN; requests.len()];
        self.finished = vec![f64::NAN; requests.len()];
        while let Some(Scheduled { at, event, .. }) = self.events.pop() {
            match event {
                Event::Arrive(index) => {
                    let request = requests[index];
                    let seq = Seq {
                        request: index,
                        computed: 0,
                        input: request.input,
                        output: request.output,
                        generated: 0,
                    };
                    let worker = self.least_loaded(|role| role != Role::Decode);
                    self.enqueue(worker, seq, at);
                }
                Event::Handed(seq, worker) => {
                    self.workers[worker].pulling -= 1;
                    self.enqueue(worker, seq, at);
                }
                Event::Wake(worker) => {
                    if self.workers[worker].step.is_none() {
                        self.start_step(worker, at);
                    }
                }
                Event::StepDone(worker, generation) => {
                    let current = self.workers[worker].step.as_ref();
                    if current.is_some_and(|step| step.pace.generation == generation) {
                        self.finish_step(worker, at);
                        self.start_step(worker, at);
                    }
                }
            }
            self.repace(at);
        }
    }

    /// Workers with work (in a step, or about to start one).
    fn busy_workers(&self) -> usize {
        self.workers.iter().filter(|w| w.busy()).count()
    }

    /// Moves every step whose neighbours went busy or idle at `now` to its new rate.
    fn repace(&mut self, now: f64) {
        let busy = self.busy_workers();
        let mut ends = Vec::new();
        for (w, worker) in self.workers.iter_mut().enumerate() {
            let Some(step) = worker.step.as_mut() else {
                continue;
            };
            // This worker is one of the busy ones.
            let crowded = busy > 1;
            if crowded != step.pace.is_crowded {
                worker.generations += 1;
                let end = step.pace.switch(crowded, now, worker.generations);
                ends.push((end, w, worker.generations));
            }
        }
        for (end, w, generation) in ends {
            self.schedule(end, Event::StepDone(w, generation));
        }
    }

    fn least_loaded(&self, accepts: impl Fn(Role) -> bool) -> usize {
        (0..self.workers.len())
            .filter(|&w| accepts(self.workers[w].role))
            .min_by_key(|&w| self.workers[w].load())
            .expect("a layout has a worker for each part")
    }

    fn enqueue(&mut self, worker: usize, seq: Seq, now: f64) {
        self.workers[worker].waiting.push_back(seq);
        if self.workers[worker].step.is_none() {
            self.schedule(now, Event::Wake(worker));
        }
    }

    /// Plans the worker's next step and schedules its end, if it has work: as the
    /// engine's scheduler (`crates/engine/src/sched/scheduler.rs`) does, the running
    /// sequences first, in admission order — one token each for those decoding, the
    /// rest of the prompt (as much as the step's token budget leaves) for those in one —
    /// then waiting requests, first come first served, while budget is left and fewer
    /// than `max_sequences` run. A decode leg's prompt arrives with all but its last
    /// position, so it takes one token.
    fn start_step(&mut self, w: usize, now: f64) {
        let others_busy = self.busy_workers() - usize::from(self.workers[w].busy()) > 0;
        let worker = &mut self.workers[w];
        let cost: &WorkerCost = &worker.costs.alone;
        let mut step = Step::default();
        let mut spans = Vec::new();
        let mut budget = cost.max_batched_tokens;
        let mut context = 0;
        let mut take = |i: usize, seq: &Seq, budget: &mut usize| {
            if seq.in_prompt() {
                let chunk = (seq.input - seq.computed).min(*budget);
                spans.push((seq.computed, seq.computed + chunk));
                step.chunks.push((i, chunk));
                *budget -= chunk;
            } else {
                step.decoding.push(i);
                context += seq.input + seq.generated;
                *budget -= 1;
            }
        };
        for (i, seq) in worker.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            take(i, seq, &mut budget);
        }
        while budget > 0 && worker.running.len() < cost.max_sequences {
            let Some(seq) = worker.waiting.pop_front() else {
                break;
            };
            take(worker.running.len(), &seq, &mut budget);
            worker.running.push(seq);
        }
        if step.decoding.is_empty() && step.chunks.is_empty() {
            worker.step = None;
            return;
        }
        let mean_context = context as f64 / step.decoding.len().max(1) as f64;
        let seconds =
            |cost: &WorkerCost| cost.step_seconds(&spans, step.decoding.len(), mean_context);
        step.pace = Pace {
            alone: seconds(&worker.costs.alone),
            crowded: seconds(&worker.costs.crowded),
            left: 1.0,
            since: now,
            is_crowded: others_busy,
            generation: worker.generations + 1,
        };
        worker.generations += 1;
        let end = now + step.pace.seconds(others_busy);
        let generation = worker.generations;
        worker.step = Some(step);
        self.schedule(end, Event::StepDone(w, generation));
    }

    /// Applies the step that just ended: tokens, finished prompts, hand-offs.
    fn finish_step(&mut self, w: usize, now: f64) {
        let step = self.workers[w].step.take().expect("a step was under way");
        let role = self.workers[w].role;
        let mut sampled = step.decoding;
        for (i, chunk) in step.chunks {
            let seq = &mut self.workers[w].running[i];
            seq.computed += chunk;
            if !seq.in_prompt() {
                sampled.push(i);
            }
        }
        let mut leaving = Vec::new();
        for i in sampled {
            let seq = &mut self.workers[w].running[i];
            if role == Role::Prefill {
                leaving.push(i);
                continue;
            }
            seq.generated += 1;
            if seq.generated == 1 {
                self.first_token[seq.request] = now;
            }
            if seq.generated >= seq.output {
                self.finished[seq.request] = now;
                leaving.push(i);
            }
        }
        leaving.sort_unstable_by(|a, b| b.cmp(a));
        for i in leaving {
            let seq = self.workers[w].running.remove(i);
            if role == Role::Prefill {
                self.hand_off(seq, now);
            }
        }
    }

    /// The prompt's KV moves to the least loaded decode worker, which computes the
    /// last position itself.
    fn hand_off(&mut self, seq: Seq, now: f64) {
        let decode = self.least_loaded(|role| role == Role::Decode);
        self.workers[decode].pulling += 1;
        let arrives = now + self.profile.handoff_seconds(seq.input);
        let pulled = Seq {
            computed: seq.input - 1,
            ..seq
        };
        self.schedule(arrives, Event::Handed(pulled, decode));
    }

    fn prediction(&self, requests: &[Request]) -> Prediction {
        let mut ttft = Vec::with_capacity(requests.len());
        let mut tpot = Vec::with_capacity(requests.len());
        for (i, request) in requests.iter().enumerate() {
            ttft.push(self.first_token[i] - request.arrival);
            let later = request.output.saturating_sub(1);
            tpot.push(if later == 0 {
                0.0
            } else {
                (self.finished[i] - self.first_token[i]) / later as f64
            });
        }
        let start = requests.first().map_or(0.0, |r| r.arrival);
        let end = self.finished.iter().copied().fold(start, f64::max);
        Prediction {
            ttft,
            tpot,
            duration: end - start,
            output_tokens: requests.iter().map(|r| r.output).sum(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::profile::{DecodePoint, HandoffCost, PrefillPoint, WorkerProfile};
    use crate::workload::{Arrival, LengthDist};

    /// Prefill 1 ms + 0.1 ms per token (+ a little attention), decode 10 ms + 0.5 ms
    /// per sequence; hand-off 2 ms + 1 ns per byte.
    pub(crate) fn profile() -> Profile {
        let worker = |cores: usize| {
            let speed = cores as f64;
            WorkerProfile {
                cores,
                max_batched_tokens: 512,
                max_sequences: 32,
                prefill: [16, 128, 512, 2048]
                    .map(|t| PrefillPoint {
                        tokens: t,
                        seconds: (0.001 + 1e-4 * t as f64 + 1e-9 * (t * t) as f64) / speed,
                    })
                    .to_vec(),
                decode: [(1, 100), (8, 100), (8, 1000), (32, 500)]
                    .map(|(n, x)| DecodePoint {
                        batch: n,
                        context: x,
                        seconds: (0.01 + 5e-4 * n as f64 + 1e-7 * (n * x) as f64) / speed.sqrt(),
                    })
                    .to_vec(),
                steps: Vec::new(),
                measured_alongside: 0,
            }
        };
        Profile {
            hardware: "test machine".into(),
            model: "test model".into(),
            kv_bytes_per_token: 10_000,
            handoff: HandoffCost {
                fixed_seconds: 0.002,
                seconds_per_byte: 1e-9,
            },
            workers: vec![worker(1), worker(2)],
            core_speeds: Vec::new(),
        }
    }

    fn workload(input: usize, output: usize, rate: f64) -> Workload {
        Workload {
            input: LengthDist::Fixed(input),
            output: LengthDist::Fixed(output),
            arrival: Arrival::Poisson { rate },
            requests: 4000,
            seed: 1,
        }
    }

    #[test]
    fn a_prefill_queue_waits_as_an_md1_queue_does() {
        // One-token outputs of prompts that fill a step: one prompt per step, each
        // taking D; DistServe §3.1: mean TTFT = D + R·D² / (2(1 − R·D)).
        let profile = profile();
        let cost = profile.worker(1).unwrap().alone;
        let d = cost.prefill_seconds(0, 512);
        for utilization in [0.3, 0.5, 0.7] {
            let rate = utilization / d;
            let mut workload = workload(512, 1, rate);
            workload.requests = 100_000;
            let predicted = simulate(&profile, &Layout::single(1), &workload).unwrap();
            let queueing = d + rate * d * d / (2.0 * (1.0 - rate * d));
            let error = (predicted.mean_ttft() - queueing).abs() / queueing;
            assert!(
                error < 0.05,
                "ρ={utilization}: {} vs {queueing}",
                predicted.mean_ttft()
            );
        }
    }

    #[test]
    fn an_idle_layout_answers_in_the_profiles_times() {
        let profile = profile();
        let slow = workload(1000, 11, 0.01);
        let alone = simulate(&profile, &Layout::single(1), &slow).unwrap();
        let cost = profile.worker(1).unwrap().alone;
        // Two steps (the step budget is 512 tokens), each paying the pass's fixed cost.
        let prompt =
            cost.step_seconds(&[(0, 512)], 0, 0.0) + cost.step_seconds(&[(512, 1000)], 0, 0.0);
        let ttft = alone.ttft_percentile(50.0);
        assert!((ttft - prompt).abs() < 1e-9, "{ttft} vs {prompt}");
        // TPOT: a decode step of one sequence, its context growing from 1001 to 1010.
        let step = cost.decode_step_seconds(1, 1005.0);
        assert!(
            (alone.tpot_percentile(50.0) - step).abs() < 1e-6,
            "{}",
            alone.tpot_percentile(50.0)
        );
        // P/D: the prompt, the hand-off, then D computes the last position.
        let split = simulate(&profile, &Layout::disaggregated((1, 1), (1, 1)), &slow).unwrap();
        let expected =
            prompt + profile.handoff_seconds(1000) + cost.step_seconds(&[(999, 1000)], 0, 0.0);
        assert!((split.ttft_percentile(50.0) - expected).abs() < 1e-9);
        assert_eq!(split.output_tokens, slow.requests * 11);
    }

    #[test]
    fn disaggregation_keeps_decoding_steady_under_long_prompts() {
        // Long prompts arriving among long outputs: colocated, every prompt chunk
        // stretches a decode step (interference); split, decode steps stay short.
        let profile = profile();
        let mixed = workload(2000, 100, 1.5);
        let slo = Slo {
            ttft_seconds: 2.0,
            tpot_seconds: 0.015,
            attainment: 0.9,
        };
        let replicas = simulate(&profile, &Layout::replicas(2, 1), &mixed).unwrap();
        let split = simulate(&profile, &Layout::disaggregated((1, 1), (1, 1)), &mixed).unwrap();
        assert!(split.tpot_percentile(90.0) < replicas.tpot_percentile(90.0));
        assert!(split.attainment(&slo) > replicas.attainment(&slo));
    }

    /// Requests of `input` tokens and `output` tokens, all sent at `arrival`.
    fn together(count: usize, input: usize, output: usize) -> Vec<Request> {
        vec![
            Request {
                arrival: 0.0,
                input,
                output,
            };
            count
        ]
    }

    #[test]
    fn steps_are_scheduled_as_the_engine_schedules_them() {
        // A 512-token budget and at most 2 sequences: three 300-token prompts sent
        // together. Step 1: the first prompt and 212 tokens of the second (the third
        // waits: 2 sequences run). Step 2: the first decodes, the second's last 88.
        // Step 3: both decode; the first has its 3 tokens. Step 4: the second decodes
        // (its last token) and the third is admitted whole. Steps 5–6: it decodes.
        let mut profile = profile();
        profile.workers[0].max_sequences = 2;
        let cost = profile.worker(1).unwrap().alone;
        let predicted =
            simulate_requests(&profile, &Layout::single(1), &together(3, 300, 3)).unwrap();
        let s1 = cost.step_seconds(&[(0, 300), (0, 212)], 0, 0.0);
        let s2 = cost.step_seconds(&[(212, 300)], 1, 301.0);
        let s3 = cost.step_seconds(&[], 2, (302 + 301) as f64 / 2.0);
        let s4 = cost.step_seconds(&[(0, 300)], 1, 302.0);
        let (s5, s6) = (
            cost.step_seconds(&[], 1, 301.0),
            cost.step_seconds(&[], 1, 302.0),
        );
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(predicted.ttft[0], s1), "{predicted:?}");
        assert!(close(predicted.ttft[1], s1 + s2), "{predicted:?}");
        assert!(close(predicted.ttft[2], s1 + s2 + s3 + s4), "{predicted:?}");
        assert!(close(predicted.tpot[0], (s2 + s3) / 2.0));
        assert!(close(predicted.tpot[1], (s3 + s4) / 2.0));
        assert!(close(predicted.tpot[2], (s5 + s6) / 2.0));
    }

    #[test]
    fn prompts_sent_together_take_the_measured_shared_step() {
        // The 2-core Xeon's profile: four ~505-token prompts sent at once to the
        // 2-core worker are computed in one step, which the profile measured.
        let profile = Profile::from_toml(include_str!(
            "../../../docs/planner/xeon-2core-profile.toml"
        ))
        .unwrap();
        let measured = profile.workers[1]
            .steps
            .iter()
            .find(|s| s.prompts == 4 && s.decode_batch == 0 && s.tokens > 2000)
            .copied()
            .unwrap();
        let each = measured.tokens / 4;
        let predicted =
            simulate_requests(&profile, &Layout::single(2), &together(4, each, 1)).unwrap();
        let cost = profile.worker(2).unwrap().alone;
        let step = cost.step_seconds(&[(0, each); 4], 0, 0.0);
        assert!(predicted.ttft.iter().all(|&t| (t - step).abs() < 1e-12));
        let ratio = step / measured.seconds;
        assert!((0.93..1.07).contains(&ratio), "{step} vs {measured:?}");
    }

    /// The test profile's 1-core worker also measured beside a busy neighbour, where
    /// everything takes twice as long.
    fn profile_with_neighbours() -> Profile {
        let mut profile = profile();
        let mut crowded = profile.workers[0].clone();
        crowded.measured_alongside = 1;
        crowded.prefill.iter_mut().for_each(|p| p.seconds *= 2.0);
        crowded.decode.iter_mut().for_each(|p| p.seconds *= 2.0);
        profile.put_worker(crowded);
        profile
    }

    #[test]
    fn a_step_runs_at_the_crowded_rate_while_a_neighbour_is_busy() {
        let profile = profile_with_neighbours();
        let costs = profile.worker(1).unwrap();
        let alone = costs.alone.step_seconds(&[(0, 500)], 0, 0.0);
        let crowded = costs.crowded.step_seconds(&[(0, 500)], 0, 0.0);
        assert!((crowded / alone - 2.0).abs() < 1e-9, "{alone} {crowded}");
        let replicas = Layout::replicas(2, 1);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        // Alone on the machine: the alone cost.
        let one = simulate_requests(&profile, &replicas, &together(1, 500, 1)).unwrap();
        assert!(close(one.ttft[0], alone), "{one:?}");
        // Two at once, one on each replica: both crowded throughout.
        let two = simulate_requests(&profile, &replicas, &together(2, 500, 1)).unwrap();
        assert!(two.ttft.iter().all(|&t| close(t, crowded)), "{two:?}");
        // The neighbour gets a long prompt a third of the way into the step: the rest
        // of the step runs at the crowded rate (twice the time it had left).
        let x = alone / 3.0;
        let later = [
            Request {
                arrival: 0.0,
                input: 500,
                output: 1,
            },
            Request {
                arrival: x,
                input: 2000,
                output: 1,
            },
        ];
        let mixed = simulate_requests(&profile, &replicas, &later).unwrap();
        let expected = x + (1.0 - x / alone) * crowded;
        assert!(
            close(mixed.ttft[0], expected),
            "{} vs {expected}",
            mixed.ttft[0]
        );
        // Once the first finished, the second's steps run alone again: it ends sooner
        // than four crowded steps.
        let second = mixed.ttft[1] + x;
        let all_crowded: f64 = [(0, 512), (512, 1024), (1024, 1536), (1536, 2000)]
            .iter()
            .map(|&chunk| costs.crowded.step_seconds(&[chunk], 0, 0.0))
            .sum();
        assert!(second - x < all_crowded - 1e-6, "{second} vs {all_crowded}");
    }

    #[test]
    fn a_decode_worker_pulling_kv_counts_as_busy() {
        // 1P1D with one request: while the KV moves, the decode worker is busy, and
        // nothing else runs, so every step is at the alone rate: the same TTFT as a
        // profile measured only alone.
        let both = profile_with_neighbours();
        let split = Layout::disaggregated((1, 1), (1, 1));
        let one = simulate_requests(&both, &split, &together(1, 300, 4)).unwrap();
        let alone = simulate_requests(&profile(), &split, &together(1, 300, 4)).unwrap();
        assert_eq!(one, alone);
        // Two requests 10 ms apart: the second's prompt runs while the first's KV is
        // pulled and then decoded, so it takes longer than alone.
        let spaced = [
            Request {
                arrival: 0.0,
                input: 300,
                output: 20,
            },
            Request {
                arrival: 0.01,
                input: 300,
                output: 20,
            },
        ];
        let crowded = simulate_requests(&both, &split, &spaced).unwrap();
        let uncrowded = simulate_requests(&profile(), &split, &spaced).unwrap();
        assert!(
            crowded.ttft[1] > uncrowded.ttft[1],
            "{crowded:?} {uncrowded:?}"
        );
    }

    #[test]
    fn the_same_workload_is_modelled_alike() {
        let profile = profile();
        let load = workload(300, 20, 5.0);
        let layout = Layout::disaggregated((1, 1), (1, 1));
        assert_eq!(
            simulate(&profile, &layout, &load).unwrap(),
            simulate(&profile, &layout, &load).unwrap()
        );
        let missing = simulate(&profile, &Layout::single(4), &load).unwrap_err();
        assert_eq!(missing, ProfileError::NoWorkerSize { cores: 4 });
    }
}
