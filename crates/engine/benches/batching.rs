//! Continuous batching in the engine loop, on the default model, each figure against
//! its baseline in the same run:
//!
//! 1. aggregate decode throughput of 8 concurrent greedy streams vs 1 stream;
//! 2. time to first token of a 128-token prompt while 7 streams decode vs on an idle
//!    engine.
//!
//! `cargo bench -p tandem-engine --bench batching` (`TANDEM_BENCH_THREADS`, default 2;
//! `TANDEM_CPU_KERNELS` picks the kernel family, printed first).

#[path = "common/env.rs"]
mod env;

use std::time::{Duration, Instant};

use tandem_engine::LoadedModel;
use tandem_engine::fetch;
use tandem_engine::model::LoadOptions;
use tandem_engine::sample::SamplingParams;
use tandem_engine::sched::{self, EngineConfig, EngineHandle, GenerationEvent, GenerationRequest};

const DECODE_TOKENS: usize = 128;
const STREAMS: usize = 8;

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

/// Runs `streams` concurrent requests to completion; returns generated tokens per second.
async fn decode_throughput(engine: &EngineHandle, prompts: &[Vec<u32>], streams: usize) -> f64 {
    let started = Instant::now();
    let tasks = (0..streams).map(|i| {
        let mut stream = engine
            .submit(request(prompts[i % prompts.len()].clone(), DECODE_TOKENS))
            .unwrap();
        async move {
            let mut n = 0;
            while let Some(event) = stream.next().await {
                match event {
                    GenerationEvent::Token(_) | GenerationEvent::TokenWithLogprobs(..) => n += 1,
                    GenerationEvent::Finished { .. } => break,
                    GenerationEvent::PromptLogprobs(_) => {}
                    GenerationEvent::Failed(e) => panic!("{e}"),
                }
            }
            n
        }
    });
    let total: usize = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .sum();
    total as f64 / started.elapsed().as_secs_f64()
}

/// Time from submitting `prompt` to its first token.
async fn ttft(engine: &EngineHandle, prompt: Vec<u32>) -> Duration {
    let started = Instant::now();
    let mut stream = engine.submit(request(prompt, 1)).unwrap();
    match stream.next().await {
        Some(GenerationEvent::Token(_)) => started.elapsed(),
        other => panic!("unexpected {other:?}"),
    }
}

fn main() {
    let threads = env::env_usize("TANDEM_BENCH_THREADS", 2);
    let kernels = tandem_engine::kernels::dispatch::selected().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1);
    });
    println!("CPU kernels: {}", kernels.describe());
    let path = fetch::default_model_path();
    let loaded = LoadedModel::load(&path, LoadOptions::default())
        .expect("default model (tandem model fetch)");
    let prompts: Vec<Vec<u32>> = [
        "What is a REST API?",
        "Explain database indexing.",
        "How does DNS work?",
        "What are microservices?",
    ]
    .iter()
    .map(|p| loaded.tokenizer.encode(p, false).unwrap())
    .collect();
    let long_prompt: Vec<u32> = loaded
        .tokenizer
        .encode(
            &"Describe how a load balancer spreads requests. ".repeat(20),
            false,
        )
        .unwrap()[..128]
        .to_vec();
    let config = EngineConfig {
        threads: Some(threads),
        max_model_len: 4096,
        kv_cache_memory: 256 << 20,
        // The cached prefix would make repeated TTFT runs trivially fast.
        prefix_caching: false,
        ..EngineConfig::default()
    };
    let engine = sched::spawn(loaded.model, config).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        decode_throughput(&engine, &prompts, 1).await; // warm-up
        let single = best_of(3, || decode_throughput(&engine, &prompts, 1)).await;
        let batched = best_of(3, || decode_throughput(&engine, &prompts, STREAMS)).await;
        println!(
            "decode: 1 stream {single:.1} tok/s | {STREAMS} streams {batched:.1} tok/s aggregate | ratio {:.2}x (target >= 4x)",
            batched / single
        );

        let mut idle = Duration::MAX;
        for _ in 0..5 {
            idle = idle.min(ttft(&engine, long_prompt.clone()).await);
        }
        let mut busy = Duration::MAX;
        for _ in 0..5 {
            // 7 long decodes in flight, then the 128-token prompt arrives.
            let background: Vec<_> = (0..7)
                .map(|i| engine.submit(request(prompts[i % prompts.len()].clone(), 1000)).unwrap())
                .collect();
            tokio::time::sleep(Duration::from_millis(200)).await;
            busy = busy.min(ttft(&engine, long_prompt.clone()).await);
            drop(background);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "TTFT of a 128-token prompt: idle {:.1} ms | with 7 decodes running {:.1} ms | ratio {:.2}x (target <= 1.5x)",
            idle.as_secs_f64() * 1e3,
            busy.as_secs_f64() * 1e3,
            busy.as_secs_f64() / idle.as_secs_f64()
        );
    });
}

async fn best_of<F, Fut>(runs: usize, mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let mut best: f64 = 0.0;
    for _ in 0..runs {
        best = best.max(f().await);
    }
    best
}
