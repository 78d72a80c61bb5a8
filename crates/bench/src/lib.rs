//! `tandem bench`: load against any OpenAI-compatible endpoint (a tandem router or
//! worker, vLLM, anything else), measured with `vllm bench serve`'s definitions.
//!
//! - [`workload`]: what to send and when.
//! - [`client`]: one streamed request, timed.
//! - [`stats`]: records to metrics.
//! - [`report`]: the terminal table and the JSON file.

pub mod client;
pub mod report;
pub mod stats;
pub mod workload;

use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{Prompt, Target};
use stats::RequestRecord;

/// How a run sends its prompts.
#[derive(Debug, Clone)]
pub struct Traffic {
    /// Requests per second; `None` sends everything at once.
    pub request_rate: Option<f64>,
    pub burstiness: f64,
    /// Most requests in flight at once.
    pub max_concurrency: Option<usize>,
    pub seed: u64,
}

/// Sends every prompt per `traffic`; the records (in prompt order) and the run's wall
/// time in seconds.
pub async fn run(
    target: &Target,
    prompts: &[Prompt],
    traffic: &Traffic,
) -> (Vec<RequestRecord>, f64) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .build()
        .expect("an HTTP client builds");
    let arrivals = workload::arrivals(
        prompts.len(),
        traffic.request_rate,
        traffic.burstiness,
        traffic.seed,
    );
    let limit = Arc::new(tokio::sync::Semaphore::new(
        traffic.max_concurrency.unwrap_or(usize::MAX >> 4).max(1),
    ));
    let prefix = format!("bench-{:08x}-", rand::random::<u32>());
    let start = Instant::now();
    let tasks: Vec<_> = prompts
        .iter()
        .zip(arrivals)
        .enumerate()
        .map(|(i, (prompt, at))| {
            let (client, target, prompt, limit) = (
                client.clone(),
                target.clone(),
                prompt.clone(),
                limit.clone(),
            );
            let request_id = format!("{prefix}{i}");
            tokio::spawn(async move {
                tokio::time::sleep_until((start + Duration::from_secs_f64(at)).into()).await;
                let _permit = limit
                    .acquire_owned()
                    .await
                    .expect("the semaphore stays open");
                client::send(&client, &target, &prompt, &request_id, start).await
            })
        })
        .collect();
    let mut records = Vec::with_capacity(tasks.len());
    for task in tasks {
        records.push(task.await.unwrap_or_else(|e| RequestRecord {
            error: Some(format!("the request task failed: {e}")),
            ..Default::default()
        }));
    }
    (records, start.elapsed().as_secs_f64())
}
