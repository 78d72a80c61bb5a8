//! What to send and when: the seed experiment's two tests, random prompts of given
//! lengths (alone, behind a shared prefix, or as multi-turn conversations), ShareGPT
//! files, and the arrival schedule (all at once, or a Poisson/gamma process at a
//! request rate, as `vllm bench serve` draws it).

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::client::Prompt;

/// The seed's single-request test prompt.
pub const SEED_SINGLE: &str = "Explain how HTTP load balancers work in 3 sentences.";

/// The seed's batch test: 8 concurrent requests.
pub const SEED_BATCH: [&str; 8] = [
    "What is a REST API?",
    "Explain database indexing.",
    "How does DNS work?",
    "What are microservices?",
    "Describe container orchestration.",
    "What is continuous integration?",
    "Explain message queues.",
    "How does caching improve performance?",
];

pub fn seed_single(max_tokens: usize) -> Vec<Prompt> {
    vec![Prompt {
        text: SEED_SINGLE.into(),
        max_tokens,
    }]
}

pub fn seed_batch(max_tokens: usize) -> Vec<Prompt> {
    SEED_BATCH
        .iter()
        .map(|p| Prompt {
            text: (*p).into(),
            max_tokens,
        })
        .collect()
}

/// Lengths drawn uniformly in `[floor(l·(1−r)), ceil(l·(1+r))]` (at least 1).
fn draw_len(rng: &mut StdRng, len: usize, ratio: f64) -> usize {
    let low = (len as f64 * (1.0 - ratio)).floor().max(1.0) as usize;
    let high = (len as f64 * (1.0 + ratio)).ceil().max(low as f64) as usize;
    rng.random_range(low..=high)
}

/// `count` prompts of about `input_len` tokens (common English words, one token each
/// for most tokenizers) and `output_len` output tokens each. Each prompt's first word
/// is a number no other prompt of the call starts with, so that no two prompts share a
/// prefix-cache block by accident (a tokenizer that maps the words to few tokens would
/// otherwise make every prompt a cache hit). [`crate::tokens`] draws exact token counts
/// when a tokenizer is at hand.
pub fn random(
    count: usize,
    input_len: usize,
    output_len: usize,
    ratio: f64,
    seed: u64,
) -> Vec<Prompt> {
    const WORDS: &[&str] = &[
        "the", "system", "request", "server", "data", "time", "model", "cache", "network", "value",
        "user", "process", "memory", "queue", "node", "table", "index", "file", "thread", "block",
        "page", "route", "token", "batch", "layer", "state", "event",
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut leads = HashSet::new();
    (0..count)
        .map(|_| {
            let words = draw_len(&mut rng, input_len, ratio);
            let lead = loop {
                let lead: u32 = rng.random_range(100_000..1_000_000);
                if leads.insert(lead) {
                    break lead.to_string();
                }
            };
            let text: Vec<&str> = std::iter::once(lead.as_str())
                .chain((1..words).map(|_| WORDS[rng.random_range(0..WORDS.len())]))
                .collect();
            Prompt {
                text: text.join(" "),
                max_tokens: draw_len(&mut rng, output_len, ratio),
            }
        })
        .collect()
}

/// `count` random prompts, the first half of `first` (prompt words, output tokens)
/// and the rest of `second`: a load that shifts halfway.
pub fn shifted(
    count: usize,
    first: (usize, usize),
    second: (usize, usize),
    ratio: f64,
    seed: u64,
) -> Vec<Prompt> {
    let half = count / 2;
    let mut prompts = random(half, first.0, first.1, ratio, seed);
    prompts.extend(random(
        count - half,
        second.0,
        second.1,
        ratio,
        seed.wrapping_add(1),
    ));
    prompts
}

/// `count` prompts that start with one of `groups` prefixes of `prefix_len` words (a
/// system prompt, say; prompt `i` takes prefix `i % groups`) and then differ for
/// `input_len` words: what prefix caching and cache-aware routing are for. With several
/// groups, a router that sends each group to its own worker finds the most cache hits.
pub fn shared_prefix(
    count: usize,
    groups: usize,
    prefix_len: usize,
    input_len: usize,
    output_len: usize,
    seed: u64,
) -> Vec<Prompt> {
    let prefixes: Vec<String> = random(groups.max(1), prefix_len, 1, 0.0, seed.wrapping_add(1))
        .into_iter()
        .map(|p| p.text)
        .collect();
    random(count, input_len, output_len, 0.0, seed)
        .into_iter()
        .enumerate()
        .map(|(i, p)| Prompt {
            text: format!("{} {}", prefixes[i % prefixes.len()], p.text),
            max_tokens: p.max_tokens,
        })
        .collect()
}

/// A conversation: turns sent one after another, each prompt carrying the transcript
/// so far (see [`crate::run_conversations`]). Single-turn workloads are conversations
/// of one turn.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub turns: Vec<Prompt>,
}

/// `users` conversations of `turns` turns: every first turn starts with the same
/// `prefix_len` words (a shared system prompt), then `input_len` words of its own; each
/// later turn adds `input_len` new words to the transcript. Every turn asks for
/// `output_len` tokens. What multi-turn chat looks like to prefix caching and to
/// disaggregation: each turn's prompt is mostly the KV of the turns before it.
pub fn multi_turn(
    users: usize,
    turns: usize,
    prefix_len: usize,
    input_len: usize,
    output_len: usize,
    seed: u64,
) -> Vec<Conversation> {
    let firsts = shared_prefix(users, 1, prefix_len, input_len, output_len, seed);
    let mut later = random(
        users * turns.saturating_sub(1),
        input_len,
        output_len,
        0.0,
        seed.wrapping_add(2),
    )
    .into_iter();
    firsts
        .into_iter()
        .map(|first| {
            let mut conversation = vec![first];
            conversation.extend(later.by_ref().take(turns.saturating_sub(1)));
            Conversation {
                turns: conversation,
            }
        })
        .collect()
}

/// A ShareGPT-format file problem.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a ShareGPT JSON list: {message}")]
    Format { path: String, message: String },
}

/// Prompts from a ShareGPT-format JSON file (`[{"conversations": [{"from": "human",
/// "value": …}, {"from": "gpt", "value": …}, …]}, …]`): each conversation's first human
/// turn, with its reply's length (about 4/3 tokens per word) as `max_tokens`, up to
/// `count` of them; conversations without both turns are skipped, as vLLM does.
pub fn sharegpt(path: &std::path::Path, count: usize) -> Result<Vec<Prompt>, DatasetError> {
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let format = |message: String| DatasetError::Format {
        path: path.display().to_string(),
        message,
    };
    let entries: Vec<serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| format(e.to_string()))?;
    let prompts: Vec<Prompt> = entries
        .iter()
        .filter_map(|entry| {
            let turns = entry.get("conversations")?.as_array()?;
            let (first, second) = (turns.first()?, turns.get(1)?);
            let prompt = first.get("value")?.as_str()?;
            let reply = second.get("value")?.as_str()?;
            let reply_tokens = (reply.split_whitespace().count() * 4).div_ceil(3);
            Some(Prompt {
                text: prompt.to_owned(),
                max_tokens: reply_tokens.max(1),
            })
        })
        .take(count)
        .collect();
    if prompts.is_empty() {
        return Err(format("no conversation with a prompt and a reply".into()));
    }
    Ok(prompts)
}

/// Seconds after the start at which each of `count` requests is sent: all at 0 without
/// a rate; else the running sum of [`gaps`], rescaled so the last lands at
/// `count / rate`, as vLLM does.
pub fn arrivals(count: usize, rate: Option<f64>, burstiness: f64, seed: u64) -> Vec<f64> {
    let Some(rate) = rate.filter(|r| r.is_finite() && *r > 0.0) else {
        return vec![0.0; count];
    };
    let mut at = 0.0;
    let mut times: Vec<f64> = gaps(count, rate, burstiness, seed)
        .into_iter()
        .map(|gap| {
            at += gap;
            at
        })
        .collect();
    if let Some(&last) = times.last()
        && last > 0.0
    {
        let scale = count as f64 / rate / last;
        times.iter_mut().for_each(|t| *t *= scale);
    }
    times
}

/// `count` gaps between arrivals at `rate` per second: gamma-distributed with shape
/// `burstiness` and mean `1/rate` (exponential, so Poisson arrivals, at 1).
pub fn gaps(count: usize, rate: f64, burstiness: f64, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| gamma(&mut rng, burstiness) / (rate * burstiness))
        .collect()
}

/// A Gamma(shape, 1) draw (Marsaglia and Tsang; boosted for shape < 1).
fn gamma(rng: &mut StdRng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = standard_normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

fn standard_normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_tests_are_the_notebooks() {
        assert_eq!(seed_single(100)[0].text, SEED_SINGLE);
        assert_eq!(seed_batch(100).len(), 8);
        assert!(seed_batch(100).iter().all(|p| p.max_tokens == 100));
    }

    #[test]
    fn random_prompts_respect_their_ranges_and_seed() {
        let prompts = random(200, 100, 20, 0.5, 7);
        for p in &prompts {
            let words = p.text.split(' ').count();
            assert!((50..=150).contains(&words), "{words}");
            assert!((10..=30).contains(&p.max_tokens));
        }
        assert_eq!(
            random(3, 10, 5, 0.0, 1)[0].text,
            random(3, 10, 5, 0.0, 1)[0].text
        );
        assert!(random(3, 10, 5, 0.0, 1).iter().all(|p| p.max_tokens == 5));
    }

    #[test]
    fn random_prompts_differ_from_their_first_word() {
        let prompts = random(2000, 8, 4, 0.0, 3);
        let firsts: HashSet<&str> = prompts
            .iter()
            .map(|p| p.text.split(' ').next().unwrap())
            .collect();
        assert_eq!(firsts.len(), 2000);
        // Shared prefixes stay shared; what follows them starts distinct.
        let prompts = shared_prefix(50, 1, 20, 10, 4, 1);
        let after: HashSet<&str> = prompts
            .iter()
            .map(|p| p.text.split(' ').nth(20).unwrap())
            .collect();
        assert_eq!(after.len(), 50);
    }

    #[test]
    fn shared_prefixes_are_shared_and_suffixes_differ() {
        let prompts = shared_prefix(4, 1, 30, 10, 8, 2);
        let prefix: Vec<&str> = prompts[0].text.split(' ').take(30).collect();
        for p in &prompts {
            let words: Vec<&str> = p.text.split(' ').collect();
            assert_eq!(words.len(), 40);
            assert_eq!(&words[..30], &prefix[..]);
        }
        assert_ne!(prompts[0].text, prompts[1].text);
    }

    #[test]
    fn prefix_groups_alternate_and_differ() {
        let prompts = shared_prefix(6, 3, 20, 5, 4, 9);
        let prefix = |i: usize| -> Vec<String> {
            prompts[i]
                .text
                .split(' ')
                .take(20)
                .map(str::to_owned)
                .collect()
        };
        for i in 0..3 {
            assert_eq!(
                prefix(i),
                prefix(i + 3),
                "prompt {i} and {} share a group",
                i + 3
            );
        }
        assert_ne!(prefix(0), prefix(1));
        assert_ne!(prefix(1), prefix(2));
    }

    #[test]
    fn multi_turn_conversations_share_a_prefix_and_have_their_turns() {
        let conversations = multi_turn(3, 4, 20, 5, 7, 1);
        assert_eq!(conversations.len(), 3);
        let prefix: Vec<&str> = conversations[0].turns[0].text.split(' ').take(20).collect();
        for c in &conversations {
            assert_eq!(c.turns.len(), 4);
            assert!(c.turns.iter().all(|t| t.max_tokens == 7));
            let first: Vec<&str> = c.turns[0].text.split(' ').collect();
            assert_eq!((&first[..20], first.len()), (&prefix[..], 25));
            assert!(c.turns[1..].iter().all(|t| t.text.split(' ').count() == 5));
        }
        assert_ne!(
            conversations[0].turns[1].text,
            conversations[1].turns[1].text
        );
    }

    #[test]
    fn sharegpt_files_give_first_turns_and_reply_lengths() {
        let dir = std::env::temp_dir().join(format!("sharegpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("d.json");
        std::fs::write(
            &file,
            r#"[{"conversations": [{"from": "human", "value": "Hi there"},
                                   {"from": "gpt", "value": "one two three four five six"}]},
                {"conversations": [{"from": "human", "value": "no reply"}]},
                {"id": "x"}]"#,
        )
        .unwrap();
        let prompts = sharegpt(&file, 10).unwrap();
        assert_eq!(prompts.len(), 1);
        assert_eq!(prompts[0].text, "Hi there");
        assert_eq!(prompts[0].max_tokens, 8);
        std::fs::write(&file, "{}").unwrap();
        assert!(
            sharegpt(&file, 10)
                .unwrap_err()
                .to_string()
                .contains("ShareGPT")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn arrivals_are_ordered_and_end_at_count_over_rate() {
        assert_eq!(arrivals(3, None, 1.0, 0), vec![0.0; 3]);
        for burstiness in [0.5, 1.0, 4.0] {
            let times = arrivals(2000, Some(10.0), burstiness, 3);
            assert!((times.last().unwrap() - 200.0).abs() < 1e-9);
            assert!(times.windows(2).all(|w| w[1] >= w[0]));
        }
    }

    /// Mean and coefficient of variation of a sample.
    fn mean_and_cv(values: &[f64]) -> (f64, f64) {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var.sqrt() / mean)
    }

    #[test]
    fn gaps_before_rescaling_have_the_requested_rate_and_shape() {
        // Gamma(k) gaps of mean 1/rate have CV 1/sqrt(k) (1 for Poisson arrivals). With
        // n = 40,000 the sample mean's standard error is CV/(rate·sqrt(n)) (the bound is
        // five of them) and the sample CV's, by the delta method, at most 0.009 for these
        // shapes (the bound is over five); the draws are fixed by the seeds.
        let n = 40_000;
        let rate = 8.0;
        for (burstiness, seed) in [(1.0, 11), (0.5, 12), (4.0, 13)] {
            let sample = gaps(n, rate, burstiness, seed);
            assert!(sample.iter().all(|g| *g > 0.0 && g.is_finite()));
            let (mean, cv) = mean_and_cv(&sample);
            let expected_cv = 1.0 / f64::sqrt(burstiness);
            let mean_bound = 5.0 * expected_cv / rate / (n as f64).sqrt();
            assert!(
                (mean - 1.0 / rate).abs() < mean_bound,
                "burstiness {burstiness}: mean gap {mean}, expected {} ± {mean_bound}",
                1.0 / rate
            );
            assert!(
                (cv - expected_cv).abs() < 0.05 * expected_cv.max(1.0),
                "burstiness {burstiness}: CV {cv}, expected {expected_cv}"
            );
        }
        // Poisson: the fraction of gaps longer than the mean is e^-1 (memorylessness),
        // which a wrong distribution with the right mean and CV would miss.
        let sample = gaps(n, rate, 1.0, 21);
        let longer = sample.iter().filter(|g| **g > 1.0 / rate).count() as f64 / n as f64;
        let sd = (f64::exp(-1.0) * (1.0 - f64::exp(-1.0)) / n as f64).sqrt();
        assert!((longer - f64::exp(-1.0)).abs() < 5.0 * sd, "{longer}");
        // The rescaling that pins the last arrival at count/rate barely moves them.
        let times = arrivals(n, Some(rate), 1.0, 11);
        let unscaled: f64 = gaps(n, rate, 1.0, 11).iter().sum();
        let scale = times.last().unwrap() / unscaled;
        assert!((scale - 1.0).abs() < 5.0 / (n as f64).sqrt(), "{scale}");
    }
}
