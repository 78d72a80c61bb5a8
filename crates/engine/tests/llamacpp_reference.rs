//! The forward pass on the default model against llama.cpp's outputs (the fixture in
//! `tests/fixtures/`, produced by `shared/fixtures/make_llamacpp_reference.py`).

mod common;

use tandem_engine::LoadedModel;
use tandem_engine::generate::{GenerateOptions, Session, generate};
use tandem_engine::kernels::ThreadPool;
use tandem_engine::model::{LoadOptions, LogitsFor};
use tandem_engine::sample::{SamplingParams, argmax};

struct Case {
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    /// llama.cpp's most likely next token after each position of prompt + greedy.
    top1: Vec<u32>,
}

fn cases() -> Vec<Case> {
    let fixture = common::llamacpp_fixture();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    fixture["generation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| Case {
            prompt_ids: ids(&case["prompt_ids"]),
            greedy_ids: ids(&case["greedy_ids"]),
            top1: case["top5_logits_per_position"]
                .as_array()
                .unwrap()
                .iter()
                .map(|top5| top5[0][0].as_u64().unwrap() as u32)
                .collect(),
        })
        .collect()
}

fn load(options: LoadOptions) -> Option<LoadedModel> {
    let path = common::default_model()?;
    Some(LoadedModel::load(&path, options).expect("default model loads"))
}

fn teacher_forced_agreement(
    loaded: &LoadedModel,
    pool: &ThreadPool,
    chunk: usize,
) -> (usize, usize) {
    let vocab = loaded.model.config().vocab_size;
    let (mut agree, mut total) = (0, 0);
    for case in cases() {
        let sequence: Vec<u32> = case
            .prompt_ids
            .iter()
            .chain(&case.greedy_ids)
            .copied()
            .collect();
        let mut session = Session::new(&loaded.model, pool, sequence.len(), 16);
        let mut ours = Vec::new();
        for part in sequence.chunks(chunk) {
            let logits = session.feed(part, LogitsFor::All).unwrap();
            ours.extend(logits.chunks_exact(vocab).map(argmax));
        }
        assert_eq!(ours.len(), case.top1.len());
        agree += ours.iter().zip(&case.top1).filter(|(a, b)| a == b).count();
        total += ours.len();
    }
    (agree, total)
}

#[test]
fn teacher_forced_top1_matches_llamacpp() {
    let Some(loaded) = load(LoadOptions::default()) else {
        return;
    };
    let pool = ThreadPool::new(2).unwrap();
    // Whole sequences at once (the GEMM prefill path) and one token at a time (decode).
    for chunk in [usize::MAX, 1] {
        let (agree, total) = teacher_forced_agreement(&loaded, &pool, chunk);
        let share = agree as f64 / total as f64;
        eprintln!("chunk {chunk}: top-1 agreement {agree}/{total} = {share:.4}");
        assert!(
            share >= 0.98,
            "chunk {chunk}: top-1 agreement {share:.4} < 0.98"
        );
    }
}

#[test]
fn greedy_generation_reproduces_llamacpp() {
    let Some(loaded) = load(LoadOptions::default()) else {
        return;
    };
    let pool = ThreadPool::new(2).unwrap();
    for case in cases() {
        let options = GenerateOptions {
            max_tokens: case.greedy_ids.len(),
            sampling: SamplingParams::greedy(),
            ..GenerateOptions::default()
        };
        let mut ours = Vec::new();
        generate(&loaded.model, &pool, &case.prompt_ids, &options, |t| {
            ours.push(t);
            true
        })
        .unwrap();
        let n = 16.min(case.greedy_ids.len());
        assert_eq!(ours[..n], case.greedy_ids[..n], "first {n} greedy tokens");
        let same = ours
            .iter()
            .zip(&case.greedy_ids)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "greedy: {same}/{} tokens identical to llama.cpp",
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
    let (agree, total) = teacher_forced_agreement(&loaded, &pool, 64);
    let share = agree as f64 / total as f64;
    assert!(share >= 0.98, "top-1 agreement {share:.4} < 0.98");
}
