//! A comparison's results — every scenario run against every topology — and the report
//! folder they become: `report.md` (the seed's tables with "vs baseline" ratios,
//! percentile tables, the figures), `results.json` (each run under `vllm bench
//! serve`'s key names) and PNG/SVG figures. The first topology is the baseline.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Value, json};
use tandem_planner::profile::{CoreSpeed, describe_core_speeds};

use crate::handoff::Handoff;
use crate::plot::{Figure, Panel, PlotError, Series};
use crate::stats::{Distribution, Summary};
use crate::suite::{LoadPoint, Scenario};
use crate::timeline::{self, Timeline};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Plot(#[from] PlotError),
}

/// Where and how the comparison ran.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub date: String,
    pub tandem_version: String,
    pub machine: String,
    /// This machine's GPUs (`1 × NVIDIA H200, 143771 MiB, driver …`), where it has any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<String>,
    pub model: String,
    /// What every topology gets (cores, KV budget per worker).
    pub resources: String,
    /// The command that produced the report.
    pub command: String,
}

/// One compared topology.
#[derive(Debug, Clone, Serialize)]
pub struct TopologyEntry {
    pub name: String,
    pub description: String,
    /// Its processes' command lines.
    pub commands: Vec<String>,
    /// Why it could not be measured, if it could not.
    pub error: Option<String>,
    /// Its workers' cores' speeds, timed just before it started (none for remote
    /// workers or workers given no cores).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub core_speeds: Vec<CoreSpeed>,
}

/// One scenario at one load against one topology.
#[derive(Debug, Clone)]
pub struct Run {
    pub topology: String,
    pub load: LoadPoint,
    pub summary: Summary,
    /// The run as `tandem bench --json` writes it.
    pub document: Value,
    /// The run over time (shift workloads, and runs with the online planner).
    pub timeline: Option<Timeline>,
    /// What the KV hand-off moved, where the topology has one (its workers' counters
    /// before and after the run).
    pub handoff: Option<Handoff>,
}

#[derive(Debug, Clone)]
pub struct ScenarioResults {
    pub scenario: Scenario,
    pub runs: Vec<Run>,
}

/// Everything a report is made of.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub setup: Setup,
    pub topologies: Vec<TopologyEntry>,
    pub scenarios: Vec<ScenarioResults>,
}

impl Comparison {
    pub fn new(setup: Setup, topologies: Vec<TopologyEntry>, scenarios: &[Scenario]) -> Self {
        Self {
            setup,
            topologies,
            scenarios: scenarios
                .iter()
                .map(|s| ScenarioResults {
                    scenario: s.clone(),
                    runs: Vec::new(),
                })
                .collect(),
        }
    }

    fn baseline(&self) -> &str {
        self.topologies.first().map_or("", |t| t.name.as_str())
    }

    /// Writes `report.md`, `results.json` and the figures into `dir`; the paths written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map(|_| path.clone())
                .map_err(|source| ReportError::Write { path, source })
        };
        std::fs::create_dir_all(dir).map_err(|source| ReportError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut written = Vec::new();
        let mut figure_files = Vec::new();
        for (stem, figure) in self.figures() {
            written.extend(figure.save(dir, &stem)?);
            figure_files.push(stem);
        }
        let results = serde_json::to_string_pretty(&self.results_json()).unwrap_or_default();
        written.push(write("results.json", results)?);
        written.push(write("report.md", self.markdown(&figure_files))?);
        Ok(written)
    }

    /// Every run, with the setup, topologies and scenarios.
    pub fn results_json(&self) -> Value {
        let scenarios: Vec<Value> = self
            .scenarios
            .iter()
            .map(|s| {
                let runs: Vec<Value> = s
                    .runs
                    .iter()
                    .map(|run| {
                        let mut doc = run.document.clone();
                        doc["topology"] = json!(run.topology);
                        doc["load"] = json!(run.load);
                        if let Some(timeline) = &run.timeline {
                            doc["timeline"] = json!(timeline);
                        }
                        if let Some(handoff) = &run.handoff {
                            doc["handoff"] = json!(handoff);
                        }
                        doc
                    })
                    .collect();
                json!({"scenario": s.scenario, "axis": s.scenario.axis(), "runs": runs})
            })
            .collect();
        json!({
            "setup": self.setup,
            "baseline": self.baseline(),
            "topologies": self.topologies,
            "scenarios": scenarios,
        })
    }

    /// `report.md`; `figures` are the stems of the figures written beside it.
    pub fn markdown(&self, figures: &[String]) -> String {
        let mut out = String::new();
        out.push_str(&self.header());
        for results in &self.scenarios {
            out.push_str(&results.markdown(self.baseline(), &self.topologies, figures));
        }
        out
    }

    fn header(&self) -> String {
        let s = &self.setup;
        let mut out = format!(
            "# tandem compare: {}\n\n{}, tandem {}, on {}{}.\n\nModel: {}.\n\nEvery topology gets the same resources: {}. The baseline for \"vs\" columns is **{}**.\n\nCommand: `{}`\n\n",
            self.topologies
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(" vs "),
            s.date,
            s.tandem_version,
            s.machine,
            s.gpus
                .as_deref()
                .map_or(String::new(), |gpus| format!("; GPUs: {gpus}")),
            s.model,
            s.resources,
            self.baseline(),
            s.command,
        );
        let timed_cores = self.topologies.iter().any(|t| !t.core_speeds.is_empty());
        out.push_str(if timed_cores {
            "| topology | layout | status | its cores before it ran |\n|---|---|---|---|\n"
        } else {
            "| topology | layout | status |\n|---|---|---|\n"
        });
        for t in &self.topologies {
            let status = t.error.as_deref().map_or("measured".to_owned(), |e| {
                format!("**not measured**: {}", one_line(e))
            });
            out.push_str(&format!("| {} | {} | {status} |", t.name, t.description));
            if timed_cores {
                out.push_str(&format!(" {} |", describe_core_speeds(&t.core_speeds)));
            }
            out.push('\n');
        }
        out.push('\n');
        out
    }

    /// The figures to draw, by file stem.
    pub fn figures(&self) -> Vec<(String, Figure)> {
        let names: Vec<&str> = self.topologies.iter().map(|t| t.name.as_str()).collect();
        self.scenarios
            .iter()
            .filter(|s| !s.runs.is_empty())
            .flat_map(|s| s.figures(&names))
            .collect()
    }
}

impl ScenarioResults {
    fn runs_of<'a>(&'a self, topology: &'a str) -> impl Iterator<Item = &'a Run> {
        self.runs.iter().filter(move |r| r.topology == topology)
    }

    fn run_at(&self, topology: &str, load: &LoadPoint) -> Option<&Run> {
        self.runs
            .iter()
            .find(|r| r.topology == topology && r.load == *load)
    }

    /// The heaviest load: where the percentile tables and figures look.
    fn heaviest(&self) -> Option<LoadPoint> {
        self.scenario.points().into_iter().last()
    }

    fn markdown(&self, baseline: &str, topologies: &[TopologyEntry], figures: &[String]) -> String {
        let s = &self.scenario;
        let mut out = format!("## {}\n\n", s.name);
        if !s.description.is_empty() {
            out.push_str(&format!("{}\n\n", s.description));
        }
        // Random prompts are exact token counts where the runs drew them in a tokenizer.
        let in_tokens = self
            .runs
            .iter()
            .any(|r| r.document["tokenizer_id"].is_string());
        let unit = if in_tokens { "token" } else { "word" };
        out.push_str(&format!("Workload: {}.\n\n", workload_line(s, unit)));
        if self.runs.is_empty() {
            out.push_str("No runs.\n\n");
            return out;
        }
        out.push_str(&self.headline_table(baseline, topologies));
        out.push_str(&self.verdict(baseline, topologies));
        out.push_str(&self.handoff_table(baseline, topologies));
        for kind in ["throughput", "goodput", "latency"] {
            let stem = format!("{}-{kind}", s.name);
            if figures.contains(&stem) {
                out.push_str(&format!("![{} {kind}]({stem}.svg)\n\n", s.name));
            }
        }
        out.push_str(&self.timelines_markdown(baseline, topologies, figures));
        out.push_str(&self.percentile_table(topologies));
        out
    }

    /// Per load with timelines: requests meeting the SLO over the whole run, with
    /// ratios to the baseline and to the best topology without a planner; the
    /// planner's moves; the timeline figure.
    fn timelines_markdown(
        &self,
        baseline: &str,
        topologies: &[TopologyEntry],
        figures: &[String],
    ) -> String {
        let mut out = String::new();
        for (index, load) in self.scenario.points().into_iter().enumerate() {
            let runs: Vec<&Run> = topologies
                .iter()
                .filter_map(|t| self.run_at(&t.name, &load))
                .filter(|r| r.timeline.is_some())
                .collect();
            if runs.is_empty() {
                continue;
            }
            let met = |run: &Run| run.timeline.as_ref().map_or(0, Timeline::met);
            let planned = |run: &Run| run.timeline.as_ref().is_some_and(|t| t.planner);
            let base = runs
                .iter()
                .find(|r| r.topology == baseline)
                .map(|r| met(r) as f64);
            let best_static = runs
                .iter()
                .filter(|r| !planned(r))
                .max_by_key(|r| met(r))
                .map(|r| (r.topology.clone(), met(r) as f64));
            let best_name = best_static.as_ref().map(|(name, _)| name.clone());
            // When the best is the baseline, its column says it already.
            let best_static = best_static.filter(|(name, _)| name != baseline);
            out.push_str(&format!(
                "Over the whole run at {}: requests meeting the SLO{}.\n\n| topology | met SLO | share | goodput (req/s) | vs {baseline} |{} layout changes |\n|---|---|---|---|---|{}---|\n",
                load.label(),
                best_name.map_or(String::new(), |name| format!(" (best layout that does not change: **{name}**)")),
                best_static.as_ref().map_or(String::new(), |(name, _)| format!(" vs {name} |")),
                if best_static.is_some() { "---|" } else { "" },
            ));
            for run in &runs {
                let total = run.timeline.as_ref().map_or(0, |t| t.requests.len());
                let versus_best = best_static.as_ref().map_or(String::new(), |(_, best)| {
                    format!(" {} |", ratio(met(run) as f64, Some(*best)))
                });
                let changes = run
                    .timeline
                    .as_ref()
                    .map_or(0, |t| t.moves.iter().filter(|m| m.moved).count());
                out.push_str(&format!(
                    "| {} | {} | {:.0}% | {} | {} |{versus_best} {changes} |\n",
                    run.topology,
                    met(run),
                    100.0 * met(run) as f64 / total.max(1) as f64,
                    run.summary
                        .request_goodput
                        .map_or("–".into(), |g| format!("{g:.2}")),
                    ratio(met(run) as f64, base),
                ));
            }
            out.push('\n');
            for run in runs.iter().filter(|r| planned(r)) {
                for m in run.timeline.iter().flat_map(|t| &t.moves) {
                    let outcome = if m.moved { "" } else { " (given up)" };
                    out.push_str(&format!(
                        "- {} at {:.0} s: {}{outcome} ({})\n",
                        run.topology, m.at, m.detail, m.worker
                    ));
                }
            }
            let stem = self.timeline_stem(index);
            if figures.contains(&stem) {
                out.push_str(&format!(
                    "\n![{} timeline]({stem}.svg)\n\n",
                    self.scenario.name
                ));
            }
        }
        out
    }

    fn timeline_stem(&self, load_index: usize) -> String {
        if self.scenario.points().len() > 1 {
            format!("{}-timeline-{}", self.scenario.name, load_index + 1)
        } else {
            format!("{}-timeline", self.scenario.name)
        }
    }

    /// One timeline figure per load whose runs have timelines.
    fn timeline_figures(&self, topologies: &[&str]) -> Vec<(String, Figure)> {
        let mut figures = Vec::new();
        for (index, load) in self.scenario.points().into_iter().enumerate() {
            let runs: Vec<(&str, &Timeline)> = topologies
                .iter()
                .filter_map(|t| Some((*t, self.run_at(t, &load)?.timeline.as_ref()?)))
                .collect();
            if runs.is_empty() {
                continue;
            }
            let title = format!("{} at {}: over time", self.scenario.name, load.label());
            figures.push((self.timeline_stem(index), timeline::figure(&title, &runs)));
        }
        figures
    }

    /// One row per load and topology: counts, throughput and latency, with ratios to the
    /// baseline at the same load.
    fn headline_table(&self, baseline: &str, topologies: &[TopologyEntry]) -> String {
        let mut out = format!(
            "| load | topology | ok | failed | req/s | output tok/s | vs {baseline} | mean E2EL (s) | vs {baseline} | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) | goodput (req/s) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        );
        for load in self.scenario.points() {
            let base = self.run_at(baseline, &load).map(|r| &r.summary);
            for topology in topologies {
                let Some(run) = self.run_at(&topology.name, &load) else {
                    continue;
                };
                let s = &run.summary;
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {:.2} | {:.1} | {} | {:.2} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {} |\n",
                    load.label(),
                    topology.name,
                    s.completed,
                    s.failed,
                    s.request_throughput,
                    s.output_throughput,
                    ratio(s.output_throughput, base.map(|b| b.output_throughput)),
                    s.e2el.mean / 1e3,
                    ratio(s.e2el.mean, base.map(|b| b.e2el.mean)),
                    s.ttft.median,
                    pct(&s.ttft, 99.0),
                    s.tpot.median,
                    pct(&s.tpot, 99.0),
                    s.request_goodput.map_or("–".into(), |g| format!("{g:.2}")),
                ));
            }
        }
        out.push('\n');
        out
    }

    /// The hand-off of every run that had one: KV moved per request, the pulls' time
    /// and rate (as the pulling workers count them), and what it added to the time to
    /// first token over the baseline at the same load.
    fn handoff_table(&self, baseline: &str, topologies: &[TopologyEntry]) -> String {
        let moved = |run: &Run| run.handoff.filter(|h| h.transfers > 0);
        if !self.runs.iter().any(|r| moved(r).is_some()) {
            return String::new();
        }
        let mut out = format!(
            "KV hand-off (the pulling workers' own counters):\n\n| load | topology | transfers | MB per request | ms per transfer (mean) | GB/s while transferring | TTFT p50 − {baseline} (ms) |\n|---|---|---|---|---|---|---|\n"
        );
        for load in self.scenario.points() {
            let base = self.run_at(baseline, &load).map(|r| r.summary.ttft.median);
            for topology in topologies {
                let Some(run) = self.run_at(&topology.name, &load) else {
                    continue;
                };
                let Some(handoff) = moved(run) else {
                    continue;
                };
                let requests = run.summary.completed.max(1) as f64;
                let optional = |value: Option<f64>, digits: usize| {
                    value.map_or("–".into(), |v| format!("{v:.digits$}"))
                };
                out.push_str(&format!(
                    "| {} | {} | {} | {:.2} | {} | {} | {} |\n",
                    load.label(),
                    topology.name,
                    handoff.transfers,
                    handoff.bytes as f64 / requests / 1e6,
                    optional(handoff.mean_transfer_seconds().map(|s| s * 1e3), 2),
                    optional(handoff.bytes_per_second().map(|b| b / 1e9), 2),
                    optional(base.map(|b| run.summary.ttft.median - b), 0),
                ));
            }
        }
        out.push('\n');
        out
    }

    /// Which topology did best at the heaviest load, on throughput and tail latency.
    fn verdict(&self, baseline: &str, topologies: &[TopologyEntry]) -> String {
        let Some(load) = self.heaviest() else {
            return String::new();
        };
        let runs: Vec<&Run> = topologies
            .iter()
            .filter_map(|t| self.run_at(&t.name, &load))
            .filter(|r| r.summary.completed > 0)
            .collect();
        if runs.len() < 2 {
            return String::new();
        }
        let base = self.run_at(baseline, &load).map(|r| &r.summary);
        let best = |key: &dyn Fn(&Summary) -> f64, higher: bool| {
            runs.iter()
                .copied()
                .max_by(|a, b| {
                    let (x, y) = (key(&a.summary), key(&b.summary));
                    if higher {
                        x.total_cmp(&y)
                    } else {
                        y.total_cmp(&x)
                    }
                })
                .map(|r| {
                    if r.topology == baseline {
                        return format!("**{baseline}**");
                    }
                    let versus = ratio(key(&r.summary), base.map(key));
                    format!("**{}** ({versus} {baseline})", r.topology)
                })
                .unwrap_or_default()
        };
        format!(
            "At {}: most output tok/s: {}; lowest p99 TTFT: {}; lowest p99 TPOT: {}.\n\n",
            load.label(),
            best(&|s| s.output_throughput, true),
            best(&|s| pct(&s.ttft, 99.0), false),
            best(&|s| pct(&s.tpot, 99.0), false),
        )
    }

    /// Every percentile of every latency metric at the heaviest load.
    fn percentile_table(&self, topologies: &[TopologyEntry]) -> String {
        let Some(load) = self.heaviest() else {
            return String::new();
        };
        let Some(first) = topologies.iter().find_map(|t| self.run_at(&t.name, &load)) else {
            return String::new();
        };
        let ps: Vec<f64> = first
            .summary
            .ttft
            .percentiles
            .iter()
            .map(|(p, _)| *p)
            .collect();
        // The median is its own column only when p50 is not among the percentiles.
        let with_median = !ps.contains(&50.0);
        let mut header = vec!["mean".to_owned()];
        if with_median {
            header.push("median".into());
        }
        header.extend(ps.iter().map(|p| format!("p{p}")));
        let mut out = format!(
            "Percentiles at {} (ms):\n\n| topology | metric | {} |\n|---|---|{}\n",
            load.label(),
            header.join(" | "),
            "---|".repeat(header.len())
        );
        for topology in topologies {
            let Some(run) = self.run_at(&topology.name, &load) else {
                continue;
            };
            let s = &run.summary;
            for (metric, d) in [
                ("TTFT", &s.ttft),
                ("TPOT", &s.tpot),
                ("ITL", &s.itl),
                ("E2EL", &s.e2el),
            ] {
                let mut values = vec![d.mean];
                if with_median {
                    values.push(d.median);
                }
                values.extend(d.percentiles.iter().map(|(_, v)| *v));
                let cells: Vec<String> = values.iter().map(|v| format!("{v:.1}")).collect();
                out.push_str(&format!(
                    "| {} | {metric} | {} |\n",
                    topology.name,
                    cells.join(" | ")
                ));
            }
        }
        out.push('\n');
        out
    }

    /// Throughput and goodput against load (sweeps), and latency percentiles.
    fn figures(&self, topologies: &[&str]) -> Vec<(String, Figure)> {
        let name = &self.scenario.name;
        let mut figures = Vec::new();
        let per_topology =
            |value: &dyn Fn(&Run) -> Option<(f64, f64)>| self.series(topologies, value);
        if let Some(axis) = self.scenario.axis() {
            let x = axis.title().to_owned();
            figures.push((
                format!("{name}-throughput"),
                Figure {
                    title: format!("{name}: throughput"),
                    columns: 2,
                    panels: vec![
                        Panel {
                            title: "output tokens per second".into(),
                            x_label: x.clone(),
                            y_label: "tok/s".into(),
                            series: per_topology(&|r| {
                                Some((r.load.value(), r.summary.output_throughput))
                            }),
                        },
                        Panel {
                            title: "requests per second".into(),
                            x_label: x.clone(),
                            y_label: "req/s".into(),
                            series: per_topology(&|r| {
                                Some((r.load.value(), r.summary.request_throughput))
                            }),
                        },
                    ],
                },
            ));
            if !self.scenario.goodput.is_empty() {
                figures.push((
                    format!("{name}-goodput"),
                    Figure {
                        title: format!("{name}: goodput ({})", self.scenario.goodput.join(", ")),
                        columns: 1,
                        panels: vec![Panel {
                            title: "requests per second meeting every SLO".into(),
                            x_label: x.clone(),
                            y_label: "goodput (req/s)".into(),
                            series: per_topology(&|r| {
                                r.summary.request_goodput.map(|g| (r.load.value(), g))
                            }),
                        }],
                    },
                ));
            }
        }
        figures.push((format!("{name}-latency"), self.latency_figure(topologies)));
        figures.extend(self.timeline_figures(topologies));
        figures
    }

    /// One line per topology: `value` of each of its runs that has one.
    fn series(
        &self,
        topologies: &[&str],
        value: &dyn Fn(&Run) -> Option<(f64, f64)>,
    ) -> Vec<Series> {
        topologies
            .iter()
            .map(|t| Series {
                name: (*t).to_owned(),
                points: self.runs_of(t).filter_map(value).collect(),
            })
            .collect()
    }

    fn latency_figure(&self, topologies: &[&str]) -> Figure {
        let heaviest = self.heaviest();
        let at_heaviest = |metric: fn(&Summary) -> &Distribution| -> Vec<Series> {
            topologies
                .iter()
                .map(|t| Series {
                    name: (*t).to_owned(),
                    points: heaviest
                        .and_then(|load| self.run_at(t, &load))
                        .map(|r| metric(&r.summary).percentiles.clone())
                        .unwrap_or_default(),
                })
                .collect()
        };
        let label = heaviest.map_or(String::new(), |l| l.label());
        let mut panels = vec![
            Panel {
                title: format!("TTFT percentiles at {label}"),
                x_label: "percentile".into(),
                y_label: "ms".into(),
                series: at_heaviest(|s| &s.ttft),
            },
            Panel {
                title: format!("TPOT percentiles at {label}"),
                x_label: "percentile".into(),
                y_label: "ms".into(),
                series: at_heaviest(|s| &s.tpot),
            },
        ];
        if let Some(axis) = self.scenario.axis() {
            let p99_vs_load = |metric: fn(&Summary) -> &Distribution| {
                self.series(topologies, &|r| {
                    Some((r.load.value(), pct(metric(&r.summary), 99.0)))
                })
            };
            panels.push(Panel {
                title: "p99 TTFT".into(),
                x_label: axis.title().into(),
                y_label: "ms".into(),
                series: p99_vs_load(|s| &s.ttft),
            });
            panels.push(Panel {
                title: "p99 TPOT".into(),
                x_label: axis.title().into(),
                y_label: "ms".into(),
                series: p99_vs_load(|s| &s.tpot),
            });
        }
        Figure {
            title: format!("{}: latency", self.scenario.name),
            columns: 2,
            panels,
        }
    }
}

/// The `p`th percentile if it was computed, else the median or 0.
fn pct(d: &Distribution, p: f64) -> f64 {
    d.percentiles
        .iter()
        .find(|(q, _)| *q == p)
        .map_or(d.median, |(_, v)| *v)
}

/// `value / base` as "1.23×", or "–" without a usable base.
fn ratio(value: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 && value.is_finite() => format!("{:.2}×", value / b),
        _ => "–".into(),
    }
}

fn one_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().replace('|', "/")
}

/// The scenario in a line; prompt lengths in `unit`s (`word` or `token`).
fn workload_line(s: &Scenario, unit: &str) -> String {
    use crate::suite::WorkloadKind::*;
    let what = match s.workload {
        SeedSingle | SeedBatch => format!(
            "{} ({} prompts × {}), {} tokens out",
            s.workload.name(),
            if s.workload == SeedSingle { 1 } else { 8 },
            s.repeat,
            s.output_len
        ),
        Random => format!(
            "random, {} prompts of {} {unit}s, {} tokens out",
            s.num_prompts, s.input_len, s.output_len
        ),
        SharedPrefix => format!(
            "{} prompts of a shared {}-{unit} prefix and {} {unit}s of their own, {} tokens out",
            s.num_prompts, s.prefix_len, s.input_len, s.output_len
        ),
        MultiTurn => format!(
            "{} conversations of {} turns behind a shared {}-{unit} prefix, {} new {unit}s and {} tokens out per turn",
            s.num_prompts, s.turns, s.prefix_len, s.input_len, s.output_len
        ),
        Sharegpt => format!("{} ShareGPT conversations' first turns", s.num_prompts),
        Shift => format!(
            "{} random prompts shifting halfway from {} {unit}s / {} tokens out to {} / {}",
            s.num_prompts,
            s.input_len,
            s.output_len,
            s.shift_input_len.unwrap_or(s.input_len),
            s.shift_output_len.unwrap_or(s.output_len)
        ),
    };
    let loads: Vec<String> = s.points().iter().map(LoadPoint::label).collect();
    let slo = if s.goodput.is_empty() {
        String::new()
    } else {
        format!("; goodput SLO {}", s.goodput.join(", "))
    };
    format!("{what}; loads: {}{slo}", loads.join(", "))
}
