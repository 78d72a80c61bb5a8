//! End-to-end engine benchmark on the default model, with llama.cpp measured in the
//! same run as the baseline: prefill of a 512-token prompt and single-stream decode of
//! 128 tokens, same thread count, best of N runs each; prints both and the ratios. Also
//! the decode roofline: the machine's streaming-read rate on the same threads, divided
//! by the bytes one decode step must read (the model file: every weight once, the
//! embedding table doubling as the output matrix; the KV cache left out, so the ceiling
//! is slightly optimistic), and decode's share of it. Then decode at depth: the same
//! decode after a long prompt (attention over every stored key then weighs on each
//! step), against `llama-bench -d` at the same depth.
//!
//! `cargo bench -p tandem-engine --bench forward`
//!
//! Environment: `TANDEM_BENCH_THREADS` (2), `TANDEM_BENCH_REPEATS` (3),
//! `TANDEM_BENCH_PROMPT_TOKENS` (512), `TANDEM_BENCH_DECODE_TOKENS` (128),
//! `TANDEM_BENCH_DEPTH` (1536 tokens of context for decode at depth; 0 skips it),
//! `TANDEM_LLAMACPP_PYTHON` (a python with llama-cpp-python 0.3.36; default: what
//! `scripts/setup-llamacpp.sh` installs, else `python3`), `TANDEM_LLAMA_BENCH`
//! (llama.cpp's own `llama-bench`; default: the native build the same script makes),
//! `TANDEM_CPU_KERNELS` (the kernel family, printed first; default: the best this CPU
//! has). Two baselines: `llama-bench` built with native flags (the one users know), and
//! llama-cpp-python's portable AVX2 build as a second row; each is skipped, with a
//! notice, when it is not installed.

#[path = "common/env.rs"]
mod env;
#[path = "common/stream.rs"]
mod stream;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use env::env_usize;
use tandem_engine::LoadedModel;
use tandem_engine::fetch;
use tandem_engine::generate::Session;
use tandem_engine::kernels::ThreadPool;
use tandem_engine::kv::KvOptions;
use tandem_engine::model::{LoadOptions, LogitsFor};
use tandem_engine::sample::argmax;

/// The text `scripts/llamacpp_bench.py` builds its prompt from, so both engines see
/// the same tokens.
const PROMPT_TEXT: &str = "The history of computing is a story of abstraction layered upon abstraction. \
Early machines were programmed by rewiring panels; later, stored programs let \
the same hardware run many tasks. Compilers translated readable code into \
instructions, operating systems shared one processor among many users, and \
networks connected machines across continents. Today a single request to a \
language model may pass through a load balancer, a scheduler, a cache of \
attention keys and values, and thousands of matrix multiplications before a \
single word comes back. ";
const DECODE_PROMPT_TOKENS: usize = 16;

struct Figures {
    prefill_tok_s: f64,
    decode_tok_s: f64,
    peak_rss_mb: f64,
}

fn main() {
    let threads = env_usize("TANDEM_BENCH_THREADS", 2);
    let repeats = env_usize("TANDEM_BENCH_REPEATS", 3).max(1);
    let prompt_tokens = env_usize("TANDEM_BENCH_PROMPT_TOKENS", 512);
    let decode_tokens = env_usize("TANDEM_BENCH_DECODE_TOKENS", 128);
    let depth = env_usize("TANDEM_BENCH_DEPTH", 1536);
    let model_path = fetch::default_model_path();
    if !model_path.is_file() {
        eprintln!(
            "default model missing at {}: run `tandem model fetch`",
            model_path.display()
        );
        std::process::exit(1);
    }
    let kernels = tandem_engine::kernels::dispatch::selected().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1);
    });
    println!("CPU kernels: {}", kernels.describe());
    let loaded =
        LoadedModel::load(&model_path, LoadOptions::default()).expect("default model loads");
    let pool = ThreadPool::new(threads).expect("thread pool");
    let ours = measure_tandem(&loaded, &pool, repeats, prompt_tokens, decode_tokens);
    println!(
        "tandem     prefill {prompt_tokens} tok: {:8.1} tok/s | decode {decode_tokens} tok: {:7.1} tok/s | peak RSS {:6.1} MB | {threads} threads",
        ours.prefill_tok_s, ours.decode_tok_s, ours.peak_rss_mb
    );
    print_roofline(&model_path, threads, ours.decode_tok_s);
    let bench = LlamaBench {
        path: &model_path,
        threads,
        repeats,
        prompt_tokens,
        decode_tokens,
    };
    match bench.run() {
        Some((prefill, decode)) => {
            println!(
                "llama-bench prefill {prompt_tokens} tok: {prefill:8.1} tok/s | decode {decode_tokens} tok: {decode:7.1} tok/s | native build | {threads} threads"
            );
            println!(
                "ratio (tandem / llama-bench): prefill {:.2}x, decode {:.2}x",
                ours.prefill_tok_s / prefill,
                ours.decode_tok_s / decode
            );
        }
        None => println!("llama-bench baseline skipped (see above)"),
    }
    match measure_llamacpp(&model_path, threads, repeats, prompt_tokens, decode_tokens) {
        Some(base) => {
            println!(
                "llama.cpp  prefill {prompt_tokens} tok: {:8.1} tok/s | decode {decode_tokens} tok: {:7.1} tok/s | peak RSS {:6.1} MB | {threads} threads (llama-cpp-python, AVX2 build)",
                base.prefill_tok_s, base.decode_tok_s, base.peak_rss_mb
            );
            println!(
                "ratio (tandem / llama.cpp AVX2): prefill {:.2}x, decode {:.2}x",
                ours.prefill_tok_s / base.prefill_tok_s,
                ours.decode_tok_s / base.decode_tok_s
            );
        }
        None => println!("llama.cpp (llama-cpp-python) baseline skipped (see above)"),
    }
    if depth > 0 {
        compare_at_depth(&loaded, &pool, &bench, depth, ours.decode_tok_s);
    }
}

/// Decode after `depth` tokens of context, tandem against `llama-bench -d`.
fn compare_at_depth(
    loaded: &LoadedModel,
    pool: &ThreadPool,
    bench: &LlamaBench,
    depth: usize,
    shallow_tok_s: f64,
) {
    let (repeats, decode_tokens) = (bench.repeats, bench.decode_tokens);
    let prompt = bench_prompt(loaded, depth);
    let ours = decode_tokens as f64 / best_decode(loaded, pool, &prompt, decode_tokens, repeats);
    println!(
        "tandem     decode {decode_tokens} tok at depth {depth}: {ours:7.1} tok/s ({:.0}% of its decode after {DECODE_PROMPT_TOKENS} tokens)",
        100.0 * ours / shallow_tok_s
    );
    match bench.decode_at_depth(depth) {
        Some(theirs) => {
            println!(
                "llama-bench decode {decode_tokens} tok at depth {depth}: {theirs:7.1} tok/s | ratio (tandem / llama-bench) {:.2}x",
                ours / theirs
            );
        }
        None => println!("llama-bench at depth skipped (see above)"),
    }
}

/// llama.cpp's own `llama-bench`, built natively by `scripts/setup-llamacpp.sh`: the
/// baseline users know (`-p` prefill and `-n` decode tokens, `-r` repetitions, averaged
/// by llama-bench itself).
struct LlamaBench<'a> {
    path: &'a Path,
    threads: usize,
    repeats: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
}

impl LlamaBench<'_> {
    /// `TANDEM_LLAMA_BENCH`, else the setup script's native build.
    fn binary() -> std::path::PathBuf {
        std::env::var_os("TANDEM_LLAMA_BENCH")
            .map(Into::into)
            .unwrap_or_else(|| fetch::cache_dir().join("llama.cpp-native/bin/llama-bench"))
    }

    /// (prefill tok/s, decode tok/s), or `None` with the reason on stderr.
    fn run(&self) -> Option<(f64, f64)> {
        let rows = self.rows(&["-p", &self.prompt_tokens.to_string()])?;
        Some((rate(&rows, true)?, rate(&rows, false)?))
    }

    /// Decode tok/s after `depth` tokens of context (`-d`; the fill is not timed).
    fn decode_at_depth(&self, depth: usize) -> Option<f64> {
        let rows = self.rows(&["-p", "0", "-d", &depth.to_string()])?;
        rate(&rows, false)
    }

    /// llama-bench's JSON rows for the model, threads, decode tokens and repetitions plus
    /// `args`, or `None` with the reason on stderr.
    fn rows(&self, args: &[&str]) -> Option<serde_json::Value> {
        let binary = Self::binary();
        if !binary.is_file() {
            eprintln!(
                "llama-bench not found at {}: `scripts/setup-llamacpp.sh --native-only` builds it (about 10 minutes)",
                binary.display()
            );
            return None;
        }
        let output = Command::new(&binary)
            .args(["-m", &self.path.display().to_string()])
            .args(["-t", &self.threads.to_string()])
            .args(args)
            .args(["-n", &self.decode_tokens.to_string()])
            .args(["-r", &self.repeats.to_string()])
            .args(["-o", "json"])
            .output();
        let output = match output {
            Ok(o) if o.status.success() => o,
            Ok(o) => {
                eprintln!(
                    "llama-bench failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return None;
            }
            Err(e) => {
                eprintln!("llama-bench could not start: {e}");
                return None;
            }
        };
        serde_json::from_slice(&output.stdout).ok()
    }
}

/// The prefill (or decode) row's average tok/s among llama-bench's rows.
fn rate(rows: &serde_json::Value, prefill: bool) -> Option<f64> {
    rows.as_array()?.iter().find_map(|row| {
        let is_prefill = row["n_prompt"].as_u64()? > 0 && row["n_gen"].as_u64()? == 0;
        (is_prefill == prefill).then(|| row["avg_ts"].as_f64())?
    })
}

/// The streaming-read ceiling on decode and the measured decode's share of it.
fn print_roofline(model_path: &Path, threads: usize, decode_tok_s: f64) {
    let step_bytes = std::fs::metadata(model_path).map_or(0, |m| m.len()) as f64;
    let pool = ThreadPool::new(threads).expect("thread pool");
    let bandwidth = stream::stream_bandwidth(&pool, 5);
    let ceiling = bandwidth / step_bytes;
    println!(
        "roofline   streaming read {:.1} GB/s ({threads} threads) / {:.1} MB per decode step = {ceiling:.1} tok/s; decode at {:.0}% of it",
        bandwidth / 1e9,
        step_bytes / 1e6,
        100.0 * decode_tok_s / ceiling
    );
}

fn measure_tandem(
    loaded: &LoadedModel,
    pool: &ThreadPool,
    repeats: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
) -> Figures {
    let prompt = bench_prompt(loaded, prompt_tokens);

    // Prefill: the whole prompt in one forward pass from an empty KV store.
    let mut best_prefill = f64::MAX;
    for run in 0..=repeats {
        let mut session = Session::new(loaded.cpu(), pool, prompt.len(), KvOptions::default());
        let started = Instant::now();
        session.feed(&prompt, LogitsFor::Last).expect("prefill");
        let secs = started.elapsed().as_secs_f64();
        if run > 0 {
            best_prefill = best_prefill.min(secs);
        }
    }

    // Decode: greedy, one token per forward pass, after a short prompt.
    let short = &prompt[..DECODE_PROMPT_TOKENS.min(prompt.len())];
    let best_decode = best_decode(loaded, pool, short, decode_tokens, repeats);
    Figures {
        prefill_tok_s: prompt.len() as f64 / best_prefill,
        decode_tok_s: decode_tokens as f64 / best_decode,
        peak_rss_mb: peak_rss_mb(),
    }
}

/// Best seconds of `repeats` greedy decodes of `decode_tokens` after `prompt` (one
/// untimed run first), one token per forward pass.
fn best_decode(
    loaded: &LoadedModel,
    pool: &ThreadPool,
    prompt: &[u32],
    decode_tokens: usize,
    repeats: usize,
) -> f64 {
    let vocab = loaded.model.config().vocab_size;
    let mut best = f64::MAX;
    for run in 0..=repeats {
        let capacity = prompt.len() + decode_tokens;
        let mut session = Session::new(loaded.cpu(), pool, capacity, KvOptions::default());
        let mut token = argmax(session.feed(prompt, LogitsFor::Last).expect("prompt"));
        let started = Instant::now();
        for _ in 0..decode_tokens {
            let logits = session
                .feed(std::slice::from_ref(&token), LogitsFor::Last)
                .expect("decode");
            token = argmax(&logits[..vocab]);
        }
        let secs = started.elapsed().as_secs_f64();
        if run > 0 {
            best = best.min(secs);
        }
    }
    best
}

/// BOS, then the prompt text's tokens repeated, cut to exactly `n` tokens.
fn bench_prompt(loaded: &LoadedModel, n: usize) -> Vec<u32> {
    let text_ids = loaded
        .tokenizer
        .encode(PROMPT_TEXT, false)
        .expect("tokenize");
    let mut ids: Vec<u32> = loaded.tokenizer.bos_token_id().into_iter().collect();
    while ids.len() < n {
        ids.extend(&text_ids);
    }
    ids.truncate(n);
    ids
}

/// Peak resident set of this process (`VmHWM`), in MB.
fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn llamacpp_python() -> String {
    if let Ok(python) = std::env::var("TANDEM_LLAMACPP_PYTHON") {
        return python;
    }
    let venv = fetch::cache_dir().join("llamacpp-venv/bin/python");
    if venv.is_file() {
        return venv.display().to_string();
    }
    "python3".into()
}

fn measure_llamacpp(
    path: &Path,
    threads: usize,
    repeats: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
) -> Option<Figures> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/llamacpp_bench.py"
    );
    let output = Command::new(llamacpp_python())
        .arg(script)
        .args(["--model", &path.display().to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--prompt-tokens", &prompt_tokens.to_string()])
        .args(["--decode-tokens", &decode_tokens.to_string()])
        .args(["--repeats", &repeats.to_string()])
        .output();
    let output = match output {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            eprintln!(
                "llama.cpp baseline failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            eprintln!("install it with scripts/setup-llamacpp.sh (about 10 minutes)");
            return None;
        }
        Err(e) => {
            eprintln!("llama.cpp baseline could not start: {e}");
            return None;
        }
    };
    let line = String::from_utf8_lossy(&output.stdout);
    let json: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    Some(Figures {
        prefill_tok_s: json["prefill_tok_s"].as_f64()?,
        decode_tok_s: json["decode_tok_s"].as_f64()?,
        peak_rss_mb: json["peak_rss_mb"].as_f64()?,
    })
}
