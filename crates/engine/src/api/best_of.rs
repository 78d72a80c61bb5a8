//! `best_of` (completions): of the candidates sampled for each prompt, the `n` with the
//! highest mean log probability per output token, as OpenAI ranks them.

use super::generation::CollectedChoice;

/// The `n` most likely of each prompt's `candidates` (choices `prompt * candidates ..`
/// in `collected`), most likely first, renumbered `prompt * n ..`. Their tokens' log
/// probabilities stay only if the client asked for them (`report_logprobs`).
pub fn most_likely(
    collected: Vec<CollectedChoice>,
    candidates: usize,
    n: usize,
    report_logprobs: bool,
) -> Vec<CollectedChoice> {
    let mut by_prompt: Vec<Vec<CollectedChoice>> = Vec::new();
    for choice in collected {
        let prompt = choice.index / candidates;
        if by_prompt.len() <= prompt {
            by_prompt.resize_with(prompt + 1, Vec::new);
        }
        by_prompt[prompt].push(choice);
    }
    let mut best = Vec::with_capacity(by_prompt.len() * n);
    for (prompt, mut choices) in by_prompt.into_iter().enumerate() {
        // Stable: equally likely candidates keep their order.
        choices.sort_by(|a, b| mean_logprob(b).total_cmp(&mean_logprob(a)));
        for (rank, mut choice) in choices.into_iter().take(n).enumerate() {
            choice.index = prompt * n + rank;
            if !report_logprobs {
                choice.logprobs = None;
            }
            best.push(choice);
        }
    }
    best
}

/// The mean log probability of a choice's output tokens; an empty output ranks last
/// (there is nothing to score, and an empty answer is rarely the best one).
fn mean_logprob(choice: &CollectedChoice) -> f64 {
    let tokens = choice.logprobs.as_deref().unwrap_or_default();
    let logprobs: Vec<f64> = tokens
        .iter()
        .filter_map(|token| token.logprobs.as_ref())
        .map(|logprobs| f64::from(logprobs.logprob))
        .collect();
    if logprobs.is_empty() {
        return f64::NEG_INFINITY;
    }
    logprobs.iter().sum::<f64>() / logprobs.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::generation::OutputToken;
    use crate::sample::TokenLogprobs;
    use crate::sched::FinishReason;
    use tandem_protocol::openai::UsageInfo;

    fn candidate(index: usize, logprobs: &[f32]) -> CollectedChoice {
        let tokens = logprobs
            .iter()
            .map(|&logprob| OutputToken {
                id: 1,
                logprobs: Some(Box::new(TokenLogprobs {
                    logprob,
                    rank: 1,
                    top: Vec::new(),
                })),
            })
            .collect();
        CollectedChoice {
            index,
            text: format!("candidate {index}"),
            finish_reason: FinishReason::Length,
            stop_reason: None,
            usage: UsageInfo::new(3, logprobs.len(), 0),
            handoff: None,
            prompt_token_ids: None,
            token_ids: None,
            logprobs: Some(tokens),
            prompt_logprobs: None,
        }
    }

    #[test]
    fn each_prompt_keeps_its_most_likely_candidates_per_token() {
        let collected = vec![
            candidate(0, &[-1.0, -1.0]),
            // A longer output is not penalised: the mean, not the sum, ranks it.
            candidate(1, &[-0.5, -0.5, -0.5, -0.5]),
            candidate(2, &[]),
            candidate(3, &[-3.0]),
            candidate(4, &[-2.0]),
            candidate(5, &[-0.1]),
        ];
        let best = most_likely(collected, 3, 2, false);
        let texts: Vec<_> = best.iter().map(|c| (c.index, c.text.as_str())).collect();
        assert_eq!(
            texts,
            [
                (0, "candidate 1"),
                (1, "candidate 0"),
                (2, "candidate 5"),
                (3, "candidate 4")
            ]
        );
        assert!(best.iter().all(|choice| choice.logprobs.is_none()));
        let kept = most_likely(
            vec![candidate(0, &[-1.0]), candidate(1, &[-2.0])],
            2,
            1,
            true,
        );
        assert!(kept[0].logprobs.is_some());
    }
}
