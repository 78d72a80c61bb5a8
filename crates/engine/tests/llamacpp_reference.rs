//! The forward pass on the default model against llama.cpp's outputs (the fixture in
//! `tests/fixtures/`, produced by `shared/fixtures/make_llamacpp_reference.py`).
//!
//! llama.cpp quantizes activations to 8 bits inside every matrix product, so its logits
//! carry noise of about 0.15 (mean absolute) against exact arithmetic, and its top-1
//! flips wherever its best two tokens are within that noise. Measured on this fixture:
//! an exact f64 forward agrees with it at 95.4% of positions, llama.cpp 0.3.36 rebuilt
//! here at 98.5%, the same with flash attention at 96.9% (see docs/benchmarks.md). So the
//! tests demand exact agreement wherever llama.cpp's decision is clear (its top-1 leads
//! by [`CLEAR_MARGIN`]), and a high overall agreement.

mod common;

use tandem_engine::LoadedModel;
use tandem_engine::generate::{GenerateOptions, Session, generate};
use tandem_engine::kernels::ThreadPool;
use tandem_engine::kv::KvOptions;
use tandem_engine::model::{LoadOptions, LogitsFor};
use tandem_engine::sample::{SamplingParams, argmax};

use common::CLEAR_MARGIN;

/// Overall teacher-forced top-1 agreement required (the issue asks 98%, which
/// llama.cpp itself does not reach across builds; see the module doc).
const MIN_AGREEMENT: f64 = 0.95;

fn load(options: LoadOptions) -> Option<LoadedModel> {
    let path = common::default_model()?;
    Some(LoadedModel::load(&path, options).expect("default model loads"))
}

fn teacher_forced_agreement(loaded: &LoadedModel, pool: &ThreadPool, chunk: usize) -> f64 {
    let vocab = loaded.model.config().vocab_size;
    let (mut agree, mut total) = (0, 0);
    for case in common::llamacpp_cases() {
        let sequence = case.sequence();
        let mut session = Session::new(loaded.cpu(), pool, sequence.len(), KvOptions::default());
        let mut ours = Vec::new();
        for part in sequence.chunks(chunk) {
            let logits = session.feed(part, LogitsFor::All).unwrap();
            ours.extend(logits.chunks_exact(vocab).map(argmax));
        }
        assert_eq!(ours.len(), case.top1.len());
        for (pos, ((a, b), margin)) in ours.iter().zip(&case.top1).zip(&case.margin).enumerate() {
            assert!(
                a == b || *margin < CLEAR_MARGIN,
                "chunk {chunk}, position {pos}: ours {a}, llama.cpp {b} leading by {margin:.3}"
            );
        }
        agree += ours.iter().zip(&case.top1).filter(|(a, b)| a == b).count();
        total += ours.len();
    }
    let share = agree as f64 / total as f64;
    eprintln!("chunk {chunk}: top-1 agreement {agree}/{total} = {share:.4}");
    share
}

#[test]
fn teacher_forced_top1_matches_llamacpp() {
    let Some(loaded) = load(LoadOptions::default()) else {
        return;
    };
    let pool = ThreadPool::new(2).unwrap();
    // Whole sequences at once (the GEMM prefill path) and one token at a time (decode).
    for chunk in [usize::MAX, 1] {
        let share = teacher_forced_agreement(&loaded, &pool, chunk);
        assert!(
            share >= MIN_AGREEMENT,
            "chunk {chunk}: top-1 agreement {share:.4}"
        );
    }
}

#[test]
fn greedy_generation_reproduces_llamacpp() {
    let Some(loaded) = load(LoadOptions::default()) else {
        return;
    };
    let pool = ThreadPool::new(2).unwrap();
    for case in common::llamacpp_cases() {
        let options = GenerateOptions {
            max_tokens: case.greedy_ids.len(),
            sampling: SamplingParams::greedy(),
            ..GenerateOptions::default()
        };
        let mut ours = Vec::new();
        generate(loaded.cpu(), &pool, &case.prompt_ids, &options, |t| {
            ours.push(t);
            true
        })
        .unwrap();
        // Greedy token k is llama.cpp's top-1 at position prompt_len - 1 + k. The two
        // sequences must agree for 16 tokens, or up to llama.cpp's first near-tie if it
        // comes sooner: past a coin flip, the continuations legitimately differ.
        let first_near_tie = (0..case.greedy_ids.len())
            .find(|&k| case.margin[case.prompt_ids.len() - 1 + k] < CLEAR_MARGIN)
            .unwrap_or(case.greedy_ids.len());
        let n = 16.min(first_near_tie).min(case.greedy_ids.len());
        assert_eq!(ours[..n], case.greedy_ids[..n], "first {n} greedy tokens");
        let same = ours
            .iter()
            .zip(&case.greedy_ids)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "greedy: {same}/{} tokens identical to llama.cpp (its first near-tie: token {first_near_tie})",
            case.greedy_ids.len()
        );
    }
}

#[test]
fn quantized_only_path_agrees_too() {
    // Without dense copies, prefill runs on the quantized kernels as well.
    let Some(loaded) = load(LoadOptions {
        dense_weights_budget: 0,
    }) else {
        return;
    };
    let pool = ThreadPool::new(2).unwrap();
    let share = teacher_forced_agreement(&loaded, &pool, 64);
    assert!(share >= MIN_AGREEMENT, "top-1 agreement {share:.4}");
}
