//! `tandem bench` and `tandem compare`: load against any OpenAI-compatible endpoint (a
//! tandem router or worker, vLLM, anything else), measured with `vllm bench serve`'s
//! definitions, and the three-way comparison's report.
//!
//! - [`workload`]: what to send and when.
//! - [`tokens`]: random prompts of exact token counts, as vLLM draws them, and the
//!   tokenizer (local or the server's) they are counted in.
//! - [`client`]: one streamed request, timed.
//! - [`stats`]: records to metrics.
//! - [`report`]: the terminal table, the JSON document and markdown of one run.
//! - [`suite`]: the scenarios a comparison runs (TOML).
//! - [`comparison`]: a comparison's results, `report.md` and `results.json`.
//! - [`handoff`]: the KV hand-off's bytes and time in a run, from the workers' metrics.
//! - [`plot`]: its charts, PNG and SVG.
//! - [`rounds`]: a comparison run several times, each run's figures merged into their
//!   median and range.
//! - [`timeline`]: one run over time (latencies by send time, the P/D layout, the
//!   planner's moves).
//! - [`profile`]: a planner profile measured against running endpoints.
//! - [`validate`]: the planner's predictions against a comparison's measurements.

pub mod client;
pub mod comparison;
pub mod handoff;
pub mod plot;
pub mod profile;
pub mod report;
pub mod rounds;
pub mod stats;
pub mod suite;
pub mod timeline;
pub mod tokens;
pub mod validate;
pub mod workload;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use client::{Prompt, Target};
use indicatif::{ProgressBar, ProgressStyle};
use stats::RequestRecord;
use workload::Conversation;

/// How a run sends its conversations.
#[derive(Debug, Clone)]
pub struct Traffic {
    /// Conversations started per second; `None` starts everything at once.
    pub request_rate: Option<f64>,
    pub burstiness: f64,
    /// Most conversations in flight at once (for single-turn workloads: requests).
    pub max_concurrency: Option<usize>,
    pub seed: u64,
}

/// A progress bar on stderr (drawn only when stderr is a terminal), one tick per
/// finished request.
#[derive(Clone)]
pub struct Progress(ProgressBar);

impl Progress {
    pub fn stderr(requests: usize, label: &str) -> Self {
        let bar = ProgressBar::new(requests as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} requests, {msg} {elapsed_precise}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_owned());
        bar.set_message("0 failed");
        Self(bar)
    }

    pub fn hidden() -> Self {
        Self(ProgressBar::hidden())
    }

    fn finished(&self, record: &RequestRecord, failed_so_far: usize) {
        if !record.ok {
            self.0.set_message(format!("{failed_so_far} failed"));
        }
        self.0.inc(1);
    }

    pub fn done(&self) {
        self.0.finish_and_clear();
    }
}

/// Sends single-turn prompts per `traffic`; the records (in prompt order) and the run's
/// wall time in seconds.
pub async fn run(
    target: &Target,
    prompts: &[Prompt],
    traffic: &Traffic,
    progress: &Progress,
) -> (Vec<RequestRecord>, f64) {
    let conversations: Vec<Conversation> = prompts
        .iter()
        .map(|p| Conversation {
            turns: vec![p.clone()],
        })
        .collect();
    run_conversations(target, &conversations, traffic, progress).await
}

/// Sends conversations per `traffic`: each starts at its arrival time and holds one
/// concurrency slot while its turns go one after another, each turn's prompt being the
/// transcript so far (earlier prompts and answers) followed by the new turn. Records are
/// in conversation order, turn by turn; a failed turn ends its conversation (the turns
/// left are counted as failed).
pub async fn run_conversations(
    target: &Target,
    conversations: &[Conversation],
    traffic: &Traffic,
    progress: &Progress,
) -> (Vec<RequestRecord>, f64) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .build()
        .expect("an HTTP client builds");
    let arrivals = workload::arrivals(
        conversations.len(),
        traffic.request_rate,
        traffic.burstiness,
        traffic.seed,
    );
    let limit = Arc::new(tokio::sync::Semaphore::new(
        traffic.max_concurrency.unwrap_or(usize::MAX >> 4).max(1),
    ));
    let failed = Arc::new(AtomicUsize::new(0));
    let prefix = format!("bench-{:08x}-", rand::random::<u32>());
    let start = Instant::now();
    let tasks: Vec<_> = conversations
        .iter()
        .zip(arrivals)
        .enumerate()
        .map(|(i, (conversation, at))| {
            let session = Session {
                client: client.clone(),
                target: target.clone(),
                conversation: conversation.clone(),
                request_id: format!("{prefix}{i}"),
                start,
                progress: progress.clone(),
                failed: failed.clone(),
            };
            let limit = limit.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until((start + Duration::from_secs_f64(at)).into()).await;
                let _permit = limit
                    .acquire_owned()
                    .await
                    .expect("the semaphore stays open");
                session.run().await
            })
        })
        .collect();
    let mut records = Vec::new();
    for (task, conversation) in tasks.into_iter().zip(conversations) {
        match task.await {
            Ok(turns) => records.extend(turns),
            Err(e) => records.extend(conversation.turns.iter().map(|_| RequestRecord {
                error: Some(format!("the request task failed: {e}")),
                ..Default::default()
            })),
        }
    }
    (records, start.elapsed().as_secs_f64())
}

/// One conversation's turns, sent in order.
struct Session {
    client: reqwest::Client,
    target: Target,
    conversation: Conversation,
    request_id: String,
    start: Instant,
    progress: Progress,
    failed: Arc<AtomicUsize>,
}

impl Session {
    async fn run(self) -> Vec<RequestRecord> {
        let mut records = Vec::with_capacity(self.conversation.turns.len());
        let mut transcript = String::new();
        for (t, turn) in self.conversation.turns.iter().enumerate() {
            if records.last().is_some_and(|r: &RequestRecord| !r.ok) {
                records.push(RequestRecord {
                    error: Some("an earlier turn of its conversation failed".into()),
                    ..Default::default()
                });
                self.count(records.last());
                continue;
            }
            if !transcript.is_empty() {
                transcript.push_str("\n\n");
            }
            transcript.push_str(&turn.text);
            let prompt = Prompt {
                text: transcript.clone(),
                max_tokens: turn.max_tokens,
            };
            let request_id = format!("{}-{t}", self.request_id);
            let record =
                client::send(&self.client, &self.target, &prompt, &request_id, self.start).await;
            transcript.push_str(&record.text);
            records.push(record);
            self.count(records.last());
        }
        records
    }

    fn count(&self, record: Option<&RequestRecord>) {
        if let Some(record) = record {
            let failed = self
                .failed
                .fetch_add(usize::from(!record.ok), Ordering::Relaxed)
                + usize::from(!record.ok);
            self.progress.finished(record, failed);
        }
    }
}
