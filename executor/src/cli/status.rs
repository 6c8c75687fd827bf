//! `qemu-executor status ID`: everything the agent knows about a task, as
//! JSON.

use std::process::ExitCode;

use clap::Args;
use http::Method;

use super::client::{SocketArg, check_id};

#[derive(Debug, Args)]
pub struct StatusArgs {
    pub id: String,
    #[command(flatten)]
    pub socket: SocketArg,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let id = check_id(&args.id)?;
    let status = args
        .socket
        .client()
        .json(Method::GET, &format!("/v1/tasks/{id}"), None)
        .await?;
    println!("{}", serde_json::to_string_pretty(&status)?);
    Ok(ExitCode::SUCCESS)
}
