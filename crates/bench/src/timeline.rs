//! One run over time: each request's latencies by when it was sent, whether it met
//! the SLO, and the layout the router had (its P/D pool sizes, and the planner's moves
//! when one ran). A comparison draws the runs of a scenario on one time axis, so a
//! static layout and the planner can be seen side by side as the load shifts.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::plot::{Figure, Panel, Series};
use crate::stats::{RequestRecord, Slo};

/// Requests per point of the rolling lines.
const ROLLING: usize = 10;

/// One request, seconds from the start of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestPoint {
    pub start: f64,
    pub ttft: f64,
    pub tpot: Option<f64>,
    pub met_slo: bool,
}

/// The pools' sizes from `at` seconds on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolPoint {
    pub at: f64,
    pub prefill: usize,
    pub decode: usize,
}

/// A planner move, `at` seconds into the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Move {
    pub at: f64,
    pub worker: String,
    pub moved: bool,
    pub detail: String,
}

/// A run's timeline.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timeline {
    /// Whether an online planner ran (its layout could change).
    #[serde(default)]
    pub planner: bool,
    pub requests: Vec<RequestPoint>,
    pub pools: Vec<PoolPoint>,
    pub moves: Vec<Move>,
}

impl Timeline {
    /// The successful requests of a run, judged against `slo` (all met without one).
    pub fn of_requests(records: &[RequestRecord], slo: Option<&Slo>) -> Self {
        let mut requests: Vec<RequestPoint> = records
            .iter()
            .filter(|r| r.ok)
            .map(|r| RequestPoint {
                start: r.start,
                ttft: r.ttft,
                tpot: r.tpot(),
                met_slo: slo.is_none_or(|slo| slo.met_by(r)),
            })
            .collect();
        requests.sort_by(|a, b| a.start.total_cmp(&b.start));
        Self {
            requests,
            ..Self::default()
        }
    }

    /// A fixed layout for the whole run.
    pub fn with_fixed_pools(mut self, prefill: usize, decode: usize) -> Self {
        self.pools = vec![PoolPoint {
            at: 0.0,
            prefill,
            decode,
        }];
        self
    }

    /// The layout over time from the router's `GET /planner` answer; `run_start` is
    /// the run's start in Unix seconds (the journal's clock).
    pub fn with_planner_journal(mut self, journal: &Value, run_start: f64) -> Self {
        self.planner = true;
        let decisions = journal["decisions"].as_array().cloned().unwrap_or_default();
        let mut last: Option<(usize, usize)> = None;
        for decision in &decisions {
            let at = decision["at"].as_f64().unwrap_or(run_start) - run_start;
            let sizes = (
                decision["prefill_workers"].as_u64().unwrap_or(0) as usize,
                decision["decode_workers"].as_u64().unwrap_or(0) as usize,
            );
            if last != Some(sizes) {
                self.pools.push(PoolPoint {
                    at: at.max(0.0),
                    prefill: sizes.0,
                    decode: sizes.1,
                });
                last = Some(sizes);
            }
            if let Some(worker) = decision["worker"].as_str() {
                self.moves.push(Move {
                    at,
                    worker: worker.to_owned(),
                    moved: decision["moved"].as_bool().unwrap_or(false),
                    detail: decision["detail"].as_str().unwrap_or_default().to_owned(),
                });
            }
        }
        self
    }

    /// Requests that met the SLO.
    pub fn met(&self) -> usize {
        self.requests.iter().filter(|r| r.met_slo).count()
    }

    /// `value` over [`ROLLING`] requests at a time, by start time, reduced by `reduce`
    /// (each point at the window's last start).
    fn rolling(
        &self,
        value: impl Fn(&RequestPoint) -> Option<f64>,
        reduce: fn(&mut [f64]) -> f64,
    ) -> Vec<(f64, f64)> {
        let points: Vec<(f64, f64)> = self
            .requests
            .iter()
            .filter_map(|r| Some((r.start, value(r)?)))
            .collect();
        points
            .windows(ROLLING.min(points.len()).max(1))
            .map(|window| {
                let mut values: Vec<f64> = window.iter().map(|(_, v)| *v).collect();
                (window[window.len() - 1].0, reduce(&mut values))
            })
            .collect()
    }

    /// The decode pool's size as a step line up to `end` seconds.
    fn decode_steps(&self, end: f64) -> Vec<(f64, f64)> {
        let mut steps = Vec::new();
        for (i, pool) in self.pools.iter().enumerate() {
            if i > 0 {
                steps.push((pool.at, self.pools[i - 1].decode as f64));
            }
            steps.push((pool.at, pool.decode as f64));
        }
        if let Some(last) = self.pools.last() {
            steps.push((end.max(last.at), last.decode as f64));
        }
        steps
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn mean(values: &mut [f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// The figure of a scenario's runs at one load: rolling TTFT and TPOT, the share of
/// requests meeting the SLO, and the decode pool's size, one line per topology.
pub fn figure(title: &str, runs: &[(&str, &Timeline)]) -> Figure {
    let end = runs
        .iter()
        .flat_map(|(_, t)| t.requests.last().map(|r| r.start))
        .fold(0.0f64, f64::max);
    let series = |value: &dyn Fn(&Timeline) -> Vec<(f64, f64)>| -> Vec<Series> {
        runs.iter()
            .map(|(name, timeline)| Series {
                name: (*name).to_owned(),
                points: value(timeline),
            })
            .collect()
    };
    let x = "request sent at (s)".to_owned();
    Figure {
        title: title.to_owned(),
        columns: 2,
        panels: vec![
            Panel {
                title: format!("TTFT, rolling median of {ROLLING} requests"),
                x_label: x.clone(),
                y_label: "s".into(),
                series: series(&|t| t.rolling(|r| Some(r.ttft), median)),
            },
            Panel {
                title: format!("TPOT, rolling median of {ROLLING} requests"),
                x_label: x.clone(),
                y_label: "s".into(),
                series: series(&|t| t.rolling(|r| r.tpot, median)),
            },
            Panel {
                title: format!("share meeting the SLO, rolling mean of {ROLLING} requests"),
                x_label: x.clone(),
                y_label: "share".into(),
                series: series(&|t| t.rolling(|r| Some(f64::from(u8::from(r.met_slo))), mean)),
            },
            Panel {
                title: "decode workers (the rest prefill)".into(),
                x_label: "time in the run (s)".into(),
                y_label: "workers".into(),
                series: series(&|t| t.decode_steps(end)),
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(start: f64, ttft: f64, latency: f64) -> RequestRecord {
        RequestRecord {
            ok: true,
            error: None,
            prompt_tokens: 10,
            output_tokens: 11,
            ttft,
            itls: vec![(latency - ttft) / 10.0; 10],
            latency,
            start,
            text: String::new(),
        }
    }

    #[test]
    fn requests_are_judged_and_the_journal_gives_the_pools_over_time() {
        let slo = Slo::parse(&["ttft:1000".into(), "tpot:100".into()]).unwrap();
        // TPOT (latency − ttft) / 10: 0.05 met, 0.2 missed; TTFT 2 s missed.
        let records = [
            record(1.0, 0.5, 1.0),
            record(0.0, 0.5, 2.5),
            record(2.0, 2.0, 2.5),
        ];
        let journal = json!({"decisions": [
            {"at": 100.5, "prefill_workers": 2, "decode_workers": 1},
            {"at": 101.0, "prefill_workers": 2, "decode_workers": 1, "worker": "http://w",
             "moved": true, "detail": "move a worker prefill → decode"},
            {"at": 102.0, "prefill_workers": 1, "decode_workers": 2},
        ]});
        let timeline =
            Timeline::of_requests(&records, Some(&slo)).with_planner_journal(&journal, 100.0);
        let starts: Vec<f64> = timeline.requests.iter().map(|r| r.start).collect();
        assert_eq!(starts, [0.0, 1.0, 2.0]);
        assert_eq!(timeline.met(), 1);
        assert!(timeline.planner);
        assert_eq!(timeline.pools.len(), 2);
        assert_eq!((timeline.pools[1].at, timeline.pools[1].decode), (2.0, 2));
        assert_eq!(timeline.moves.len(), 1);
        assert_eq!(timeline.moves[0].at, 1.0);
        let share = timeline.rolling(|r| Some(f64::from(u8::from(r.met_slo))), mean);
        assert_eq!(share.len(), 1);
        assert!((share[0].1 - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(
            timeline.decode_steps(5.0),
            [(0.5, 1.0), (2.0, 1.0), (2.0, 2.0), (5.0, 2.0)]
        );
    }
}
