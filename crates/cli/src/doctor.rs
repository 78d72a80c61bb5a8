//! `tandem doctor [FILE]`: checks a topology (or the embedded default) before
//! `tandem up`, and prints a table with a fix for every failure. Exits 1 if any failed.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use tandem_launch::doctor;

#[derive(Args)]
pub struct DoctorArgs {
    /// A topology file (TOML). Without it: the embedded default.
    file: Option<PathBuf>,
}

pub fn run(args: DoctorArgs) -> Result<()> {
    let mut topology = crate::up::load_topology(args.file.as_deref())?;
    crate::up::fill_default_models(&mut topology, false)?;
    let checks = doctor::run_checks(&topology);
    let width = |f: fn(&doctor::Check) -> usize| checks.iter().map(f).max().unwrap_or(0);
    let check_width = width(|c| c.check.len());
    let target_width = width(|c| c.target.len());
    for check in &checks {
        let mark = if check.ok { "ok  " } else { "FAIL" };
        println!(
            "{mark}  {:<check_width$}  {:<target_width$}  {}",
            check.check, check.target, check.detail
        );
        if !check.ok {
            println!(
                "      {:<check_width$}  {:<target_width$}  fix: {}",
                "", "", check.fix
            );
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    if failed > 0 {
        bail!("{failed} of {} checks failed", checks.len());
    }
    println!("\nall {} checks passed", checks.len());
    Ok(())
}
