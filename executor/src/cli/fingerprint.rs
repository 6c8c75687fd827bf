//! `qemu-executor fingerprint [--json]`

use std::process::ExitCode;

use clap::Args;

use super::GlobalOpts;

#[derive(Debug, Args)]
pub struct FingerprintArgs {
    /// Print one JSON object instead of lines for people.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(_args: FingerprintArgs, _global: &GlobalOpts) -> anyhow::Result<ExitCode> {
    Ok(ExitCode::SUCCESS)
}
