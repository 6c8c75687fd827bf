//! `qemu-executor run TASK`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::GlobalOpts;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Task file (.toml or .json).
    pub task: PathBuf,
}

pub async fn run(args: RunArgs, _global: &GlobalOpts) -> anyhow::Result<ExitCode> {
    let task = qemu_executor::task::load(&args.task)?;
    println!("{}", serde_json::to_string_pretty(&task)?);
    Ok(ExitCode::SUCCESS)
}
