//! The planner's predictions against a comparison's measurements: each request-rate run
//! of a `tandem compare` report (`results.json`) is modelled with the same requests —
//! lengths, and the arrival times `tandem bench` drew for it — on the layout its
//! topology's commands describe, and the figures are set side by side.
//!
//! The arrival times are drawn again, not read: a report keeps each run's figures, not
//! its requests. `tandem compare` draws the load point `i` of a scenario (its `rates`
//! in order) with the seed `seed + 1000·i` (fresh prompts and arrivals at every load),
//! so that is the seed the model replays with.
//!
//! Several reports of the same suite (rounds of one comparison, run one after the
//! other) are checked together: each run's figures are the median of its rounds, and
//! the rounds' range is kept beside them, so that a prediction is judged against what
//! the machine measures of the same load from one run to the next (a VM's neighbours
//! can move a TPOT percentile by 2× between identical runs).

use serde_json::Value;
use tandem_planner::layout::Layout;
use tandem_planner::profile::{CoreRate, CoreSpeed, describe_core_speeds, slowest_share};
use tandem_planner::workload::Request;
use tandem_planner::{Profile, ProfileError, simulate_requests};

use crate::rounds::{REPRODUCED_WITHIN, Spread};
use crate::workload;

/// The figures of a row: TTFT and TPOT at the 50th and 90th percentiles
/// (milliseconds) and output tokens per second.
pub const FIGURES: usize = 5;

/// How close a prediction must come to the measured median to count as met.
pub const TOLERANCE: f64 = 0.2;

/// One run, measured and predicted (see [`FIGURES`]). With several rounds, `measured`
/// is their median and `lowest`/`highest` their range; with one, all three agree.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub scenario: String,
    pub topology: String,
    pub layout: String,
    pub rate: f64,
    pub measured: [f64; FIGURES],
    pub lowest: [f64; FIGURES],
    pub highest: [f64; FIGURES],
    pub rounds: usize,
    pub predicted: [f64; FIGURES],
}

impl Row {
    /// Whether figure `i`'s prediction is within [`TOLERANCE`] of the measured median.
    pub fn within_tolerance(&self, i: usize) -> bool {
        (self.predicted[i] / self.measured[i] - 1.0).abs() <= TOLERANCE
    }

    /// Figure `i`'s median and range over the rounds.
    pub fn spread(&self, i: usize) -> Spread {
        Spread {
            median: self.measured[i],
            lowest: self.lowest[i],
            highest: self.highest[i],
        }
    }

    /// Whether figure `i`'s prediction lies inside the range its rounds measured.
    pub fn within_rounds(&self, i: usize) -> bool {
        (self.lowest[i]..=self.highest[i]).contains(&self.predicted[i])
    }

    /// Whether the rounds themselves differ from their median on figure `i` by more
    /// than a comparison's rounds mark as not reproduced.
    pub fn rounds_disagree(&self, i: usize) -> bool {
        self.spread(i).strays(REPRODUCED_WITHIN)
    }
}

/// How many of `rows`' figures meet the tolerance, how many more fall inside their
/// rounds' range, and how many there are in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub within_tolerance: usize,
    pub only_within_rounds: usize,
    pub rounds_disagree: usize,
    pub figures: usize,
}

pub fn tally(rows: &[Row]) -> Tally {
    let mut tally = Tally {
        within_tolerance: 0,
        only_within_rounds: 0,
        rounds_disagree: 0,
        figures: rows.len() * FIGURES,
    };
    for row in rows {
        for i in 0..FIGURES {
            if row.within_tolerance(i) {
                tally.within_tolerance += 1;
            } else if row.within_rounds(i) {
                tally.only_within_rounds += 1;
            }
            if row.rounds_disagree(i) {
                tally.rounds_disagree += 1;
            }
        }
    }
    tally
}

/// Why a report cannot be checked.
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    #[error("the report has no {0}")]
    Missing(&'static str),
    /// Reports whose runs of one scenario, layout and rate model differently (other
    /// lengths, counts or arrivals) are not rounds of one load.
    #[error(
        "the reports ran scenario {0} with different requests; only rounds of one suite can be merged"
    )]
    NotRounds(String),
    #[error(transparent)]
    Profile(#[from] ProfileError),
}

/// Every request-rate run of `reports` (rounds of one `tandem compare` suite, each a
/// results.json) whose topology is made of `tandem serve` workers, measured (the
/// median of the rounds that ran it) and predicted, in the first report's order.
/// `seed`: the scenarios' seed where a report does not record it.
pub fn against_reports(
    profile: &Profile,
    reports: &[Value],
    seed: u64,
) -> Result<Vec<Row>, ValidateError> {
    let mut merged: Vec<(Row, Vec<[f64; FIGURES]>)> = Vec::new();
    for report in reports {
        for row in against_report(profile, report, seed)? {
            let same_run = |(kept, _): &&mut (Row, Vec<[f64; FIGURES]>)| {
                kept.scenario == row.scenario && kept.layout == row.layout && kept.rate == row.rate
            };
            match merged.iter_mut().find(same_run) {
                Some((kept, rounds)) if kept.predicted == row.predicted => {
                    rounds.push(row.measured)
                }
                Some(_) => return Err(ValidateError::NotRounds(row.scenario)),
                None => {
                    let measured = row.measured;
                    merged.push((row, vec![measured]));
                }
            }
        }
    }
    Ok(merged
        .into_iter()
        .map(|(row, rounds)| {
            let spreads: [Spread; FIGURES] = std::array::from_fn(|i| {
                let values: Vec<f64> = rounds.iter().map(|r| r[i]).collect();
                Spread::of(&values).expect("every merged run has a round")
            });
            Row {
                measured: spreads.map(|s| s.median),
                lowest: spreads.map(|s| s.lowest),
                highest: spreads.map(|s| s.highest),
                rounds: rounds.len(),
                ..row
            }
        })
        .collect())
}

/// Every request-rate run of `results` (a `tandem compare` results.json) whose topology
/// is made of `tandem serve` workers, measured and predicted. `seed`: the scenarios'
/// seed where the report does not record it (0 unless the suite set one).
pub fn against_report(
    profile: &Profile,
    results: &Value,
    seed: u64,
) -> Result<Vec<Row>, ValidateError> {
    check_same_setup(profile, &results["setup"])?;
    let topologies = results["topologies"]
        .as_array()
        .ok_or(ValidateError::Missing("topologies"))?;
    let scenarios = results["scenarios"]
        .as_array()
        .ok_or(ValidateError::Missing("scenarios"))?;
    let mut rows = Vec::new();
    for scenario in scenarios {
        let seed = scenario["scenario"]["seed"].as_u64().unwrap_or(seed);
        let rates: Vec<f64> = scenario["scenario"]["rates"]
            .as_array()
            .map(|rates| rates.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        let runs = scenario["runs"]
            .as_array()
            .ok_or(ValidateError::Missing("runs"))?;
        for run in runs {
            let Some(rate) = run["request_rate"].as_f64() else {
                continue;
            };
            let name = run["topology"].as_str().unwrap_or_default();
            let Some(layout) = topologies
                .iter()
                .find(|t| t["name"] == name)
                .and_then(layout_of)
            else {
                continue;
            };
            let point = rates.iter().position(|&r| r == rate).unwrap_or(0);
            let requests = requests_of(run, rate, point_seed(seed, point));
            let predicted = simulate_requests(profile, &layout, &requests)?.summary();
            let measured = |key: &str| run[key].as_f64().unwrap_or(f64::NAN);
            let measured = [
                measured("p50_ttft_ms"),
                measured("p90_ttft_ms"),
                measured("p50_tpot_ms"),
                measured("p90_tpot_ms"),
                measured("output_throughput"),
            ];
            rows.push(Row {
                scenario: scenario["scenario"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                topology: name.to_owned(),
                layout: layout.to_string(),
                rate,
                measured,
                lowest: measured,
                highest: measured,
                rounds: 1,
                predicted: [
                    predicted.ttft[0] * 1e3,
                    predicted.ttft[1] * 1e3,
                    predicted.tpot[0] * 1e3,
                    predicted.tpot[1] * 1e3,
                    predicted.throughput,
                ],
            });
        }
    }
    Ok(rows)
}

/// The seed `tandem compare` draws a scenario's load point `index` with (its prompts
/// and its arrival times).
pub fn point_seed(seed: u64, index: usize) -> u64 {
    seed.wrapping_add(1000 * index as u64)
}

/// Refuses a report measured on another machine or model than the profile: the
/// report's machine is "host: CPU, N cores", its model a path or name.
fn check_same_setup(profile: &Profile, setup: &Value) -> Result<(), ValidateError> {
    let machine = setup["machine"]
        .as_str()
        .ok_or(ValidateError::Missing("setup.machine"))?;
    let model = setup["model"]
        .as_str()
        .ok_or(ValidateError::Missing("setup.model"))?;
    let hardware = machine
        .split_once(": ")
        .map_or(machine, |(_, hardware)| hardware);
    let name = std::path::Path::new(model)
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or(model);
    Ok(profile.check_matches(name, hardware)?)
}

/// The run's requests: its mean lengths, at the times `tandem bench` sent them.
fn requests_of(run: &Value, rate: f64, seed: u64) -> Vec<Request> {
    let count = run["num_prompts"].as_u64().unwrap_or(0) as usize;
    let per = |key: &str| (run[key].as_f64().unwrap_or(0.0) / count.max(1) as f64).round() as usize;
    let burstiness = run["burstiness"].as_f64().unwrap_or(1.0);
    workload::arrivals(count, Some(rate), burstiness, seed)
        .into_iter()
        .map(|arrival| Request {
            arrival,
            input: per("total_input_tokens").max(1),
            output: per("total_output_tokens").max(1),
        })
        .collect()
}

/// The layout a topology's commands start: `tandem serve … --threads N` workers, the
/// router's `--prefill`/`--decode`/`--worker` lists saying which is which. `None` for
/// anything else (vLLM workers, mixed sizes within a role).
fn layout_of(topology: &Value) -> Option<Layout> {
    let commands: Vec<&str> = topology["commands"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let router = commands.iter().find(|c| c.contains(" route "))?;
    let threads_at = |url: &str| -> Option<usize> {
        let port = url.rsplit(':').next()?;
        let serve = commands
            .iter()
            .find(|c| c.contains(" serve ") && c.contains(&format!("--port {port} ")))?;
        flag(serve, "--threads")?.parse().ok()
    };
    let pool = |name: &str| -> Option<(usize, usize)> {
        let urls = flags(router, name);
        let sizes: Vec<usize> = urls
            .iter()
            .map(|url| threads_at(url))
            .collect::<Option<_>>()?;
        match sizes.as_slice() {
            [] => Some((0, 0)),
            [first, rest @ ..] if rest.iter().all(|s| s == first) => Some((sizes.len(), *first)),
            _ => None,
        }
    };
    let (workers, prefill, decode) = (pool("--worker")?, pool("--prefill")?, pool("--decode")?);
    match (workers, prefill, decode) {
        ((n, cores), (0, _), (0, _)) if n > 0 => Some(Layout::replicas(n, cores)),
        ((0, _), p, d) if p.0 > 0 && d.0 > 0 => Some(Layout::disaggregated(p, d)),
        _ => None,
    }
}

fn flag<'a>(command: &'a str, name: &str) -> Option<&'a str> {
    flags(command, name).into_iter().next()
}

fn flags<'a>(command: &'a str, name: &str) -> Vec<&'a str> {
    let words: Vec<&str> = command.split_whitespace().collect();
    words
        .windows(2)
        .filter(|pair| pair[0] == name)
        .map(|pair| pair[1])
        .collect()
}

/// The rows as a markdown table, with predicted/measured ratios; with several rounds,
/// each measured cell is their median followed by their range.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | layout | rate | TTFT p50 meas. / pred. | TTFT p90 | TPOT p50 | TPOT p90 | output tok/s |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let cell = |i: usize| {
            let digits = if i < 2 { 0 } else { 1 };
            let (m, p) = (row.measured[i], row.predicted[i]);
            let range = if row.rounds > 1 {
                format!(" [{:.digits$}–{:.digits$}]", row.lowest[i], row.highest[i])
            } else {
                String::new()
            };
            format!("{m:.digits$}{range} / {p:.digits$} ({:.2}×)", p / m)
        };
        let cells: Vec<String> = (0..FIGURES).map(cell).collect();
        out += &format!(
            "| {} | {} | {} | {} |\n",
            row.scenario,
            row.layout,
            row.rate,
            cells.join(" | ")
        );
    }
    let tally = tally(rows);
    let rounds = rows.iter().map(|r| r.rounds).max().unwrap_or(0);
    out += &format!(
        "\n{} of {} figures within {:.0}% of the measured {}",
        tally.within_tolerance,
        tally.figures,
        TOLERANCE * 100.0,
        if rounds > 1 { "median" } else { "figure" },
    );
    if rounds > 1 {
        out += &format!(
            "; {} more inside the range of their {rounds} rounds; the rounds themselves \
             differ from their median by more than {:.0}% on {} figures",
            tally.only_within_rounds,
            REPRODUCED_WITHIN * 100.0,
            tally.rounds_disagree,
        );
    }
    out += ".\n";
    out
}

/// The cores the profile and each report's layouts were timed on (`tandem plan profile
/// --launch` and `tandem compare` time them), each layout's slowest core as a share of
/// the profile's fastest: a layout that ran on a slower core than the profile was
/// measured on is slower than predicted for a reason the model does not see. Empty
/// where neither timed its cores.
pub fn core_notes(profile: &Profile, reports: &[Value]) -> String {
    let mut lines = Vec::new();
    if !profile.core_speeds.is_empty() {
        lines.push(format!(
            "- profile: {}",
            describe_core_speeds(&profile.core_speeds)
        ));
    }
    for (round, report) in reports.iter().enumerate() {
        for topology in report["topologies"].as_array().into_iter().flatten() {
            let Some(speeds) = topology
                .get("core_speeds")
                .and_then(|v| serde_json::from_value::<Vec<CoreSpeed>>(v.clone()).ok())
                .filter(|s| !s.is_empty())
            else {
                continue;
            };
            let name = topology["name"].as_str().unwrap_or("?");
            lines.push(format!(
                "- report {}, {name}: {}{}",
                round + 1,
                describe_core_speeds(&speeds),
                against_profile(&speeds, &profile.core_speeds)
            ));
        }
    }
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "\nCores (single-threaded loops: f32 multiply-adds, and a 32 MiB read; alone / all busy):\n{}\n",
        lines.join("\n")
    )
}

/// " — slowest compute, core 1, at 65% of the profile's fastest; slowest read, …", or
/// nothing where the profile has no rate to set `speeds` against.
fn against_profile(speeds: &[CoreSpeed], profile: &[CoreSpeed]) -> String {
    let shares: Vec<String> = [(CoreRate::Compute, "compute"), (CoreRate::Read, "read")]
        .into_iter()
        .filter_map(|(rate, what)| {
            let (core, share) = slowest_share(speeds, profile, rate)?;
            Some(format!(
                "slowest {what}, core {core}, at {:.0}% of the profile's fastest",
                100.0 * share
            ))
        })
        .collect();
    if shares.is_empty() {
        String::new()
    } else {
        format!(" — {}", shares.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn committed_profile() -> Profile {
        Profile::from_toml(include_str!(
            "../../../docs/planner/xeon-2core-profile.toml"
        ))
        .unwrap()
    }

    #[test]
    fn a_report_from_another_machine_or_model_is_refused() {
        let profile = committed_profile();
        let setup = |machine: &str, model: &str| json!({"machine": machine, "model": model});
        let gguf = "/m/SmolLM2-135M-Instruct.Q4_1.gguf";
        let here = setup("vm: Intel(R) Xeon(R) Processor, 2 cores", gguf);
        assert!(check_same_setup(&profile, &here).is_ok());
        let elsewhere = setup("box: AMD EPYC, 2 cores", gguf);
        let error = check_same_setup(&profile, &elsewhere)
            .unwrap_err()
            .to_string();
        assert!(error.contains("profile this machine"), "{error}");
        let other = setup("vm: Intel(R) Xeon(R) Processor, 2 cores", "llama.gguf");
        let error = check_same_setup(&profile, &other).unwrap_err().to_string();
        assert!(error.contains("profile this model"), "{error}");
    }

    #[test]
    fn each_layouts_cores_are_set_against_the_profiles() {
        let mut profile = committed_profile();
        assert_eq!(core_notes(&profile, &[json!({"topologies": []})]), "");
        profile.core_speeds = vec![CoreSpeed {
            core: 0,
            alone: 80.0,
            together: 76.0,
            read_alone: Some(40.0),
            read_together: Some(36.0),
        }];
        let speed = |core: usize, compute: f64, read: f64| {
            json!({"core": core, "alone": compute, "together": compute,
                   "read_alone": read, "read_together": read})
        };
        let report = json!({"topologies": [
            {"name": "single", "core_speeds": [speed(0, 80.0, 40.0), speed(1, 52.0, 30.0)]},
            {"name": "older", "core_speeds": [{"core": 0, "alone": 60.0, "together": 60.0}]},
            {"name": "remote"},
        ]});
        let notes = core_notes(&profile, &[report]);
        assert!(
            notes.contains("- profile: core 0 80.0 GFLOP/s, 40.0 GB/s alone, 76.0, 36.0 together"),
            "{notes}"
        );
        assert!(
            notes.contains("- report 1, single: core 0 80.0 GFLOP/s, 40.0 GB/s alone, 80.0, 40.0 together; core 1 52.0 GFLOP/s, 30.0 GB/s alone, 52.0, 30.0 together — slowest compute, core 1, at 65% of the profile's fastest; slowest read, core 1, at 75% of the profile's fastest"),
            "{notes}"
        );
        // A report timed before reads were: its compute alone.
        assert!(
            notes.contains("- report 1, older: core 0 60.0 GFLOP/s alone, 60.0 together — slowest compute, core 0, at 75% of the profile's fastest\n"),
            "{notes}"
        );
        assert!(!notes.contains("remote"), "{notes}");
    }

    #[test]
    fn the_committed_report_is_modelled_run_by_run() {
        let results: Value = serde_json::from_str(include_str!(
            "../../../docs/planner/xeon-2core-long-prompt-results.json"
        ))
        .unwrap();
        let rows = against_report(&committed_profile(), &results, 0).unwrap();
        // 3 layouts × 4 rates; throughput is the figure the model gets closest.
        assert_eq!(rows.len(), 12);
        for row in &rows {
            let ratio = row.predicted[4] / row.measured[4];
            assert!((0.8..1.2).contains(&ratio), "{row:?}");
        }
        // The header, the rows, a blank line and the tally.
        assert_eq!(markdown(&rows).lines().count(), 16);
    }

    fn committed_report() -> Value {
        serde_json::from_str(include_str!(
            "../../../docs/planner/xeon-2core-long-prompt-results.json"
        ))
        .unwrap()
    }

    /// `report` with figure `key` of every run multiplied by `factor`.
    fn scaled(report: &Value, key: &str, factor: f64) -> Value {
        let mut report = report.clone();
        for scenario in report["scenarios"].as_array_mut().unwrap() {
            for run in scenario["runs"].as_array_mut().unwrap() {
                let value = run[key].as_f64().unwrap();
                run[key] = json!(value * factor);
            }
        }
        report
    }

    #[test]
    fn rounds_are_merged_into_their_median_and_range() {
        let results = committed_report();
        let slower = scaled(&results, "p50_tpot_ms", 2.0);
        let profile = committed_profile();
        let one = against_report(&profile, &results, 0).unwrap();
        let rounds = [results.clone(), slower.clone(), slower];
        let merged = against_reports(&profile, &rounds, 0).unwrap();
        assert_eq!(merged.len(), one.len());
        for (single, merged) in one.iter().zip(&merged) {
            assert_eq!(merged.rounds, 3);
            assert_eq!(merged.predicted, single.predicted);
            assert_eq!(merged.measured[2], single.measured[2] * 2.0);
            assert_eq!(merged.lowest[2], single.measured[2]);
            assert_eq!(merged.highest[2], single.measured[2] * 2.0);
            assert_eq!(merged.measured[0], single.measured[0]);
            assert!(merged.rounds_disagree(2) && !merged.rounds_disagree(0));
        }
        let table = markdown(&merged);
        assert!(
            table.contains("inside the range of their 3 rounds"),
            "{table}"
        );
        assert_eq!(tally(&merged).figures, 5 * one.len());
    }

    #[test]
    fn measured_rounds_of_one_suite_are_taken_as_rounds() {
        let profile = Profile::from_toml(include_str!(
            "../../../docs/planner/emerald-2core-evening-profile.toml"
        ))
        .unwrap();
        let rounds: Vec<Value> = [
            include_str!(
                "../../../docs/planner/emerald-2core-evening-long-prompt-60-round1-results.json"
            ),
            include_str!(
                "../../../docs/planner/emerald-2core-evening-long-prompt-60-round2-results.json"
            ),
            include_str!(
                "../../../docs/planner/emerald-2core-evening-long-prompt-60-round3-results.json"
            ),
        ]
        .iter()
        .map(|text| serde_json::from_str(text).unwrap())
        .collect();
        let rows = against_reports(&profile, &rounds, 0).unwrap();
        // 3 layouts × 2 rates, each run in all three rounds.
        assert_eq!(rows.len(), 6);
        for row in &rows {
            assert_eq!(row.rounds, 3);
            for i in 0..FIGURES {
                assert!(row.lowest[i] <= row.measured[i] && row.measured[i] <= row.highest[i]);
            }
        }
    }

    #[test]
    fn reports_of_other_loads_are_not_rounds() {
        let results = committed_report();
        let longer = scaled(&results, "total_input_tokens", 2.0);
        let error = against_reports(&committed_profile(), &[results, longer], 0).unwrap_err();
        assert!(matches!(error, ValidateError::NotRounds(_)), "{error}");
    }

    #[test]
    fn layouts_are_read_from_the_topology_commands() {
        let serve = |port: u16, threads: usize| {
            format!(
                "tandem serve --host 127.0.0.1 --port {port} --model m --threads {threads} --kv-cache-memory 1GiB"
            )
        };
        let topology = |router: &str, serves: Vec<String>| {
            let mut commands: Vec<Value> = serves.into_iter().map(Value::from).collect();
            commands.push(Value::from(router));
            json!({"commands": commands})
        };
        let single = topology(
            "tandem route --port 9 --worker http://127.0.0.1:1 --threads 1",
            vec![serve(1, 2)],
        );
        assert_eq!(layout_of(&single), Some(Layout::single(2)));
        let split = topology(
            "tandem route --port 9 --prefill http://127.0.0.1:1 --decode http://127.0.0.1:2",
            vec![serve(1, 1), serve(2, 1)],
        );
        assert_eq!(
            layout_of(&split),
            Some(Layout::disaggregated((1, 1), (1, 1)))
        );
        let vllm = topology(
            "tandem route --port 9 --worker http://127.0.0.1:1",
            vec!["vllm serve m --port 1".into()],
        );
        assert_eq!(layout_of(&vllm), None);
    }
}
