//! Request migration with real processes: a decode worker is SIGKILLed while it
//! streams 16 greedy answers, and every client still gets the text an undisturbed
//! run gives, because the router continues each answer on another worker from the
//! tokens already sent (`--migration-limit`). The undisturbed texts are the same
//! requests through the same router before the kill.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Server, default_model_present, metric_with};
use futures_util::StreamExt;
use serde_json::{Value, json};

const ADMIN: &str = "admin-secret";
const STREAMS: usize = 16;

/// What a client made of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
struct Streamed {
    text: String,
    /// `token_ids` of every chunk, in order (when asked for).
    token_ids: Vec<u64>,
    prompt_token_ids: Vec<Value>,
    finish_reason: Value,
    /// Prompt and completion tokens of the usage chunk.
    usage: (u64, u64),
    errors: Vec<Value>,
}

/// Reads a streamed answer; `progress` counts its chunks with text as they come.
async fn stream(router: &Server, path: &str, body: Value, progress: &AtomicUsize) -> Streamed {
    let response = router
        .client
        .post(router.url(path))
        .json(&body)
        .send()
        .await
        .expect("the router answers");
    assert_eq!(response.status(), 200);
    let mut answer = Streamed {
        text: String::new(),
        token_ids: Vec::new(),
        prompt_token_ids: Vec::new(),
        finish_reason: Value::Null,
        usage: (0, 0),
        errors: Vec::new(),
    };
    let mut pending = String::new();
    let mut bytes = response.bytes_stream();
    let mut done = false;
    while let Some(chunk) = bytes.next().await {
        pending.push_str(std::str::from_utf8(&chunk.expect("the stream reads")).unwrap());
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let data = event.trim().strip_prefix("data: ").expect("a data event");
            assert!(!done, "an event after [DONE]: {data}");
            if data == "[DONE]" {
                done = true;
                continue;
            }
            read_chunk(&mut answer, serde_json::from_str(data).unwrap());
            progress.store(answer.text.len(), Ordering::SeqCst);
        }
    }
    assert!(done, "the stream ended without [DONE]");
    answer
}

fn read_chunk(answer: &mut Streamed, chunk: Value) {
    if chunk.get("error").is_some() {
        answer.errors.push(chunk);
        return;
    }
    if let Some(ids) = chunk.get("prompt_token_ids") {
        answer.prompt_token_ids.push(ids.clone());
    }
    if let Some(usage) = chunk.get("usage") {
        answer.usage = (
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["completion_tokens"].as_u64().unwrap(),
        );
    }
    for choice in chunk["choices"].as_array().unwrap() {
        let text = choice["text"]
            .as_str()
            .or_else(|| choice["delta"]["content"].as_str());
        answer.text.push_str(text.unwrap_or(""));
        if let Some(ids) = choice.get("prompt_token_ids").filter(|ids| !ids.is_null()) {
            answer.prompt_token_ids.push(ids.clone());
        }
        if let Some(ids) = choice.get("token_ids").and_then(Value::as_array) {
            answer
                .token_ids
                .extend(ids.iter().map(|id| id.as_u64().unwrap()));
        }
        if !choice["finish_reason"].is_null() {
            answer.finish_reason = choice["finish_reason"].clone();
        }
    }
}

fn chat(animal: &str) -> Value {
    json!({"messages": [{"role": "user", "content": format!("Write a short story about a {animal}.")}],
           "max_tokens": 64, "temperature": 0, "stream": true,
           "stream_options": {"include_usage": true}})
}

const ANIMALS: [&str; STREAMS] = [
    "cat", "dog", "fox", "owl", "bee", "ant", "elk", "yak", "cow", "pig", "hen", "rat", "bat",
    "eel", "emu", "gnu",
];

/// Streams running at once.
struct Running {
    tasks: Vec<tokio::task::JoinHandle<Streamed>>,
    /// Text bytes each answer has so far.
    progress: Arc<Vec<AtomicUsize>>,
    finished: Arc<AtomicUsize>,
}

impl Running {
    fn start(router: &Arc<Server>, path: &'static str, bodies: Vec<Value>) -> Self {
        let progress: Arc<Vec<AtomicUsize>> =
            Arc::new((0..bodies.len()).map(|_| AtomicUsize::new(0)).collect());
        let finished = Arc::new(AtomicUsize::new(0));
        let tasks = bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| {
                let (router, progress, finished) =
                    (router.clone(), progress.clone(), finished.clone());
                tokio::spawn(async move {
                    let answer = stream(&router, path, body, &progress[i]).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                    answer
                })
            })
            .collect();
        Self {
            tasks,
            progress,
            finished,
        }
    }

    /// Waits until every answer has some text; how many are unfinished then.
    async fn midway(&self) -> usize {
        while self.progress.iter().any(|p| p.load(Ordering::SeqCst) < 8) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.tasks.len() - self.finished.load(Ordering::SeqCst)
    }

    async fn answers(self) -> Vec<Streamed> {
        let mut answers = Vec::new();
        for task in self.tasks {
            answers.push(task.await.unwrap());
        }
        answers
    }
}

/// The answers to `bodies` through `router` undisturbed, then again while the doomed
/// worker (alone in its pool when they start) dies mid-stream and `spare` joins as
/// `role`; and how many answers were unfinished at the kill.
async fn undisturbed_then_killed(
    router: &Arc<Server>,
    path: &'static str,
    bodies: impl Fn() -> Vec<Value>,
    doomed: &mut Server,
    spare: &Server,
    role: &str,
) -> (Vec<Streamed>, Vec<Streamed>, usize) {
    let undisturbed = Running::start(router, path, bodies()).answers().await;
    let running = Running::start(router, path, bodies());
    let unfinished = running.midway().await;
    add_worker(router, &spare.url(""), role).await;
    kill(doomed);
    (undisturbed, running.answers().await, unfinished)
}

async fn add_worker(router: &Server, url: &str, role: &str) {
    let added = router
        .client
        .post(router.url("/workers"))
        .bearer_auth(ADMIN)
        .json(&json!({"url": url, "role": role}))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 201);
}

/// SIGKILL: no drain, no goodbye; its connections reset mid-stream.
fn kill(server: &mut Server) {
    server.child.kill().unwrap();
    server.child.wait().unwrap();
}

async fn migrations(router: &Server, outcome: &str) -> f64 {
    let metrics = router.metrics().await;
    metric_with(
        &metrics,
        "tandem_router_migrations_total",
        &[("outcome", outcome)],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_decode_worker_mid_stream_leaves_every_client_its_undisturbed_answer() {
    if !default_model_present() {
        return;
    }
    let prefill = Server::start(&["--threads", "1", "--kv-port", "0"]);
    let mut doomed = Server::start(&["--threads", "1"]);
    let spare = Server::start(&["--threads", "1"]);
    let router = Arc::new(Server::start_router(&[
        "--prefill",
        &prefill.url(""),
        "--decode",
        &doomed.url(""),
        "--migration-limit",
        "1",
        "--admin-token",
        ADMIN,
    ]));
    let bodies = || ANIMALS.iter().map(|animal| chat(animal)).collect();
    let (undisturbed, answers, unfinished) = undisturbed_then_killed(
        &router,
        "/v1/chat/completions",
        bodies,
        &mut doomed,
        &spare,
        "decode",
    )
    .await;

    assert_eq!(
        unfinished, STREAMS,
        "every answer was mid-stream at the kill"
    );
    for (animal, (before, after)) in ANIMALS.iter().zip(undisturbed.iter().zip(&answers)) {
        assert!(after.errors.is_empty(), "{animal}: {:?}", after.errors);
        assert_eq!(after.text, before.text, "{animal}");
        assert_eq!(after.finish_reason, before.finish_reason, "{animal}");
        assert_eq!(
            after.usage, before.usage,
            "{animal}: usage over the whole answer"
        );
        // The router asked for token ids; the client did not, and sees none.
        assert!(after.prompt_token_ids.is_empty() && after.token_ids.is_empty());
    }
    assert_eq!(migrations(&router, "resumed").await, STREAMS as f64);
    let metrics = router.metrics().await;
    let handed_off = metric_with(
        &metrics,
        "tandem_router_disagg_decisions_total",
        &[("decision", "remote")],
    )
    .unwrap_or(0.0);
    assert_eq!(
        handed_off,
        2.0 * STREAMS as f64,
        "every request went through P and D"
    );
}

/// A replicated router (flags `extra`) over a doomed worker, and a spare worker it
/// does not know yet.
fn replicated_with_spare(extra: &[&str]) -> (Server, Server, Arc<Server>) {
    let doomed = Server::start(&["--threads", "1"]);
    let spare = Server::start(&["--threads", "1"]);
    let url = doomed.url("");
    let mut args = vec!["--worker", &url, "--admin-token", ADMIN];
    args.extend_from_slice(extra);
    let router = Arc::new(Server::start_router(&args));
    (doomed, spare, router)
}

/// The fixture's cases: prompt text, llama.cpp's prompt ids and greedy ids.
fn fixture_cases() -> Vec<(String, Vec<u64>, Vec<u64>)> {
    let fixture = common::llamacpp_fixture();
    fixture["generation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let ids = |key: &str| serde_json::from_value(case[key].clone()).unwrap();
            let prompt = case["prompt"].as_str().unwrap().to_owned();
            (prompt, ids("prompt_ids"), ids("greedy_ids"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migrated_completion_keeps_the_token_ids_a_client_asked_for() {
    if !default_model_present() {
        return;
    }
    let (mut doomed, spare, router) = replicated_with_spare(&["--migration-limit", "1"]);
    let cases = fixture_cases();
    let mut prompts: Vec<String> = cases.iter().map(|case| case.0.clone()).collect();
    prompts.extend(
        ANIMALS[..5]
            .iter()
            .map(|a| format!("Once upon a time, a {a}")),
    );
    let bodies = || {
        prompts
            .iter()
            .map(|prompt| {
                json!({"prompt": prompt, "max_tokens": 48, "temperature": 0, "stream": true,
                       "return_token_ids": true, "stream_options": {"include_usage": true}})
            })
            .collect()
    };
    let (undisturbed, answers, unfinished) = undisturbed_then_killed(
        &router,
        "/v1/completions",
        bodies,
        &mut doomed,
        &spare,
        "both",
    )
    .await;

    assert_eq!(
        unfinished,
        prompts.len(),
        "every answer was mid-stream at the kill"
    );
    for (i, (before, after)) in undisturbed.iter().zip(&answers).enumerate() {
        assert!(after.errors.is_empty(), "{i}: {:?}", after.errors);
        assert_eq!(
            after, before,
            "{i}: text, ids, usage as if nothing happened"
        );
        assert_eq!(
            after.prompt_token_ids.len(),
            1,
            "{i}: the prompt's ids come once"
        );
        assert_eq!(
            after.token_ids.len() as u64,
            after.usage.1,
            "{i}: an id per token"
        );
        // The ids are the text's: the worker turns them back into it.
        let (status, text) = spare
            .post("/detokenize", &json!({"tokens": after.token_ids}))
            .await;
        assert_eq!(status, 200);
        assert_eq!(text["prompt"], after.text, "{i}");
    }
    for ((_, prompt_ids, greedy_ids), answer) in cases.iter().zip(&answers) {
        // llama.cpp's tokenization, and its first greedy tokens (later ones may
        // differ where two logits nearly tie; the engine's fixture test covers that).
        assert_eq!(answer.prompt_token_ids[0], json!(prompt_ids));
        assert_eq!(answer.token_ids[..3], greedy_ids[..3]);
    }
    assert_eq!(migrations(&router, "resumed").await, prompts.len() as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_answer_whose_worker_dies_is_run_again_on_another() {
    if !default_model_present() {
        return;
    }
    let (mut doomed, spare, router) = replicated_with_spare(&[]);
    let body = |animal: &str| {
        json!({"prompt": format!("Once upon a time, a {animal}"), "max_tokens": 96,
               "temperature": 0})
    };
    let animals = &ANIMALS[..4];
    let mut undisturbed = Vec::new();
    for animal in animals {
        undisturbed.push(router.post("/v1/completions", &body(animal)).await);
    }
    let requests: Vec<_> = animals
        .iter()
        .map(|animal| {
            let (router, body) = (router.clone(), body(animal));
            tokio::spawn(async move { router.post("/v1/completions", &body).await })
        })
        .collect();
    // Kill once the doomed worker runs all four.
    loop {
        let metrics = doomed.metrics().await;
        if common::metric_value(&metrics, "vllm:num_requests_running") == Some(4.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    add_worker(&router, &spare.url(""), "both").await;
    kill(&mut doomed);
    for (request, (status, before)) in requests.into_iter().zip(undisturbed) {
        let (after_status, after) = request.await.unwrap();
        assert_eq!((after_status, status), (200, 200), "{after}");
        assert_eq!(common::text_of(&after), common::text_of(&before));
        assert_eq!(
            after["usage"]["completion_tokens"],
            before["usage"]["completion_tokens"]
        );
    }
    let metrics = router.metrics().await;
    let retried = metric_with(&metrics, "tandem_router_retries_total", &[("leg", "whole")]);
    assert_eq!(retried, Some(4.0), "each request ran again, once");
}
