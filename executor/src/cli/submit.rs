//! `qemu-executor submit FILE`: hand a task to the agent; prints its id.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use http::Method;
use qemu_executor::launch::Exit;

use super::client::SocketArg;

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Task file (.toml, .json) or the scheduler's job file (.hcl, .nomad).
    pub file: PathBuf,
    /// The job file's qemu task to submit, as TASK or GROUP/TASK; needed
    /// when the job has several.
    #[arg(long = "task", value_name = "NAME")]
    pub task_name: Option<String>,
    #[command(flatten)]
    pub socket: SocketArg,
}

pub async fn run(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    // Loaded and validated here, in one place, and sent as JSON: a
    // serialized task is itself a valid JSON task file.
    let task = match qemu_executor::jobfile::load_task(&args.file, args.task_name.as_deref()) {
        Ok(task) => task,
        Err(e) => {
            super::print_error(&e);
            return Ok(Exit::INVALID.into());
        }
    };
    let body = serde_json::to_vec(&task)?;
    let answer = args
        .socket
        .client()
        .json(Method::POST, "/v1/tasks", Some(("application/json", body)))
        .await?;
    println!("{}", answer["id"].as_str().unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}
