//! `tandem generate`: one prompt through the built-in engine, streamed to stdout, with
//! prefill and decode speeds on stderr.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use tandem_engine::LoadedModel;
use tandem_engine::chat::ChatMessage;
use tandem_engine::fetch;
use tandem_engine::generate::{GenerateOptions, GenerateStats, generate};
use tandem_engine::kernels::ThreadPool;
use tandem_engine::model::LoadOptions;
use tandem_engine::sample::SamplingParams;

#[derive(Args)]
pub struct GenerateArgs {
    /// A `.gguf` file or a Hugging Face folder (config.json, *.safetensors,
    /// tokenizer.json). Default: the cached default model (`tandem model fetch`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for `--chat` (default: the template's own, if any).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Keep only the K most likely tokens (0 = no limit).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens, up to --max-tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Compute threads (default: all available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the statistics as one JSON line on stderr instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    validate(&args)?;
    crate::select_cpu_kernels()?;
    let path = fetch::resolve_model(args.model.as_deref())?;
    let loaded = LoadedModel::load(&path, LoadOptions::default())
        .with_context(|| format!("loading {}", path.display()))?;
    let prompt = build_prompt(&loaded, &args)?;
    let prompt_ids = loaded
        .tokenizer
        .encode(&prompt, !args.chat && loaded.tokenizer.add_bos_by_default())?;
    let pool = match args.threads {
        Some(n) => ThreadPool::new(n)?,
        None => ThreadPool::with_available_parallelism()?,
    };
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            ..SamplingParams::default()
        },
        stop_tokens: if args.ignore_eos {
            Vec::new()
        } else {
            loaded.tokenizer.eos_token_ids().iter().copied().collect()
        },
        ..GenerateOptions::default()
    };
    let mut decoder = loaded.tokenizer.incremental_decoder(true);
    let mut stdout = std::io::stdout().lock();
    let stats = generate(
        loaded.cpu(),
        &pool,
        &prompt_ids,
        &options,
        |token| match decoder.push(token) {
            Some(text) => write!(stdout, "{text}")
                .and_then(|()| stdout.flush())
                .is_ok(),
            None => true,
        },
    )?;
    if let Some(rest) = decoder.finish() {
        write!(stdout, "{rest}")?;
    }
    writeln!(stdout)?;
    report(&stats, pool.n_threads(), args.json);
    Ok(())
}

fn validate(args: &GenerateArgs) -> Result<()> {
    if args.temperature.is_nan() || args.temperature < 0.0 {
        bail!("--temperature must be >= 0, got {}", args.temperature);
    }
    if args.top_p.is_nan() || args.top_p <= 0.0 || args.top_p > 1.0 {
        bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    Ok(())
}

fn build_prompt(loaded: &LoadedModel, args: &GenerateArgs) -> Result<String> {
    if !args.chat {
        return Ok(args.prompt.clone());
    }
    let template = loaded
        .chat_template
        .as_ref()
        .context("--chat: this model has no chat template")?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::new("system", system.as_str()));
    }
    messages.push(ChatMessage::new("user", args.prompt.as_str()));
    Ok(template.render(&messages, true)?)
}

fn report(stats: &GenerateStats, threads: usize, json: bool) {
    if json {
        eprintln!(
            "{{\"prompt_tokens\":{},\"generated_tokens\":{},\"prefill_tok_s\":{:.1},\"decode_tok_s\":{:.1},\"threads\":{},\"finish_reason\":\"{:?}\"}}",
            stats.prompt_tokens,
            stats.generated_tokens,
            stats.prefill_tokens_per_sec(),
            stats.decode_tokens_per_sec(),
            threads,
            stats.finish,
        );
        return;
    }
    eprintln!(
        "prompt tokens: {} | prefill: {:.1} tok/s | generated: {} | decode: {:.1} tok/s | threads: {}",
        stats.prompt_tokens,
        stats.prefill_tokens_per_sec(),
        stats.generated_tokens,
        stats.decode_tokens_per_sec(),
        threads
    );
}
