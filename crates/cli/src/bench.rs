//! `tandem bench --url URL`: a workload against an OpenAI-compatible endpoint, with
//! `vllm bench serve`'s metric definitions; a table, and `--json FILE`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use tandem_bench::client::{Api, Sampling, Target};
use tandem_bench::report::{self, RunInfo};
use tandem_bench::stats::{self, Slo};
use tandem_bench::suite::{Scenario, WorkloadKind};
use tandem_bench::tokens::{self, PromptSource, PromptTokenizer};
use tandem_bench::{Progress, Traffic};

#[derive(Args)]
pub struct BenchArgs {
    /// The endpoint's base URL (a tandem router or worker, vLLM, …).
    #[arg(long)]
    url: String,
    /// The `model` field to send (default: none; single-model servers accept that).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, value_enum, default_value_t = Endpoint::Completions)]
    endpoint: Endpoint,
    /// seed-single: the seed's one request; seed-batch: its 8 concurrent requests;
    /// random: --num-prompts prompts of --input-len/--output-len tokens; shared-prefix:
    /// the same, behind a common --prefix-len prefix; multi-turn: --num-prompts
    /// conversations of --turns turns behind a common prefix, each turn sent with the
    /// transcript so far; sharegpt: --dataset-path; shift: random prompts whose
    /// lengths change halfway to --shift-input-len/--shift-output-len.
    #[arg(long, value_parser = parse_workload, default_value = "seed-batch")]
    workload: WorkloadKind,
    /// Prompts (conversations for multi-turn).
    #[arg(long, default_value_t = 100)]
    num_prompts: usize,
    /// Turns per conversation (multi-turn workload).
    #[arg(long, default_value_t = 3)]
    turns: usize,
    /// Tokens (words without a tokenizer) shared by every prompt (shared-prefix and
    /// multi-turn workloads).
    #[arg(long, default_value_t = 256)]
    prefix_len: usize,
    /// Distinct prefixes, taken in turn by the prompts (shared-prefix workload).
    #[arg(long, default_value_t = 1)]
    prefix_groups: usize,
    /// A ShareGPT-format JSON file (sharegpt workload).
    #[arg(long)]
    dataset_path: Option<PathBuf>,
    /// Runs the workload once per request rate (e.g. `1,2,4,8`).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["request_rate", "sweep_concurrency"])]
    sweep_rates: Vec<f64>,
    /// Runs the workload once per concurrency limit (e.g. `1,8,32`).
    #[arg(long, value_delimiter = ',', conflicts_with = "max_concurrency")]
    sweep_concurrency: Vec<usize>,
    /// Prompt length in tokens (random workloads): exact when prompts are drawn in a
    /// tokenizer's tokens (--tokenizer, or the server's /tokenize), else words.
    #[arg(long, default_value_t = 512)]
    input_len: usize,
    /// The tokenizer random prompts are drawn in, as vllm bench serve draws them: a
    /// tokenizer.json file, a model folder holding one, or a GGUF file. Default: the
    /// server's /tokenize and /detokenize (vLLM and tandem have them); without those,
    /// random words.
    #[arg(long, value_name = "PATH")]
    tokenizer: Option<PathBuf>,
    /// Output tokens per request (the seed tests use 100).
    #[arg(long, default_value_t = 100)]
    output_len: usize,
    /// The shift workload's second half: prompt length (the first half uses
    /// --input-len).
    #[arg(long)]
    shift_input_len: Option<usize>,
    /// The shift workload's second half: output tokens (the first half uses
    /// --output-len).
    #[arg(long)]
    shift_output_len: Option<usize>,
    /// Lengths vary uniformly within ±ratio (random workload).
    #[arg(long, default_value_t = 0.0)]
    range_ratio: f64,
    /// Requests per second (Poisson, or gamma with --burstiness); default (or `inf`):
    /// all at once.
    #[arg(long)]
    request_rate: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    burstiness: f64,
    /// Most requests in flight.
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// SLOs for goodput, in ms: `--goodput ttft:500 tpot:50` (keys ttft, tpot, e2el).
    #[arg(long, num_args = 1..)]
    goodput: Vec<String>,
    /// Percentiles to report.
    #[arg(long, value_delimiter = ',', default_value = "50,90,95,99")]
    percentiles: Vec<f64>,
    /// Keep generating until max tokens (default for random, shared-prefix, multi-turn).
    #[arg(long)]
    ignore_eos: bool,
    /// Sampling temperature to send (default: the server's).
    #[arg(long)]
    temperature: Option<f64>,
    /// Nucleus sampling's top_p to send (default: the server's).
    #[arg(long)]
    top_p: Option<f64>,
    /// top_k to send (default: the server's; -1 or 0, as the server reads it, for no
    /// limit).
    #[arg(long, allow_negative_numbers = true)]
    top_k: Option<i64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seconds one request may take.
    #[arg(long, default_value_t = 600)]
    request_timeout: u64,
    /// Writes the results as JSON (vllm bench serve's key names).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Adds per-request arrays to the JSON.
    #[arg(long)]
    save_detailed: bool,
    /// Writes the results as a markdown table.
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Endpoint {
    Completions,
    Chat,
}

fn parse_workload(name: &str) -> Result<WorkloadKind, String> {
    WorkloadKind::ALL
        .into_iter()
        .find(|kind| kind.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = WorkloadKind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown workload `{name}`; one of {}", names.join(", "))
        })
}

/// Refuses flag values that cannot be run, naming the flag.
fn check_flags(args: &BenchArgs) -> Result<()> {
    let positive_rate = |r: &f64| *r > 0.0 && !r.is_nan();
    if args.percentiles.iter().any(|p| !(0.0..=100.0).contains(p)) {
        bail!("--percentiles must be between 0 and 100");
    }
    if !(0.0..1.0).contains(&args.range_ratio) {
        bail!("--range-ratio must be in [0, 1)");
    }
    if !(args.burstiness > 0.0 && args.burstiness.is_finite()) {
        bail!("--burstiness must be positive");
    }
    if let Some(rate) = args.request_rate.filter(|r| !positive_rate(r)) {
        bail!(
            "--request-rate {rate}: must be a positive number of requests per second \
             (leave it out, or give inf, to send every request at once)"
        );
    }
    if let Some(rate) = args.sweep_rates.iter().find(|r| !positive_rate(r)) {
        bail!("--sweep-rates: {rate} is not a positive number of requests per second");
    }
    if args.sweep_concurrency.contains(&0) {
        bail!("--sweep-concurrency: a concurrency of 0 sends nothing; give 1 or more");
    }
    if args.max_concurrency == Some(0) {
        bail!("--max-concurrency 0 sends nothing; give 1 or more, or leave it out");
    }
    for (flag, value) in [
        ("--num-prompts", args.num_prompts),
        ("--turns", args.turns),
        ("--output-len", args.output_len),
    ] {
        if value == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    if args.workload == WorkloadKind::Shift
        && (args.shift_input_len.is_none() || args.shift_output_len.is_none())
    {
        bail!("--workload shift needs --shift-input-len and --shift-output-len (the second half)");
    }
    if args.shift_output_len == Some(0) {
        bail!("--shift-output-len must be at least 1");
    }
    if args.workload == WorkloadKind::Sharegpt && args.dataset_path.is_none() {
        bail!(
            "--workload sharegpt needs --dataset-path FILE (a ShareGPT-format JSON file, \
             such as ShareGPT_V3_unfiltered_cleaned_split.json)"
        );
    }
    Ok(())
}

pub fn run(args: BenchArgs) -> Result<()> {
    check_flags(&args)?;
    let slo = (!args.goodput.is_empty())
        .then(|| Slo::parse(&args.goodput))
        .transpose()?;
    let scenario = scenario_of(&args);
    // What `tandem compare` checks in suite files, for anything the flags above miss.
    scenario.check()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let source = if scenario.is_random() {
        let source = runtime.block_on(tokens::choose(
            args.tokenizer.as_deref(),
            &args.url,
            args.model.as_deref(),
        ))?;
        eprintln!("{}", source.describe());
        Some(source)
    } else {
        None
    };
    let tokenizer = source.as_ref().and_then(PromptSource::tokenizer);
    let (conversations, mismatch) = runtime.block_on(scenario.conversations_in(tokenizer))?;
    if mismatch != 0 {
        eprintln!(
            "note: the drawn prompts have {} {} tokens than asked in all (their decode and \
             re-encode did not settle, as vllm bench serve warns)",
            mismatch.abs(),
            if mismatch > 0 { "more" } else { "fewer" }
        );
    }
    let requests: usize = conversations.iter().map(|c| c.turns.len()).sum();
    let workload_name = scenario.workload.name().to_owned();
    let ignore_eos = scenario.ignores_eos();
    let target = Target {
        base_url: args.url.clone(),
        model: args.model.clone(),
        api: match args.endpoint {
            Endpoint::Completions => Api::Completions,
            Endpoint::Chat => Api::Chat,
        },
        ignore_eos,
        sampling: Sampling {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
        },
        timeout: Duration::from_secs(args.request_timeout),
    };
    let info = |rate: Option<f64>, concurrency: Option<usize>| RunInfo {
        url: args.url.clone(),
        endpoint: format!("{:?}", args.endpoint).to_lowercase(),
        workload: workload_name.clone(),
        num_prompts: requests,
        request_rate: rate,
        burstiness: args.burstiness,
        max_concurrency: concurrency,
        tokenizer_id: tokenizer.map(PromptTokenizer::id),
    };
    // `inf`, as vllm bench serve takes it: everything at once.
    let request_rate = args.request_rate.filter(|r| r.is_finite());
    let points: Vec<(Option<f64>, Option<usize>)> = if !args.sweep_rates.is_empty() {
        args.sweep_rates
            .iter()
            .map(|&r| (Some(r), args.max_concurrency))
            .collect()
    } else if !args.sweep_concurrency.is_empty() {
        args.sweep_concurrency
            .iter()
            .map(|&c| (request_rate, Some(c)))
            .collect()
    } else {
        vec![(request_rate, args.max_concurrency)]
    };
    let mut runs = Vec::new();
    for (rate, concurrency) in points {
        let traffic = Traffic {
            request_rate: rate,
            burstiness: args.burstiness,
            max_concurrency: concurrency,
            seed: args.seed,
        };
        eprintln!(
            "sending {requests} requests to {} (rate {}, concurrency {})",
            args.url,
            rate.map_or("inf".into(), |r| r.to_string()),
            concurrency.map_or("unlimited".into(), |c| c.to_string())
        );
        let progress = Progress::stderr(requests, &workload_name);
        let (records, duration) = runtime.block_on(tandem_bench::run_conversations(
            &target,
            &conversations,
            &traffic,
            &progress,
        ));
        progress.done();
        for record in records.iter().filter(|r| !r.ok).take(5) {
            eprintln!("failed: {}", record.error.as_deref().unwrap_or("unknown"));
        }
        let summary = stats::summarize(&records, duration, &args.percentiles, slo.as_ref());
        let run_info = info(rate, concurrency);
        println!("{}", report::table(&run_info, &summary));
        runs.push((run_info, summary, records));
    }
    write_outputs(&args, &runs)?;
    Ok(())
}

/// The workload flags as a scenario (the type `tandem compare` reads from files).
fn scenario_of(args: &BenchArgs) -> Scenario {
    Scenario {
        name: "bench".into(),
        description: String::new(),
        workload: args.workload,
        num_prompts: args.num_prompts,
        repeat: 1,
        input_len: args.input_len,
        output_len: args.output_len,
        range_ratio: args.range_ratio,
        prefix_len: args.prefix_len,
        prefix_groups: args.prefix_groups,
        turns: args.turns,
        dataset_path: args.dataset_path.clone(),
        shift_input_len: args.shift_input_len,
        shift_output_len: args.shift_output_len,
        concurrency: Vec::new(),
        rates: Vec::new(),
        burstiness: args.burstiness,
        goodput: args.goodput.clone(),
        ignore_eos: args.ignore_eos.then_some(true),
        seed: args.seed,
    }
}

type Run = (RunInfo, stats::Summary, Vec<stats::RequestRecord>);

/// `--json` (one document, or `{"runs": [...]}` for a sweep) and `--markdown`.
fn write_outputs(args: &BenchArgs, runs: &[Run]) -> Result<()> {
    let sweep_axis = if !args.sweep_rates.is_empty() {
        Some("request rate")
    } else if !args.sweep_concurrency.is_empty() {
        Some("concurrency")
    } else {
        None
    };
    let sweep = sweep_axis.map(|axis| {
        let points: Vec<(f64, stats::Summary)> = runs
            .iter()
            .map(|(info, summary, _)| {
                let load = info.request_rate.or(info.max_concurrency.map(|c| c as f64));
                (load.unwrap_or(f64::INFINITY), summary.clone())
            })
            .collect();
        report::sweep_table(axis, &points)
    });
    if let Some(table) = &sweep {
        println!("\n{table}");
    }
    if let Some(path) = &args.json {
        let docs: Vec<_> = runs
            .iter()
            .map(|(info, summary, records)| {
                report::json(info, summary, records, args.save_detailed)
            })
            .collect();
        let doc = match (sweep_axis, docs.len()) {
            (None, 1) => docs.into_iter().next().unwrap_or_default(),
            _ => serde_json::json!({ "runs": docs }),
        };
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    if let Some(path) = &args.markdown {
        let mut text: Vec<String> = runs
            .iter()
            .map(|(info, summary, _)| report::markdown(info, summary))
            .collect();
        text.extend(sweep);
        std::fs::write(path, text.join("\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
