//! The engine loop on the default model: concurrency must not change results (batching,
//! chunked prefill, prefix reuse and preemption are invisible in the tokens), and every
//! block is released however a request ends.

mod common;

use std::time::Duration;

use tandem_engine::LoadedModel;
use tandem_engine::generate::{GenerateOptions, generate};
use tandem_engine::kernels::ThreadPool;
use tandem_engine::model::LoadOptions;
use tandem_engine::sample::SamplingParams;
use tandem_engine::sched::{
    self, EngineConfig, EngineHandle, FinishReason, GenerationEvent, GenerationRequest, Usage,
};

const PROMPTS: [&str; 8] = [
    "What is a REST API?",
    "Explain database indexing.",
    "How does DNS work?",
    "What are microservices?",
    "Describe container orchestration.",
    "What is continuous integration?",
    "Explain message queues.",
    "How does caching improve performance?",
];

fn load() -> Option<LoadedModel> {
    let path = common::default_model()?;
    Some(LoadedModel::load(&path, LoadOptions::default()).expect("default model loads"))
}

fn prompt_ids(loaded: &LoadedModel, text: &str) -> Vec<u32> {
    loaded.tokenizer.encode(text, false).unwrap()
}

/// Greedy tokens for `prompt` generated alone, outside the engine loop.
fn alone(loaded: &LoadedModel, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let pool = ThreadPool::new(2).unwrap();
    let options = GenerateOptions {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ..GenerateOptions::default()
    };
    let mut out = Vec::new();
    generate(loaded.cpu(), &pool, prompt, &options, |t| {
        out.push(t);
        true
    })
    .unwrap();
    out
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        request_id: String::new(),
        prompt,
        sampling: SamplingParams::greedy(),
        max_tokens,
        stop_token_ids: Vec::new(),
        kv: Default::default(),
        constraint: None,
        prompt_logprobs: None,
        after_prompt_of: None,
    }
}

/// Runs requests concurrently and returns each one's tokens, finish reason and usage.
fn run_all(
    engine: &EngineHandle,
    requests: Vec<GenerationRequest>,
) -> Vec<(Vec<u32>, FinishReason, Usage)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tasks: Vec<_> = requests
            .into_iter()
            .map(|r| {
                let mut stream = engine.submit(r).unwrap();
                async move {
                    let mut tokens = Vec::new();
                    loop {
                        match stream.next().await {
                            Some(GenerationEvent::Token(t)) => tokens.push(t),
                            Some(GenerationEvent::Finished { reason, usage, .. }) => {
                                return (tokens, reason, usage);
                            }
                            other => panic!("unexpected event {other:?}"),
                        }
                    }
                }
            })
            .collect();
        futures_util::future::join_all(tasks).await
    })
}

/// Waits for the engine to go idle and returns its stats.
fn idle_stats(engine: &EngineHandle) -> sched::EngineStats {
    for _ in 0..200 {
        let stats = engine.stats();
        if stats.running == 0 && stats.waiting == 0 {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("engine did not go idle: {:?}", engine.stats());
}

/// An engine on its own copy of the model (the test keeps `LoadedModel` for reference
/// runs and tokenization).
fn spawn(config: EngineConfig) -> EngineHandle {
    let model = load().expect("checked by the caller").model;
    sched::spawn(model, config).unwrap()
}

#[test]
fn sixteen_concurrent_requests_match_each_alone() {
    let Some(loaded) = load() else { return };
    // A small token budget forces chunked prefill next to running decodes.
    let config = EngineConfig {
        max_num_batched_tokens: 24,
        threads: Some(2),
        max_model_len: 2048,
        kv_cache_memory: 64 << 20,
        ..EngineConfig::default()
    };
    let engine = spawn(config);
    let cases: Vec<(Vec<u32>, usize)> = (0..16)
        .map(|i| (prompt_ids(&loaded, PROMPTS[i % 8]), 6 + i % 5))
        .collect();
    let expected: Vec<Vec<u32>> = cases.iter().map(|(p, n)| alone(&loaded, p, *n)).collect();
    let results = run_all(
        &engine,
        cases.iter().map(|(p, n)| request(p.clone(), *n)).collect(),
    );
    for (i, ((tokens, reason, usage), want)) in results.iter().zip(&expected).enumerate() {
        assert_eq!(tokens, want, "request {i}");
        assert_eq!(*reason, FinishReason::Length);
        assert_eq!(usage.completion_tokens, want.len());
        assert_eq!(usage.prompt_tokens, cases[i].0.len());
    }
    let stats = idle_stats(&engine);
    assert_eq!(stats.kv_usage, 0.0, "every block released");
}

#[test]
fn a_shared_prefix_is_served_from_the_cache() {
    let Some(loaded) = load() else { return };
    let engine = spawn(EngineConfig {
        threads: Some(2),
        max_model_len: 2048,
        kv_cache_memory: 64 << 20,
        ..EngineConfig::default()
    });
    let system = "You are a terse assistant for a systems engineering team. Answer in one sentence, \
                  name the key mechanism, and avoid marketing language. ";
    let first = prompt_ids(&loaded, &format!("{system}{}", PROMPTS[0]));
    let second = prompt_ids(&loaded, &format!("{system}{}", PROMPTS[1]));
    let (_, _, usage) = run_all(&engine, vec![request(first, 4)]).remove(0);
    assert_eq!(usage.cached_tokens, 0);
    let (tokens, _, usage) = run_all(&engine, vec![request(second.clone(), 4)]).remove(0);
    assert!(
        usage.cached_tokens >= 16,
        "cached {} tokens",
        usage.cached_tokens
    );
    assert_eq!(
        tokens,
        alone(&loaded, &second, 4),
        "cached prefix gives the same tokens"
    );
    let stats = idle_stats(&engine);
    assert!(stats.prefix_cache_hits >= 16);
    assert_eq!(stats.kv_usage, 0.0);
}

#[test]
fn preemption_under_a_tiny_kv_budget_keeps_results() {
    let Some(loaded) = load() else { return };
    let max_model_len = 96;
    // Room for a little more than one full-length sequence, so 8 concurrent ones must
    // take turns.
    let layout = loaded.model.kv_layout(Default::default());
    let config = EngineConfig {
        threads: Some(2),
        max_model_len,
        kv_cache_memory: layout.bytes_per_block() * (max_model_len / 16 + 2),
        ..EngineConfig::default()
    };
    let engine = spawn(config);
    let cases: Vec<(Vec<u32>, usize)> = PROMPTS
        .iter()
        .map(|p| (prompt_ids(&loaded, p), 40))
        .collect();
    let expected: Vec<Vec<u32>> = cases.iter().map(|(p, n)| alone(&loaded, p, *n)).collect();
    let results = run_all(
        &engine,
        cases.iter().map(|(p, n)| request(p.clone(), *n)).collect(),
    );
    for (i, ((tokens, _, _), want)) in results.iter().zip(&expected).enumerate() {
        assert_eq!(tokens, want, "request {i}");
    }
    let stats = idle_stats(&engine);
    assert!(
        stats.preemptions > 0,
        "the budget should have forced preemption"
    );
    assert_eq!(stats.kv_usage, 0.0);
}

#[test]
fn dropping_a_stream_cancels_and_frees_its_blocks() {
    let Some(loaded) = load() else { return };
    let engine = spawn(EngineConfig {
        threads: Some(2),
        max_model_len: 2048,
        kv_cache_memory: 64 << 20,
        ..EngineConfig::default()
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut stream = engine
            .submit(request(prompt_ids(&loaded, PROMPTS[2]), 1000))
            .unwrap();
        assert!(matches!(
            stream.next().await,
            Some(GenerationEvent::Token(_))
        ));
        drop(stream);
    });
    let stats = idle_stats(&engine);
    assert_eq!(stats.kv_usage, 0.0);
}

#[test]
fn impossible_requests_fail_cleanly() {
    if common::default_model().is_none() {
        return;
    }
    let engine = spawn(EngineConfig {
        threads: Some(1),
        max_model_len: 64,
        kv_cache_memory: 8 << 20,
        ..EngineConfig::default()
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        for bad in [
            request(vec![1; 10], 60),
            request(vec![], 4),
            request(vec![1_000_000], 4),
        ] {
            let mut stream = engine.submit(bad).unwrap();
            assert!(matches!(
                stream.next().await,
                Some(GenerationEvent::Failed(_))
            ));
        }
    });
    assert!(engine.is_alive());
}
