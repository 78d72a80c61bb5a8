//! The scenarios a comparison runs, each a workload and the loads to run it at — from a
//! TOML file (`[[scenario]]` tables) or the built-in default suite — and the
//! conversion of a scenario into the conversations to send.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::client::Prompt;
use crate::stats::Slo;
use crate::tokens::{self, PromptTokenizer, RandomTokens, TokensError};
use crate::workload::{self, Conversation, DatasetError};

/// A scenario file problem.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}: {source}")]
    Parse {
        origin: String,
        source: Box<toml::de::Error>,
    },
    #[error("scenario {scenario:?}: {problem}")]
    Invalid { scenario: String, problem: String },
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Tokens(#[from] TokensError),
}

/// Scenarios, run in order.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    #[serde(rename = "scenario", default)]
    pub scenarios: Vec<Scenario>,
}

/// What a scenario sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// The seed's one request ("Explain how HTTP load balancers work…").
    SeedSingle,
    /// The seed's 8 prompts.
    SeedBatch,
    /// Random prompts of `input_len` words.
    Random,
    /// Random prompts behind a common `prefix_len`-word prefix.
    SharedPrefix,
    /// `num_prompts` conversations of `turns` turns behind a common prefix.
    MultiTurn,
    /// First turns of a ShareGPT-format file.
    Sharegpt,
    /// Random prompts whose lengths change halfway: the first half of `num_prompts`
    /// with `input_len`/`output_len`, the second with `shift_input_len`/
    /// `shift_output_len`, on one arrival schedule (what the online planner is for).
    Shift,
}

impl WorkloadKind {
    pub const ALL: [WorkloadKind; 7] = [
        WorkloadKind::SeedSingle,
        WorkloadKind::SeedBatch,
        WorkloadKind::Random,
        WorkloadKind::SharedPrefix,
        WorkloadKind::MultiTurn,
        WorkloadKind::Sharegpt,
        WorkloadKind::Shift,
    ];

    /// Its name in files and flags.
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::SeedSingle => "seed-single",
            WorkloadKind::SeedBatch => "seed-batch",
            WorkloadKind::Random => "random",
            WorkloadKind::SharedPrefix => "shared-prefix",
            WorkloadKind::MultiTurn => "multi-turn",
            WorkloadKind::Sharegpt => "sharegpt",
            WorkloadKind::Shift => "shift",
        }
    }
}

/// One workload and the loads it runs at.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// What it shows, for the report.
    #[serde(default)]
    pub description: String,
    pub workload: WorkloadKind,
    /// Prompts (conversations for multi-turn); the seed workloads have their own.
    #[serde(default = "defaults::num_prompts")]
    pub num_prompts: usize,
    /// The seed workloads' prompts are sent this many times over.
    #[serde(default = "defaults::one")]
    pub repeat: usize,
    #[serde(default = "defaults::input_len")]
    pub input_len: usize,
    #[serde(default = "defaults::output_len")]
    pub output_len: usize,
    #[serde(default)]
    pub range_ratio: f64,
    #[serde(default = "defaults::prefix_len")]
    pub prefix_len: usize,
    /// Distinct prefixes of the shared-prefix workload, taken in turn.
    #[serde(default = "defaults::one")]
    pub prefix_groups: usize,
    #[serde(default = "defaults::turns")]
    pub turns: usize,
    pub dataset_path: Option<PathBuf>,
    /// The shift workload's second half: prompt length…
    pub shift_input_len: Option<usize>,
    /// …and output tokens.
    pub shift_output_len: Option<usize>,
    /// Concurrency limits to run at, one run each.
    #[serde(default)]
    pub concurrency: Vec<usize>,
    /// Request rates (conversations per second) to run at, one run each.
    #[serde(default)]
    pub rates: Vec<f64>,
    #[serde(default = "defaults::one_f64")]
    pub burstiness: f64,
    /// Goodput SLOs in ms, as `tandem bench --goodput`: `["ttft:500", "tpot:50"]`.
    #[serde(default)]
    pub goodput: Vec<String>,
    /// Generate exactly `output_len` tokens (default: yes for random workloads).
    pub ignore_eos: Option<bool>,
    #[serde(default)]
    pub seed: u64,
}

mod defaults {
    pub fn num_prompts() -> usize {
        32
    }
    pub fn one() -> usize {
        1
    }
    pub fn one_f64() -> f64 {
        1.0
    }
    pub fn input_len() -> usize {
        512
    }
    pub fn output_len() -> usize {
        100
    }
    pub fn prefix_len() -> usize {
        256
    }
    pub fn turns() -> usize {
        3
    }
}

/// One run's load: a request rate, a concurrency limit, or neither (all at once).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LoadPoint {
    pub request_rate: Option<f64>,
    pub max_concurrency: Option<usize>,
}

impl LoadPoint {
    /// The point's value on its sweep axis.
    pub fn value(&self) -> f64 {
        self.request_rate
            .or(self.max_concurrency.map(|c| c as f64))
            .unwrap_or(f64::INFINITY)
    }

    pub fn label(&self) -> String {
        match (self.request_rate, self.max_concurrency) {
            (Some(rate), _) => format!("{rate} req/s"),
            (None, Some(c)) => format!("concurrency {c}"),
            (None, None) => "all at once".into(),
        }
    }
}

/// What a scenario's loads vary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Axis {
    Concurrency,
    RequestRate,
}

impl Axis {
    pub fn title(self) -> &'static str {
        match self {
            Axis::Concurrency => "concurrency",
            Axis::RequestRate => "request rate (req/s)",
        }
    }
}

impl Suite {
    pub fn load(path: &Path) -> Result<Suite, SuiteError> {
        let text = std::fs::read_to_string(path).map_err(|source| SuiteError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Suite, SuiteError> {
        let suite: Suite = toml::from_str(text).map_err(|source| SuiteError::Parse {
            origin: origin.to_owned(),
            source: Box::new(source),
        })?;
        if suite.scenarios.is_empty() {
            return Err(SuiteError::Invalid {
                scenario: origin.to_owned(),
                problem: "no [[scenario]]".into(),
            });
        }
        for scenario in &suite.scenarios {
            scenario.check()?;
        }
        Ok(suite)
    }

    /// The default comparison on the built-in engine: the seed's two tests, a load that
    /// favours disaggregation (long prompts, short outputs, many users), one that
    /// should not (short prompts, long outputs, few users), and multi-turn chat.
    pub fn default_suite() -> Suite {
        Self::parse(DEFAULT_SUITE, "the default suite").expect("the default suite is valid")
    }
}

const DEFAULT_SUITE: &str = r#"
[[scenario]]
name = "seed-single"
description = "The seed's single-request test: one request of 100 tokens at a time, 5 times."
workload = "seed-single"
repeat = 5
concurrency = [1]
output_len = 100

[[scenario]]
name = "seed-batch"
description = "The seed's batch test: its 8 prompts at once, 100 tokens each."
workload = "seed-batch"
output_len = 100

[[scenario]]
name = "long-prompt-short-output"
description = "Many users with long prompts and short answers, at rising request rates: prefill dominates, and in the single and replicated layouts every prefill chunk stalls the decodes sharing its worker."
workload = "random"
num_prompts = 20
input_len = 512
output_len = 32
rates = [0.5, 1, 1.5, 2]
goodput = ["ttft:2000", "tpot:100"]

[[scenario]]
name = "short-prompt-long-output"
description = "Few users with short prompts and long answers: decode dominates, so a prefill worker sits idle while it holds half the cores."
workload = "random"
num_prompts = 8
input_len = 32
output_len = 128
concurrency = [1, 2, 4]
goodput = ["ttft:1000", "tpot:100"]

[[scenario]]
name = "multi-turn"
description = "Chat sessions of 3 turns behind a shared 256-word system prompt: each turn's prompt is mostly the KV of the turns before it."
workload = "multi-turn"
num_prompts = 8
turns = 3
prefix_len = 256
input_len = 48
output_len = 48
concurrency = [2, 8]
"#;

impl Scenario {
    /// Whether its values can be run (`Suite::parse` checks every scenario).
    pub fn check(&self) -> Result<(), SuiteError> {
        let invalid = |problem: &str| SuiteError::Invalid {
            scenario: self.name.clone(),
            problem: problem.to_owned(),
        };
        if !self.concurrency.is_empty() && !self.rates.is_empty() {
            return Err(invalid("give `concurrency` or `rates`, not both"));
        }
        if self.concurrency.contains(&0) {
            return Err(invalid("a concurrency of 0"));
        }
        if self.rates.iter().any(|r| !r.is_finite() || *r <= 0.0) {
            return Err(invalid("rates must be positive"));
        }
        if !(0.0..1.0).contains(&self.range_ratio) {
            return Err(invalid("range_ratio must be in [0, 1)"));
        }
        if self.burstiness <= 0.0 {
            return Err(invalid("burstiness must be positive"));
        }
        if self.num_prompts == 0 || self.repeat == 0 || self.turns == 0 || self.output_len == 0 {
            return Err(invalid(
                "num_prompts, repeat, turns and output_len must be positive",
            ));
        }
        if self.workload == WorkloadKind::Sharegpt && self.dataset_path.is_none() {
            return Err(invalid("the sharegpt workload needs dataset_path"));
        }
        if self.workload == WorkloadKind::Shift {
            match (self.shift_input_len, self.shift_output_len) {
                (Some(_), Some(0)) => return Err(invalid("shift_output_len must be positive")),
                (Some(_), Some(_)) => {}
                _ => {
                    return Err(invalid(
                        "the shift workload needs shift_input_len and shift_output_len",
                    ));
                }
            }
        }
        self.slo()?;
        Ok(())
    }

    /// The goodput SLOs, if any.
    pub fn slo(&self) -> Result<Option<Slo>, SuiteError> {
        if self.goodput.is_empty() {
            return Ok(None);
        }
        Slo::parse(&self.goodput)
            .map(Some)
            .map_err(|e| SuiteError::Invalid {
                scenario: self.name.clone(),
                problem: e.to_string(),
            })
    }

    /// The loads to run at, in order (`check` allows rates or concurrencies, not both).
    pub fn points(&self) -> Vec<LoadPoint> {
        let rates = self.rates.iter().map(|&r| LoadPoint {
            request_rate: Some(r),
            max_concurrency: None,
        });
        let concurrencies = self.concurrency.iter().map(|&c| LoadPoint {
            request_rate: None,
            max_concurrency: Some(c),
        });
        let points: Vec<LoadPoint> = rates.chain(concurrencies).collect();
        if points.is_empty() {
            return vec![LoadPoint {
                request_rate: None,
                max_concurrency: None,
            }];
        }
        points
    }

    /// The sweep axis, for scenarios with more than one load.
    pub fn axis(&self) -> Option<Axis> {
        if self.rates.len() > 1 {
            Some(Axis::RequestRate)
        } else if self.concurrency.len() > 1 {
            Some(Axis::Concurrency)
        } else {
            None
        }
    }

    /// Whether requests ask for exactly `output_len` tokens.
    pub fn ignores_eos(&self) -> bool {
        self.ignore_eos.unwrap_or(self.is_random())
    }

    /// Whether its prompts are random (and so can be drawn in tokens).
    pub fn is_random(&self) -> bool {
        matches!(
            self.workload,
            WorkloadKind::Random
                | WorkloadKind::SharedPrefix
                | WorkloadKind::MultiTurn
                | WorkloadKind::Shift
        )
    }

    /// What to send, with random prompts drawn in `tokenizer`'s tokens when there is
    /// one ([`tokens`]: exact lengths, as `vllm bench serve --dataset-name random`
    /// draws them); else as [`Self::conversations`]. Also the prompt tokens by which
    /// the drawn prompts miss their lengths (0 unless a tokenizer's round trips did
    /// not settle).
    pub async fn conversations_in(
        &self,
        tokenizer: Option<&PromptTokenizer>,
    ) -> Result<(Vec<Conversation>, i64), SuiteError> {
        let Some(tokenizer) = tokenizer.filter(|_| self.is_random()) else {
            return Ok((self.conversations()?, 0));
        };
        let lengths = |input_len, output_len, range_ratio, prefix_len| RandomTokens {
            input_len,
            output_len,
            range_ratio,
            prefix_len,
            prefix_groups: self.prefix_groups,
        };
        let (input, output, ratio) = (self.input_len, self.output_len, self.range_ratio);
        let n = self.num_prompts;
        let parts = match self.workload {
            WorkloadKind::SharedPrefix => vec![(lengths(input, output, ratio, self.prefix_len), n)],
            WorkloadKind::MultiTurn => vec![
                (
                    RandomTokens {
                        prefix_groups: 1,
                        ..lengths(input, output, 0.0, self.prefix_len)
                    },
                    n,
                ),
                (
                    lengths(input, output, 0.0, 0),
                    n * self.turns.saturating_sub(1),
                ),
            ],
            WorkloadKind::Shift => {
                let first = n / 2;
                let second = lengths(
                    self.shift_input_len.unwrap_or(input),
                    self.shift_output_len.unwrap_or(output),
                    ratio,
                    0,
                );
                vec![
                    (lengths(input, output, ratio, 0), first),
                    (second, n - first),
                ]
            }
            _ => vec![(lengths(input, output, ratio, 0), n)],
        };
        let drawn = tokens::random_parts(tokenizer, &parts, self.seed).await?;
        let mut prompts = drawn.prompts.into_iter();
        let conversations = if self.workload == WorkloadKind::MultiTurn {
            let firsts: Vec<Prompt> = prompts.by_ref().take(n).collect();
            firsts
                .into_iter()
                .map(|first| {
                    let mut turns = vec![first];
                    turns.extend(prompts.by_ref().take(self.turns.saturating_sub(1)));
                    Conversation { turns }
                })
                .collect()
        } else {
            prompts.map(|p| Conversation { turns: vec![p] }).collect()
        };
        Ok((conversations, drawn.token_mismatch))
    }

    /// What to send.
    pub fn conversations(&self) -> Result<Vec<Conversation>, SuiteError> {
        let single = |prompts: Vec<crate::client::Prompt>| {
            prompts
                .into_iter()
                .map(|p| Conversation { turns: vec![p] })
                .collect::<Vec<_>>()
        };
        let repeated = |prompts: Vec<crate::client::Prompt>| {
            let n = prompts.len() * self.repeat;
            single(prompts.into_iter().cycle().take(n).collect())
        };
        Ok(match self.workload {
            WorkloadKind::SeedSingle => repeated(workload::seed_single(self.output_len)),
            WorkloadKind::SeedBatch => repeated(workload::seed_batch(self.output_len)),
            WorkloadKind::Random => single(workload::random(
                self.num_prompts,
                self.input_len,
                self.output_len,
                self.range_ratio,
                self.seed,
            )),
            WorkloadKind::SharedPrefix => single(workload::shared_prefix(
                self.num_prompts,
                self.prefix_groups,
                self.prefix_len,
                self.input_len,
                self.output_len,
                self.seed,
            )),
            WorkloadKind::MultiTurn => workload::multi_turn(
                self.num_prompts,
                self.turns,
                self.prefix_len,
                self.input_len,
                self.output_len,
                self.seed,
            ),
            WorkloadKind::Shift => {
                let second = (
                    self.shift_input_len.unwrap_or(self.input_len),
                    self.shift_output_len.unwrap_or(self.output_len),
                );
                single(workload::shifted(
                    self.num_prompts,
                    (self.input_len, self.output_len),
                    second,
                    self.range_ratio,
                    self.seed,
                ))
            }
            WorkloadKind::Sharegpt => {
                let Some(path) = self.dataset_path.as_deref() else {
                    return Err(SuiteError::Invalid {
                        scenario: self.name.clone(),
                        problem: "the sharegpt workload needs dataset_path".into(),
                    });
                };
                single(workload::sharegpt(path, self.num_prompts)?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_suite_has_the_issues_scenarios() {
        let suite = Suite::default_suite();
        let names: Vec<&str> = suite.scenarios.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "seed-single",
                "seed-batch",
                "long-prompt-short-output",
                "short-prompt-long-output",
                "multi-turn"
            ]
        );
        let single = &suite.scenarios[0];
        assert_eq!(single.conversations().unwrap().len(), 5);
        assert_eq!(single.points()[0].max_concurrency, Some(1));
        assert_eq!(suite.scenarios[1].conversations().unwrap().len(), 8);
        assert_eq!(suite.scenarios[2].axis(), Some(Axis::RequestRate));
        assert!(suite.scenarios[2].slo().unwrap().is_some());
        let multi = suite.scenarios[4].conversations().unwrap();
        assert_eq!((multi.len(), multi[0].turns.len()), (8, 3));
    }

    #[test]
    fn workload_names_are_their_file_names() {
        for kind in WorkloadKind::ALL {
            let parsed: WorkloadKind =
                serde_json::from_value(serde_json::Value::String(kind.name().into())).unwrap();
            assert_eq!(parsed, kind);
        }
    }

    #[test]
    fn bad_scenarios_are_named_and_explained() {
        let error = |text: &str| Suite::parse(text, "s.toml").unwrap_err().to_string();
        let both =
            "[[scenario]]\nname = \"x\"\nworkload = \"random\"\nrates = [1]\nconcurrency = [2]\n";
        assert!(error(both).contains("scenario \"x\": give `concurrency` or `rates`"));
        let unknown = "[[scenario]]\nname = \"x\"\nworkload = \"random\"\nspeed = 3\n";
        assert!(
            error(unknown).contains("unknown field `speed`"),
            "{}",
            error(unknown)
        );
        let kind = "[[scenario]]\nname = \"x\"\nworkload = \"fast\"\n";
        assert!(error(kind).contains("s.toml"));
        let slo = "[[scenario]]\nname = \"x\"\nworkload = \"random\"\ngoodput = [\"ttft\"]\n";
        assert!(error(slo).contains("scenario \"x\""));
        assert!(error("").contains("no [[scenario]]"));
    }
}
