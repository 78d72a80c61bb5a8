//! Measuring a planner profile ([`tandem_planner::Profile`]) against running endpoints,
//! `tandem serve` or vLLM alike: a worker's prefill time against prompt length (the
//! time to first token of one request alone, one output token), its decode step time
//! against batch size and context (the gaps between tokens of `batch` streams started
//! together), steps of several prompts computed together, with or without decode rows
//! beside them ([`shared_step`]), and the hand-off's cost (a P/D router's time to first
//! token over a single worker's, against the KV bytes moved). Prompts are random
//! words, fresh for every request, so no prefix cache shortens them.

use std::time::{Duration, Instant};

use tandem_planner::profile::{DecodePoint, HandoffCost, PrefillPoint, StepPoint, WorkerProfile};

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
    /// Steps of several prompts timed together.
    pub steps: Vec<StepGroup>,
    /// Prompt length (words) of the decode streams running beside a step's prompts.
    pub step_decode_context: usize,
    /// Runs of each measurement; the median is kept.
    pub repeats: usize,
}

/// One shared step to time: `prompts` prompts of `words` words each, beside `decodes`
/// decoding streams. Written `NxW` or `NxW+D` (`4x256`, `2x500+32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepGroup {
    pub prompts: usize,
    pub words: usize,
    pub decodes: usize,
}

impl std::str::FromStr for StepGroup {
    type Err = ProfileFailure;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ProfileFailure {
            what: format!("step group `{text}`"),
            reason: "write it NxW (N prompts of W words) or NxW+D (beside D decoding streams), \
                     each at least 1"
                .into(),
        };
        let (group, decodes) = match text.split_once('+') {
            Some((group, decodes)) => (group, decodes.parse().map_err(|_| bad())?),
            None => (text, 0),
        };
        let (prompts, words) = group.split_once('x').ok_or_else(bad)?;
        let step = StepGroup {
            prompts: prompts.parse().map_err(|_| bad())?,
            words: words.parse().map_err(|_| bad())?,
            decodes,
        };
        if step.prompts == 0 || step.words == 0 || text.ends_with('+') {
            return Err(bad());
        }
        Ok(step)
    }
}

/// A measurement that could not be taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct ProfileFailure {
    pub what: String,
    pub reason: String,
}

/// This machine as a profile names it: the CPU model, its identity numbers and the
/// cores the system offers, e.g. `Intel(R) Xeon(R) Processor (family 6 model 207
/// stepping 2), 2 cores`. The numbers matter where a VM hides the model name: two
/// Xeon generations both called "Intel(R) Xeon(R) Processor" decode at 2× apart.
pub fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    describe_cpu(&info, cores)
}

/// [`cpu_description`] from the text of `/proc/cpuinfo` (its first processor).
fn describe_cpu(cpuinfo: &str, cores: usize) -> String {
    let first_processor = cpuinfo.split("\n\n").next().unwrap_or_default();
    let field = |key: &str| {
        first_processor.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            (name.trim() == key).then(|| value.trim().to_owned())
        })
    };
    let name = field("model name").unwrap_or_else(|| "unknown CPU".into());
    // x86 numbers its CPUs by family/model/stepping, Arm by implementer/part/variant.
    let identity: Vec<String> = [
        ("cpu family", "family"),
        ("model", "model"),
        ("stepping", "stepping"),
        ("CPU implementer", "implementer"),
        ("CPU part", "part"),
        ("CPU variant", "variant"),
    ]
    .iter()
    .filter_map(|(key, label)| field(key).map(|value| format!("{label} {value}")))
    .collect();
    if identity.is_empty() {
        format!("{name}, {cores} cores")
    } else {
        format!("{name} ({}), {cores} cores", identity.join(" "))
    }
}

/// A completions target that generates exactly what it is asked for.
pub fn target(base_url: &str, model: Option<String>) -> Target {
    Target {
        base_url: base_url.to_owned(),
        model,
        api: Api::Completions,
        ignore_eos: true,
        sampling: crate::client::Sampling::greedy(),
        timeout: Duration::from_secs(600),
    }
}

/// The model the server at `base_url` serves (the first `/v1/models` lists), for
/// workers started without being told a name.
pub async fn served_model(base_url: &str) -> Result<String, ProfileFailure> {
    let failure = |reason: String| ProfileFailure {
        what: format!("the model served at {base_url}"),
        reason,
    };
    let models: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v1/models", base_url.trim_end_matches('/')))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| failure(e.to_string()))?
        .json()
        .await
        .map_err(|e| failure(e.to_string()))?;
    models["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| failure("/v1/models lists none".into()))
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
    // The blocker: the measured prompt length nearest 512 words, and its time.
    let blocker = plan
        .prompt_lengths
        .iter()
        .zip(&prefill)
        .min_by_key(|(words, _)| words.abs_diff(512))
        .map(|(&words, point)| (words, point.seconds));
    let mut steps = Vec::new();
    for &group in &plan.steps {
        let Some(blocker) = blocker else {
            return Err(ProfileFailure {
                what: "steps of several prompts".into(),
                reason: "they need a measured prompt length (--prompt-lengths)".into(),
            });
        };
        let mut runs = Vec::new();
        for _ in 0..plan.repeats {
            seed += 1;
            runs.push(shared_step(&client, target, group, plan, blocker, seed).await?);
        }
        runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        steps.push(runs[runs.len() / 2]);
    }
    Ok(WorkerProfile {
        cores: plan.cores,
        max_batched_tokens: plan.max_batched_tokens,
        max_sequences: plan.max_sequences,
        prefill,
        decode,
        steps,
        measured_alongside: 0,
    })
}

/// Measures the worker behind `target` while the workers behind `neighbours` (on the
/// machine's other cores) are given the same measurements at the same time, so the
/// profile carries the contention a layout that fills the machine will meet. A
/// neighbour that fails fails the whole measurement: its load was not what the profile
/// would claim.
pub async fn measure_worker_alongside(
    target: &Target,
    neighbours: &[Target],
    plan: &WorkerPlan,
) -> Result<WorkerProfile, ProfileFailure> {
    let busy = neighbours.iter().map(|neighbour| async move {
        measure_worker(neighbour, plan)
            .await
            .map_err(|failure| ProfileFailure {
                what: format!("the worker alongside at {}", neighbour.base_url),
                reason: failure.to_string(),
            })
    });
    // The first failure, the worker's or a neighbour's, ends the measurement at once.
    let (worker, _) = tokio::try_join!(
        measure_worker(target, plan),
        futures_util::future::try_join_all(busy)
    )?;
    Ok(WorkerProfile {
        measured_alongside: neighbours.len(),
        ..worker
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

/// One step of `group.prompts` prompts computed together: a blocker prompt (`blocker`:
/// its words and measured prefill time) is sent first and the group 40% of that time
/// later, while the worker computes the blocker (decode steps beside it are shorter
/// than that), so the group is queued whole when the blocker's step ends and the next
/// step takes it at once (within the token budget). The step's time is from the
/// blocker's first token to the group's last first token. With `group.decodes`, that
/// many streams are started first and a one-word request waits behind their prompts,
/// so the blocker and the group meet them decoding; the step's decode context is
/// theirs then.
async fn shared_step(
    client: &reqwest::Client,
    target: &Target,
    group: StepGroup,
    plan: &WorkerPlan,
    (blocker_words, blocker_seconds): (usize, f64),
    seed: u64,
) -> Result<StepPoint, ProfileFailure> {
    let start = Instant::now();
    let failed = |reason: String| ProfileFailure {
        what: format!(
            "a step of {} prompts of {} words beside {} decoding streams",
            group.prompts, group.words, group.decodes
        ),
        reason,
    };
    // Enough tokens to decode through the settling, the blocker's step and the group's.
    let decode_tokens = plan.decode_tokens.max(32);
    let decoders = futures_util::future::join_all((0..group.decodes as u64).map(|i| {
        let prompt = fresh(
            plan.step_decode_context,
            decode_tokens,
            seed * 1000 + 500 + i,
        );
        sent_at(client, target, prompt, start)
    }));
    let timed = async {
        if group.decodes > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            one(client, target, fresh(1, 1, seed * 1000 + 999)).await?;
        }
        let blocker = sent_at(
            client,
            target,
            fresh(blocker_words, 1, seed * 1000 + 998),
            start,
        );
        let prompts = async {
            let wait = (blocker_seconds * 0.4).max(0.03);
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            futures_util::future::join_all((0..group.prompts as u64).map(|i| {
                sent_at(
                    client,
                    target,
                    fresh(group.words, 1, seed * 1000 + i),
                    start,
                )
            }))
            .await
        };
        let (blocker, prompts) = futures_util::future::join(blocker, prompts).await;
        Ok::<_, ProfileFailure>((blocker, prompts))
    };
    let (decoders, timed) = futures_util::future::join(decoders, timed).await;
    let (blocker, prompts) = timed?;
    let first_token = |r: &RequestRecord| r.start + r.ttft;
    for record in std::iter::once(&blocker).chain(&prompts).chain(&decoders) {
        if !record.ok {
            return Err(failed(record.error.clone().unwrap_or_default()));
        }
    }
    let begun = first_token(&blocker);
    let ended = prompts.iter().map(first_token).fold(f64::MIN, f64::max);
    let spread = ended - prompts.iter().map(first_token).fold(f64::MAX, f64::min);
    let seconds = ended - begun;
    if seconds <= 0.0 || prompts.iter().any(|r| r.start >= begun) {
        return Err(failed(
            "the prompts were not queued while the blocker's step ran (they joined its \
             step, or came after it)"
                .into(),
        ));
    }
    if spread > seconds / 4.0 {
        return Err(failed(format!(
            "the prompts' first tokens came {:.0} ms apart in a step of {:.0} ms: \
             they did not share one step (more tokens than --max-batched-tokens?)",
            spread * 1e3,
            seconds * 1e3
        )));
    }
    let mut context = 0;
    for record in &decoders {
        // Token times: the first, then each gap after it.
        let mut at = first_token(record);
        let mut before = 0;
        for gap in std::iter::once(&0.0).chain(&record.itls) {
            at += gap;
            if at < begun {
                before += 1;
            }
        }
        if before == 0 || record.start + record.latency < ended {
            return Err(failed(
                "a decoding stream was not decoding through the timed step".into(),
            ));
        }
        context += record.prompt_tokens + before;
    }
    Ok(StepPoint {
        prompts: group.prompts,
        tokens: prompts.iter().map(|r| r.prompt_tokens).sum(),
        decode_batch: group.decodes,
        decode_context: context / group.decodes.max(1),
        seconds,
    })
}

/// `prompt`'s record, its times from `start`.
async fn sent_at(
    client: &reqwest::Client,
    target: &Target,
    prompt: Prompt,
    start: Instant,
) -> RequestRecord {
    client::send(client, target, &prompt, "tandem-plan-profile", start).await
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
    fn a_cpu_is_named_with_its_identity_numbers() {
        // Abridged from two VMs that both call themselves "Intel(R) Xeon(R) Processor".
        let xeon = |model: u32| {
            format!(
                "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: {model}\n\
                 model name\t: Intel(R) Xeon(R) Processor\nstepping\t: 2\n\n\
                 processor\t: 1\nmodel\t\t: 1\n"
            )
        };
        let emerald = describe_cpu(&xeon(207), 2);
        assert_eq!(
            emerald,
            "Intel(R) Xeon(R) Processor (family 6 model 207 stepping 2), 2 cores"
        );
        assert_ne!(emerald, describe_cpu(&xeon(143), 2));
        let arm = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd4f\n";
        assert_eq!(
            describe_cpu(arm, 4),
            "unknown CPU (implementer 0x41 part 0xd4f), 4 cores"
        );
        assert_eq!(describe_cpu("", 1), "unknown CPU, 1 cores");
    }

    #[test]
    fn a_line_is_fitted_through_the_hand_off_points() {
        let (a, b) = line_through(&[(0.0, 1.0), (10.0, 3.0), (20.0, 5.0)]);
        assert!((a - 1.0).abs() < 1e-12 && (b - 0.2).abs() < 1e-12);
        assert_eq!(line_through(&[(5.0, 2.0)]), (2.0, 0.0));
        assert_eq!(median_by_time(vec![(1, 3.0), (2, 1.0), (3, 2.0)]), (3, 2.0));
    }

    #[test]
    fn step_groups_are_read_as_written() {
        let group = |text: &str| text.parse::<StepGroup>();
        assert_eq!(
            group("4x256").unwrap(),
            StepGroup {
                prompts: 4,
                words: 256,
                decodes: 0
            }
        );
        assert_eq!(group("2x500+32").unwrap().decodes, 32);
        for bad in ["4", "0x256", "4x", "x256", "4x256+", "4x256+a", "4*256"] {
            let error = group(bad).unwrap_err().to_string();
            assert!(error.contains("NxW"), "{bad}: {error}");
        }
    }
}
