//! Rounds of one comparison: the same suite run again on the same topologies (`tandem
//! compare --rounds N`), each run's figures merged across the rounds into their median
//! and range. On a machine whose speed drifts (a VM's neighbours, shared cores), one run
//! of a latency percentile can be 2× off the next run of the identical load; the range
//! beside the median shows how far a difference between layouts can be trusted.

use serde::Serialize;
use serde_json::Value;

/// How far a round may stray from the rounds' median before the figure is marked as not
/// reproduced.
pub const REPRODUCED_WITHIN: f64 = 0.2;

/// The median of some measurements and their range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub lowest: f64,
    pub highest: f64,
}

impl Spread {
    /// `None` for no values. The median of an even count is the mean of the middle two.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let (&lowest, &highest) = (sorted.first()?, sorted.last()?);
        let half = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[half]
        } else {
            (sorted[half - 1] + sorted[half]) / 2.0
        };
        Some(Self {
            median,
            lowest,
            highest,
        })
    }

    /// Whether a measurement strays from the median by more than `share` of it.
    pub fn strays(&self, share: f64) -> bool {
        self.lowest < self.median * (1.0 - share) || self.highest > self.median * (1.0 + share)
    }
}

/// The figures merged for each run, as `results.json` names them, with their labels.
const FIGURES: [(&str, &str); 6] = [
    ("p50_ttft_ms", "TTFT p50 (ms)"),
    ("p90_ttft_ms", "TTFT p90 (ms)"),
    ("p50_tpot_ms", "TPOT p50 (ms)"),
    ("p90_tpot_ms", "TPOT p90 (ms)"),
    ("output_throughput", "output tok/s"),
    ("request_goodput", "goodput (req/s)"),
];

/// One run (scenario, topology, load) across the rounds that measured it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MergedRun {
    pub scenario: String,
    pub topology: String,
    /// "rate 1.5", "concurrency 4" or "all at once".
    pub load: String,
    /// Rounds that measured it.
    pub rounds: usize,
    /// In [`FIGURES`]' order; a figure no round reported is left out.
    pub figures: Vec<Figure>,
}

/// One figure of a merged run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figure {
    /// As `results.json` names it (`p50_ttft_ms`, `output_throughput`, …).
    pub name: String,
    #[serde(flatten)]
    pub spread: Spread,
}

/// Why rounds cannot be merged.
#[derive(Debug, thiserror::Error)]
pub enum RoundsError {
    #[error("round {0}'s results have no {1}")]
    Missing(usize, &'static str),
}

/// Merges the `results.json` of each round, in the first round's order of runs.
pub fn merge(rounds: &[Value]) -> Result<Vec<MergedRun>, RoundsError> {
    let mut merged: Vec<(MergedRun, Vec<&Value>)> = Vec::new();
    for (index, round) in rounds.iter().enumerate() {
        let scenarios = round["scenarios"]
            .as_array()
            .ok_or(RoundsError::Missing(index + 1, "scenarios"))?;
        for scenario in scenarios {
            let name = scenario["scenario"]["name"].as_str().unwrap_or_default();
            let runs = scenario["runs"]
                .as_array()
                .ok_or(RoundsError::Missing(index + 1, "runs"))?;
            for run in runs {
                let topology = run["topology"].as_str().unwrap_or_default();
                let load = load_label(&run["load"]);
                let same = |(kept, _): &&mut (MergedRun, Vec<&Value>)| {
                    kept.scenario == name && kept.topology == topology && kept.load == load
                };
                match merged.iter_mut().find(same) {
                    Some((_, runs)) => runs.push(run),
                    None => merged.push((
                        MergedRun {
                            scenario: name.to_owned(),
                            topology: topology.to_owned(),
                            load,
                            rounds: 0,
                            figures: Vec::new(),
                        },
                        vec![run],
                    )),
                }
            }
        }
    }
    Ok(merged
        .into_iter()
        .map(|(run, measured)| MergedRun {
            rounds: measured.len(),
            figures: FIGURES
                .iter()
                .filter_map(|(key, _)| {
                    let values: Vec<f64> =
                        measured.iter().filter_map(|r| r[key].as_f64()).collect();
                    Spread::of(&values).map(|spread| Figure {
                        name: key.to_string(),
                        spread,
                    })
                })
                .collect(),
            ..run
        })
        .collect())
}

fn load_label(load: &Value) -> String {
    match (
        load["request_rate"].as_f64(),
        load["max_concurrency"].as_u64(),
    ) {
        (Some(rate), _) => format!("rate {rate}"),
        (None, Some(concurrency)) => format!("concurrency {concurrency}"),
        (None, None) => "all at once".into(),
    }
}

/// The merged runs as markdown: a table per scenario, each figure as "median
/// [lowest–highest]", marked † where a round strays from the median by more than
/// [`REPRODUCED_WITHIN`].
pub fn markdown(merged: &[MergedRun], rounds: usize) -> String {
    let mut out = format!(
        "# Rounds\n\nThe comparison ran {rounds} times, every topology once a round, one \
         round after the other (reports in `round-1/` to `round-{rounds}/`). Each figure is \
         the median of the rounds that measured it, then their range; † marks a figure on \
         which a round strays from the median by more than {:.0}%: a difference between \
         layouts smaller than that range is not one this machine can show.\n",
        REPRODUCED_WITHIN * 100.0
    );
    let mut scenarios: Vec<&str> = merged.iter().map(|r| r.scenario.as_str()).collect();
    scenarios.dedup();
    for scenario in scenarios {
        let runs: Vec<&MergedRun> = merged.iter().filter(|r| r.scenario == scenario).collect();
        let keys: Vec<(&str, &str)> = FIGURES
            .iter()
            .copied()
            .filter(|(key, _)| {
                runs.iter()
                    .any(|r| r.figures.iter().any(|f| f.name == *key))
            })
            .collect();
        out += &format!("\n## {scenario}\n\n| load | topology | rounds |");
        for (_, label) in &keys {
            out += &format!(" {label} |");
        }
        out += &format!("\n|---|---|---|{}\n", "---|".repeat(keys.len()));
        for run in runs {
            out += &format!("| {} | {} | {} |", run.load, run.topology, run.rounds);
            for (key, _) in &keys {
                let cell = run
                    .figures
                    .iter()
                    .find(|f| f.name == *key)
                    .map_or("–".into(), |f| spread_cell(&f.spread));
                out += &format!(" {cell} |");
            }
            out += "\n";
        }
    }
    out
}

fn spread_cell(spread: &Spread) -> String {
    let digits = if spread.median >= 100.0 { 0 } else { 1 };
    let mark = if spread.strays(REPRODUCED_WITHIN) {
        " †"
    } else {
        ""
    };
    format!(
        "{:.digits$} [{:.digits$}–{:.digits$}]{mark}",
        spread.median, spread.lowest, spread.highest
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_spread_is_the_median_and_the_range() {
        let odd = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((odd.median, odd.lowest, odd.highest), (2.0, 1.0, 3.0));
        let even = Spread::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(even.median, 2.5);
        assert_eq!(Spread::of(&[]), None);
        assert!(odd.strays(0.2) && !Spread::of(&[10.0, 11.0, 9.0]).unwrap().strays(0.2));
    }

    fn round(ttft: [f64; 2], goodput: Option<f64>) -> Value {
        let run = |topology: &str, ttft: f64| {
            let mut run = json!({
                "topology": topology,
                "load": {"request_rate": 2.0, "max_concurrency": null},
                "p50_ttft_ms": ttft, "p90_ttft_ms": ttft * 2.0,
                "p50_tpot_ms": 10.0, "p90_tpot_ms": 20.0, "output_throughput": 50.0,
            });
            if let Some(goodput) = goodput {
                run["request_goodput"] = json!(goodput);
            }
            run
        };
        json!({"scenarios": [{
            "scenario": {"name": "s"},
            "runs": [run("single", ttft[0]), run("split", ttft[1])],
        }]})
    }

    #[test]
    fn rounds_are_merged_run_by_run() {
        let rounds = [
            round([100.0, 300.0], Some(1.0)),
            round([110.0, 900.0], None),
            round([90.0, 310.0], Some(2.0)),
        ];
        let merged = merge(&rounds).unwrap();
        assert_eq!(merged.len(), 2);
        assert_eq!(
            (merged[0].topology.as_str(), merged[0].load.as_str()),
            ("single", "rate 2")
        );
        assert_eq!(merged[0].rounds, 3);
        let figure = |run: &MergedRun, key: &str| {
            run.figures.iter().find(|f| f.name == key).map(|f| f.spread)
        };
        let ttft = figure(&merged[1], "p50_ttft_ms").unwrap();
        assert_eq!(
            (ttft.median, ttft.lowest, ttft.highest),
            (310.0, 300.0, 900.0)
        );
        // Goodput from the two rounds that had an SLO.
        assert_eq!(figure(&merged[0], "request_goodput").unwrap().median, 1.5);
        let table = markdown(&merged, 3);
        assert!(
            table.contains("| rate 2 | single | 3 | 100 [90–110] |"),
            "{table}"
        );
        assert!(table.contains("310 [300–900] †"), "{table}");
        assert!(table.contains("goodput (req/s)"), "{table}");
    }

    #[test]
    fn a_round_without_runs_is_refused() {
        let error = merge(&[round([1.0, 2.0], None), json!({})]).unwrap_err();
        assert_eq!(error.to_string(), "round 2's results have no scenarios");
    }
}
