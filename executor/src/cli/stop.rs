//! `qemu-executor stop ID [--timeout 30s]`: stop a task gracefully (ACPI
//! power button, then `quit` and SIGKILL after the timeout) and wait until
//! it has ended.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use http::Method;

use super::client::{SocketArg, check_id};

#[derive(Debug, Args)]
pub struct StopArgs {
    pub id: String,
    /// How long the guest gets to power off before qemu is stopped hard;
    /// default the task's kill_timeout_s.
    #[arg(long, value_parser = qemu_executor::units::parse_duration)]
    pub timeout: Option<Duration>,
    #[command(flatten)]
    pub socket: SocketArg,
}

pub async fn run(args: StopArgs) -> anyhow::Result<ExitCode> {
    let id = check_id(&args.id)?;
    let body = match args.timeout {
        Some(t) => serde_json::json!({ "timeout_s": t.as_secs() }),
        None => serde_json::json!({}),
    };
    let status = args
        .socket
        .client()
        .json(
            Method::POST,
            &format!("/v1/tasks/{id}/stop?wait=true"),
            Some(("application/json", serde_json::to_vec(&body)?)),
        )
        .await?;
    println!(
        "{}: {}",
        status["state"].as_str().unwrap_or_default(),
        status["exit"]["reason"].as_str().unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}
