//! Measuring a planner profile ([`tandem_planner::Profile`]) against running endpoints,
//! `tandem serve` or vLLM alike: a worker's prefill time against prompt length (the
//! time to first token of one request alone, one output token), its decode step time
//! against batch size and context (the gaps between tokens of `batch` streams started
//! together), and the hand-off's cost (a P/D router's time to first token over a
//! single worker's, against the KV bytes moved). Prompts are random words, fresh for
//! every request, so no prefix cache shortens them.

use std::time::{Duration, Instant};

use tandem_planner::profile::{DecodePoint, HandoffCost, PrefillPoint, WorkerProfile};

use crate::client::{self, Api, Prompt, Target};
use crate::stats::RequestRecord;
use crate::workload;

/// What to measure on one worker.
#[derive(Debug, Clone)]
pub struct WorkerPlan {
    pub cores: usize,
    /// The worker's `--max-num-batched-tokens` and `--max-num-seqs`.
    pub max_batched_tokens: usize,
    pub max_sequences: usize,
    /// Prompt lengths (words, about a token each) timed alone.
    pub prompt_lengths: Vec<usize>,
    /// Batch sizes and prompt lengths of the decode runs.
    pub batches: Vec<usize>,
    pub contexts: Vec<usize>,
    /// Output tokens of each decode stream.
    pub decode_tokens: usize,
    /// Runs of each measurement; the median is kept.
    pub repeats: usize,
}

/// A measurement that could not be taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct ProfileFailure {
    pub what: String,
    pub reason: String,
}

/// This machine as a profile names it: the CPU model and the cores the system offers.
pub fn cpu_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// A completions target that generates exactly what it is asked for.
pub fn target(base_url: &str, model: Option<String>) -> Target {
    Target {
        base_url: base_url.to_owned(),
        model,
        api: Api::Completions,
        ignore_eos: true,
        temperature: Some(0.0),
        timeout: Duration::from_secs(600),
    }
}

/// Measures one worker behind `target`.
pub async fn measure_worker(
    target: &Target,
    plan: &WorkerPlan,
) -> Result<WorkerProfile, ProfileFailure> {
    let client = reqwest::Client::new();
    let mut seed = 1;
    let mut prefill = Vec::new();
    for &length in &plan.prompt_lengths {
        let mut runs = Vec::new();
        for _ in 0..plan.repeats {
            seed += 1;
            let record = one(&client, target, fresh(length, 1, seed)).await?;
            runs.push((record.prompt_tokens, record.ttft));
        }
        let (tokens, seconds) = median_by_time(runs);
        prefill.push(PrefillPoint { tokens, seconds });
    }
    let mut decode = Vec::new();
    for &context in &plan.contexts {
        for &batch in &plan.batches {
            let mut runs = Vec::new();
            for _ in 0..plan.repeats {
                seed += 1;
                runs.push(
                    decode_step(&client, target, batch, context, plan.decode_tokens, seed).await?,
                );
            }
            let (context, seconds) = median_by_time(runs);
            decode.push(DecodePoint {
                batch,
                context,
                seconds,
            });
        }
    }
    Ok(WorkerProfile {
        cores: plan.cores,
        max_batched_tokens: plan.max_batched_tokens,
        max_sequences: plan.max_sequences,
        prefill,
        decode,
    })
}

/// The hand-off's cost: how much longer a P/D router (`split`) takes to the first token
/// than one worker (`single`) for the same prompt lengths, fitted against the KV bytes
/// moved.
pub async fn measure_handoff(
    split: &Target,
    single: &Target,
    kv_bytes_per_token: u64,
    prompt_lengths: &[usize],
    repeats: usize,
) -> Result<HandoffCost, ProfileFailure> {
    let client = reqwest::Client::new();
    let mut points = Vec::new();
    let mut seed = 1_000_000;
    for &length in prompt_lengths {
        let mut extra = Vec::new();
        for _ in 0..repeats {
            seed += 1;
            let alone = one(&client, single, fresh(length, 1, seed)).await?;
            seed += 1;
            let handed = one(&client, split, fresh(length, 1, seed)).await?;
            extra.push((handed.prompt_tokens, handed.ttft - alone.ttft));
        }
        let (tokens, seconds) = median_by_time(extra);
        points.push((tokens as f64 * kv_bytes_per_token as f64, seconds));
    }
    let (fixed_seconds, seconds_per_byte) = line_through(&points);
    Ok(HandoffCost {
        fixed_seconds: fixed_seconds.max(0.0),
        seconds_per_byte: seconds_per_byte.max(0.0),
    })
}

/// A prompt of about `words` tokens no earlier request began with.
fn fresh(words: usize, max_tokens: usize, seed: u64) -> Prompt {
    workload::random(1, words, max_tokens, 0.0, seed).remove(0)
}

async fn one(
    client: &reqwest::Client,
    target: &Target,
    prompt: Prompt,
) -> Result<RequestRecord, ProfileFailure> {
    let record = client::send(
        client,
        target,
        &prompt,
        "tandem-plan-profile",
        Instant::now(),
    )
    .await;
    if !record.ok {
        return Err(ProfileFailure {
            what: format!(
                "a {}-word prompt at {}",
                prompt.text.split(' ').count(),
                target.base_url
            ),
            reason: record.error.unwrap_or_default(),
        });
    }
    Ok(record)
}

/// `batch` streams started together: the median gap between tokens once all prompts
/// are in (the later half of each stream), with the batch's mean context then.
async fn decode_step(
    client: &reqwest::Client,
    target: &Target,
    batch: usize,
    context: usize,
    tokens: usize,
    seed: u64,
) -> Result<(usize, f64), ProfileFailure> {
    let prompts: Vec<Prompt> = (0..batch as u64)
        .map(|i| fresh(context, tokens, seed * 1000 + i))
        .collect();
    let records =
        futures_util::future::join_all(prompts.into_iter().map(|p| one(client, target, p))).await;
    let mut gaps = Vec::new();
    let mut prompt_tokens = 0;
    for record in records {
        let record = record?;
        prompt_tokens += record.prompt_tokens;
        gaps.extend(record.itls.iter().skip(record.itls.len() / 2));
    }
    if gaps.is_empty() {
        return Err(ProfileFailure {
            what: format!("a batch of {batch}"),
            reason: "the streams sent one chunk each; ask for more decode tokens".into(),
        });
    }
    gaps.sort_by(f64::total_cmp);
    let mean_context = prompt_tokens / batch + tokens * 3 / 4;
    Ok((mean_context, gaps[gaps.len() / 2]))
}

/// The run of median time, with its size.
fn median_by_time(mut runs: Vec<(usize, f64)>) -> (usize, f64) {
    runs.sort_by(|a, b| a.1.total_cmp(&b.1));
    runs[runs.len() / 2]
}

/// Least-squares line `y = a + b·x` through the points (`b = 0` for one point).
fn line_through(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (my - slope * mx, slope)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_fitted_through_the_hand_off_points() {
        let (a, b) = line_through(&[(0.0, 1.0), (10.0, 3.0), (20.0, 5.0)]);
        assert!((a - 1.0).abs() < 1e-12 && (b - 0.2).abs() < 1e-12);
        assert_eq!(line_through(&[(5.0, 2.0)]), (2.0, 0.0));
        assert_eq!(median_by_time(vec![(1, 3.0), (2, 1.0), (3, 2.0)]), (3, 2.0));
    }
}
