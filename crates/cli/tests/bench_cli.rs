//! `tandem bench` against a real `tandem serve`: every request accounted for, token
//! counts exact, JSON with vllm bench serve's keys; failures counted, never dropped.

mod common;

use common::{Server, default_model_present, free_port, metric_value, tandem};
use serde_json::Value;

fn bench(args: &[&str]) -> (std::process::Output, Value) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.json");
    let output = tandem()
        .arg("bench")
        .args(args)
        .args(["--json", file.to_str().unwrap(), "--save-detailed"])
        .output()
        .unwrap();
    let json = std::fs::read_to_string(&file)
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap_or(Value::Null);
    (output, json)
}

#[test]
fn a_random_workload_is_measured_whole() {
    if !default_model_present() {
        return;
    }
    let server = Server::start(&["--threads", "2", "--kv-cache-memory", "128MiB"]);
    let url = server.url("");
    let args = [
        "--url",
        &url,
        "--workload",
        "random",
        "--num-prompts",
        "6",
        "--input-len",
        "20",
        "--output-len",
        "5",
        "--max-concurrency",
        "3",
        "--request-rate",
        "50",
    ];
    let (output, report) = bench(&args);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(report["completed"], 6, "{report}");
    assert_eq!(report["failed"], 0);
    assert_eq!(
        report["total_output_tokens"], 30,
        "ignore_eos: exactly 5 each"
    );
    assert_eq!(report["itls"].as_array().unwrap().len(), 6);
    assert!(report["mean_ttft_ms"].as_f64().unwrap() > 0.0);
    assert!(report["p99_tpot_ms"].as_f64().unwrap() > 0.0);
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains("Successful requests:") && table.contains("P99 ITL (ms)"),
        "{table}"
    );
    // The server counted exactly the tokens the benchmark reports.
    let metrics = server.metrics_blocking();
    let counted = |name| metric_value(&metrics, name).unwrap_or(-1.0);
    assert_eq!(
        counted("vllm:generation_tokens_total"),
        report["total_output_tokens"].as_f64().unwrap()
    );
    assert_eq!(
        counted("vllm:prompt_tokens_total"),
        report["total_input_tokens"].as_f64().unwrap()
    );
    // The reported percentiles are numpy's on the saved per-request records.
    let ttfts_ms: Vec<f64> = report["ttfts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap() * 1e3)
        .collect();
    let itls_ms: Vec<f64> = report["itls"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_f64().unwrap() * 1e3)
        })
        .collect();
    for (p, key) in [
        (50.0, "p50_ttft_ms"),
        (90.0, "p90_ttft_ms"),
        (99.0, "p99_ttft_ms"),
    ] {
        assert_close(numpy_percentile(&ttfts_ms, p), &report[key], key);
    }
    for (p, key) in [
        (50.0, "p50_itl_ms"),
        (95.0, "p95_itl_ms"),
        (99.0, "p99_itl_ms"),
    ] {
        assert_close(numpy_percentile(&itls_ms, p), &report[key], key);
    }
    // E2EL and TPOT from the records too: vLLM's TPOT is (e2el - ttft) / (output - 1),
    // over the requests that succeeded (empty `errors` entry) with 2+ output tokens.
    let column = |key: &str| -> Vec<f64> {
        report[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} in {report}"))
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let (ttfts, e2els, outputs) = (column("ttfts"), column("e2els"), column("output_lens"));
    let ok: Vec<bool> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str() == Some(""))
        .collect();
    assert_eq!(e2els.len(), 6);
    let e2els_ms: Vec<f64> = (0..6).filter(|&i| ok[i]).map(|i| e2els[i] * 1e3).collect();
    let tpots_ms: Vec<f64> = (0..6)
        .filter(|&i| ok[i] && outputs[i] > 1.0)
        .map(|i| (e2els[i] - ttfts[i]) / (outputs[i] - 1.0) * 1e3)
        .collect();
    assert_eq!(tpots_ms.len(), 6);
    for (p, name) in [(50.0, "p50"), (90.0, "p90"), (99.0, "p99")] {
        let key = format!("{name}_e2el_ms");
        assert_close(numpy_percentile(&e2els_ms, p), &report[&key], &key);
        let key = format!("{name}_tpot_ms");
        assert_close(numpy_percentile(&tpots_ms, p), &report[&key], &key);
    }
    assert_close(
        tpots_ms.iter().sum::<f64>() / 6.0,
        &report["mean_tpot_ms"],
        "mean_tpot_ms",
    );
    // Every record's end comes after its first token, which comes after sending.
    for i in 0..6 {
        assert!(e2els[i] >= ttfts[i] && ttfts[i] > 0.0, "{report}");
    }
}

/// `numpy.percentile(values, p)` (linear interpolation), written out independently.
fn numpy_percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let position = (sorted.len() - 1) as f64 * p / 100.0;
    let below = sorted[position.floor() as usize];
    let above = sorted[position.ceil() as usize];
    below + (above - below) * position.fract()
}

fn assert_close(expected: f64, reported: &Value, key: &str) {
    let reported = reported.as_f64().unwrap_or(f64::NAN);
    assert!(
        (expected - reported).abs() <= 1e-9 * expected.abs().max(1.0),
        "{key}: {reported} reported, {expected} computed"
    );
}

#[test]
fn multi_turn_conversations_carry_their_transcripts() {
    if !default_model_present() {
        return;
    }
    let server = Server::start(&["--threads", "2", "--kv-cache-memory", "128MiB"]);
    let url = server.url("");
    let args = [
        "--url",
        &url,
        "--workload",
        "multi-turn",
        "--num-prompts",
        "3",
        "--turns",
        "3",
        "--prefix-len",
        "40",
        "--input-len",
        "6",
        "--output-len",
        "4",
        "--max-concurrency",
        "2",
    ];
    let (output, report) = bench(&args);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(report["completed"], 9, "{report}");
    assert_eq!(report["total_output_tokens"], 36);
    // Records are conversation by conversation, turn by turn: every turn's prompt holds
    // the previous turn's prompt and answer, so it is longer.
    let input_lens: Vec<u64> = report["input_lens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    for conversation in input_lens.chunks(3) {
        assert!(
            conversation[1] > conversation[0] + 4 && conversation[2] > conversation[1] + 4,
            "{input_lens:?}"
        );
    }
    // Later turns found their transcript in the prefix cache.
    let hits =
        metric_value(&server.metrics_blocking(), "vllm:prefix_cache_hits_total").unwrap_or(0.0);
    assert!(hits >= 6.0 * 32.0, "{hits}");
}

#[test]
fn failed_requests_are_counted() {
    // A port nothing listens on.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let (output, report) = bench(&["--url", &url, "--workload", "seed-batch"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(report["completed"], 0);
    assert_eq!(report["failed"], 8);
    assert_eq!(report["errors"].as_array().unwrap().len(), 8);
}

#[test]
fn a_concurrency_sweep_reports_every_point() {
    if !default_model_present() {
        return;
    }
    let server = Server::start(&["--threads", "2", "--kv-cache-memory", "128MiB"]);
    let url = server.url("");
    let dir = tempfile::tempdir().unwrap();
    let markdown = dir.path().join("report.md");
    let args = [
        "--url",
        &url,
        "--workload",
        "shared-prefix",
        "--num-prompts",
        "4",
        "--prefix-len",
        "40",
        "--input-len",
        "8",
        "--output-len",
        "3",
        "--sweep-concurrency",
        "1,4",
        "--markdown",
        markdown.to_str().unwrap(),
    ];
    let (output, report) = bench(&args);
    assert!(output.status.success(), "{output:?}");
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        assert_eq!(run["completed"], 4, "{run}");
        assert_eq!(run["total_output_tokens"], 12);
    }
    assert_eq!(runs[0]["max_concurrency"], 1);
    let text = std::fs::read_to_string(markdown).unwrap();
    assert!(text.contains("| concurrency | req/s |"), "{text}");
    // The shared prefix was served from the prefix cache after the first request.
    let text = server.metrics_blocking();
    let hits = metric_value(&text, "vllm:prefix_cache_hits_total").unwrap_or(0.0);
    assert!(
        hits >= 32.0,
        "two 16-token blocks of the prefix, at least: {hits}"
    );
}

#[test]
fn unusable_flags_are_refused_naming_the_flag() {
    // Nothing is sent: the URL is never reached.
    let url = format!("http://127.0.0.1:{}", free_port());
    let cases: [(&[&str], &str); 8] = [
        (&["--request-rate", "0"], "--request-rate 0"),
        (&["--request-rate=-2"], "--request-rate -2"),
        (&["--sweep-rates", "1,0"], "--sweep-rates: 0"),
        (&["--sweep-rates=-1"], "--sweep-rates: -1"),
        (&["--sweep-concurrency", "2,0"], "--sweep-concurrency"),
        (&["--max-concurrency", "0"], "--max-concurrency 0"),
        (&["--workload", "sharegpt"], "--dataset-path"),
        (
            &["--workload", "random", "--num-prompts", "0"],
            "--num-prompts",
        ),
    ];
    for (flags, expected) in cases {
        let output = tandem()
            .args(["bench", "--url", &url])
            .args(flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{flags:?} was accepted: {stderr}");
        assert!(
            stderr.contains(expected) && !stderr.contains("sending"),
            "{flags:?}: {stderr}"
        );
    }
}

/// The default model's GGUF file.
fn default_model_path() -> String {
    let output = tandem().args(["model", "path"]).output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn input_lens(report: &Value) -> Vec<u64> {
    report["input_lens"]
        .as_array()
        .unwrap_or_else(|| panic!("input_lens in {report}"))
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

/// Random prompts drawn in the model's own tokenizer (the GGUF file, or the server's
/// /tokenize when no --tokenizer is given) have exactly the requested token counts as
/// the server counts them (`usage.prompt_tokens`), as vllm bench serve's random dataset
/// does; no two share a prefix-cache block unless the workload shares a prefix.
#[test]
fn random_prompts_have_exact_token_counts() {
    if !default_model_present() {
        return;
    }
    let gguf = default_model_path();
    let server = Server::start(&["--threads", "2", "--kv-cache-memory", "128MiB"]);
    let url = server.url("");
    let hits =
        || metric_value(&server.metrics_blocking(), "vllm:prefix_cache_hits_total").unwrap_or(0.0);
    let common = ["--url", &url, "--num-prompts", "10", "--output-len", "2"];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = common.iter().chain(extra).copied().collect();
        let (output, report) = bench(&args);
        assert!(output.status.success(), "{output:?}");
        assert_eq!(report["completed"], 10, "{report}");
        (String::from_utf8_lossy(&output.stderr).into_owned(), report)
    };

    // The GGUF file's tokenizer.
    let (stderr, report) = run(&[
        "--workload",
        "random",
        "--input-len",
        "37",
        "--max-concurrency",
        "4",
        "--tokenizer",
        &gguf,
    ]);
    assert!(
        stderr.contains(&format!("the tokenizer of {gguf}")),
        "{stderr}"
    );
    assert_eq!(input_lens(&report), vec![37; 10], "{stderr}");
    assert_eq!(report["tokenizer_id"], gguf.as_str());
    assert_eq!(report["total_input_tokens"], 370);
    assert_eq!(hits(), 0.0, "random prompts share no prefix-cache block");

    // The server's tokenizer, with longer prompts (several blocks each); another seed,
    // so no prompt repeats the run before.
    let (stderr, report) = run(&["--workload", "random", "--input-len", "150", "--seed", "1"]);
    assert!(stderr.contains("the server's /tokenize"), "{stderr}");
    assert_eq!(input_lens(&report), vec![150; 10], "{stderr}");
    assert_eq!(report["tokenizer_id"], "server");
    assert_eq!(hits(), 0.0, "random prompts share no prefix-cache block");

    // A shared prefix of 64 tokens: every prompt is 64 + 20, and all but the first
    // find the prefix's whole blocks cached.
    let (stderr, report) = run(&[
        "--workload",
        "shared-prefix",
        "--prefix-len",
        "64",
        "--input-len",
        "20",
        "--max-concurrency",
        "1",
        "--seed",
        "2",
        "--tokenizer",
        &gguf,
    ]);
    assert_eq!(input_lens(&report), vec![84; 10], "{stderr}");
    assert!(
        hits() >= 9.0 * 48.0,
        "the prefix is shared on purpose: {} hits",
        hits()
    );
}

/// A stand-in for an OpenAI server, answering every completion with one token and
/// counting its prompt in a toy tokenizer: ids `0..VOCAB`, id 0 the BOS `<s>` (added
/// when `add_special_tokens`), the others the words `wN`; anything else is id 1.
/// With `tokenizes`, it has vLLM's `/tokenize` and `/detokenize`, the latter decoding
/// ids past the vocabulary to nothing (as Hugging Face tokenizers do). Records the
/// prompts it was sent.
struct FakeServer {
    url: String,
    prompts: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

const FAKE_VOCAB: u32 = 1000;

impl FakeServer {
    fn start(tokenizes: bool) -> Self {
        use axum::routing::post;
        use serde_json::json;
        use std::sync::{Arc, Mutex};
        fn encode(text: &str, bos: bool) -> Vec<u32> {
            let words = text.split_whitespace().map(|word| match word {
                "<s>" => 0,
                _ => word
                    .strip_prefix('w')
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0 && n < FAKE_VOCAB)
                    .unwrap_or(1),
            });
            bos.then_some(0).into_iter().chain(words).collect()
        }
        let prompts: Arc<Mutex<Vec<String>>> = Arc::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = prompts.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let complete = move |body: axum::Json<Value>| {
                    let seen = seen.clone();
                    async move {
                        let prompt = body["prompt"].as_str().unwrap_or_default().to_owned();
                        let count = encode(&prompt, true).len();
                        seen.lock().unwrap().push(prompt);
                        let chunk = json!({"choices": [{"index": 0, "text": " ok"}]});
                        let usage = json!({"choices": [],
                            "usage": {"prompt_tokens": count, "completion_tokens": 1}});
                        (
                            [("content-type", "text/event-stream")],
                            format!("data: {chunk}\n\ndata: {usage}\n\ndata: [DONE]\n\n"),
                        )
                    }
                };
                let tokenize = |body: axum::Json<Value>| async move {
                    let bos = body["add_special_tokens"].as_bool().unwrap_or(true);
                    let tokens = encode(body["prompt"].as_str().unwrap_or_default(), bos);
                    axum::Json(json!({"count": tokens.len(), "max_model_len": 4096,
                        "tokens": tokens}))
                };
                let detokenize = |body: axum::Json<Value>| async move {
                    let ids: Vec<u32> = serde_json::from_value(body["tokens"].clone()).unwrap();
                    let words: Vec<String> = ids
                        .iter()
                        .filter(|&&id| id < FAKE_VOCAB)
                        .map(|&id| match id {
                            0 => "<s>".to_owned(),
                            n => format!("w{n}"),
                        })
                        .collect();
                    axum::Json(json!({"prompt": words.join(" ")}))
                };
                let mut app = axum::Router::new().route("/v1/completions", post(complete));
                if tokenizes {
                    app = app
                        .route("/tokenize", post(tokenize))
                        .route("/detokenize", post(detokenize));
                }
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        Self { url, prompts }
    }

    fn prompts(&self) -> Vec<String> {
        self.prompts.lock().unwrap().clone()
    }
}

/// Without --tokenizer, a server with no /tokenize gets word prompts, each starting
/// with a word of its own, and the run says its counts are approximate.
#[test]
fn without_a_tokenizer_prompts_are_words_that_start_apart() {
    let server = FakeServer::start(false);
    let (output, report) = bench(&[
        "--url",
        &server.url,
        "--workload",
        "random",
        "--num-prompts",
        "40",
        "--input-len",
        "12",
        "--output-len",
        "1",
    ]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(report["completed"], 40, "{report}");
    assert_eq!(report["tokenizer_id"], Value::Null);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("prompts are random words")
            && stderr.contains("the server's /tokenize: HTTP 404"),
        "{stderr}"
    );
    let prompts = server.prompts();
    let firsts: std::collections::HashSet<&str> = prompts
        .iter()
        .map(|p| p.split(' ').next().unwrap())
        .collect();
    assert_eq!((prompts.len(), firsts.len()), (40, 40), "{prompts:?}");
}

/// A vLLM-shaped server's tokenizer: its vocabulary size is found through
/// /detokenize (which decodes ids past it to nothing), the BOS it adds is counted in
/// --input-len, and every prompt is exactly --input-len tokens as it counts them,
/// with a ±ratio spread as vLLM's.
#[test]
fn a_vllm_shaped_servers_tokenizer_is_found_and_used() {
    let server = FakeServer::start(true);
    let (output, report) = bench(&[
        "--url",
        &server.url,
        "--workload",
        "random",
        "--num-prompts",
        "30",
        "--input-len",
        "21",
        "--output-len",
        "1",
    ]);
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/detokenize (1000 ids)"), "{stderr}");
    assert_eq!(input_lens(&report), vec![21; 30], "{stderr}");
    assert_eq!(report["tokenizer_id"], "server");
    let prompts = server.prompts();
    let firsts: std::collections::HashSet<&str> = prompts
        .iter()
        .map(|p| p.split(' ').next().unwrap())
        .collect();
    assert_eq!(firsts.len(), 30, "{prompts:?}");

    // ±50% of the 20 drawn tokens: [10, 30], plus the BOS.
    let (output, report) = bench(&[
        "--url",
        &server.url,
        "--workload",
        "random",
        "--num-prompts",
        "200",
        "--input-len",
        "21",
        "--output-len",
        "1",
        "--range-ratio",
        "0.5",
    ]);
    assert!(output.status.success(), "{output:?}");
    let lens = input_lens(&report);
    assert_eq!(
        (lens.iter().min(), lens.iter().max()),
        (Some(&11), Some(&31)),
        "{lens:?}"
    );
}
