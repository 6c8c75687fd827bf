//! `qemu-executor ls`: the agent's tasks, one line each.

use std::process::ExitCode;

use clap::Args;
use http::Method;

use super::client::SocketArg;

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print the JSON the agent answered instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

pub async fn run(args: LsArgs) -> anyhow::Result<ExitCode> {
    let tasks = args
        .socket
        .client()
        .json(Method::GET, "/v1/tasks", None)
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tasks)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<16} {:<10} {:>8} {:>8}  PORTS",
        "ID", "NAME", "STATE", "PID", "RESTARTS"
    );
    for t in tasks.as_array().map(Vec::as_slice).unwrap_or_default() {
        let ports: Vec<String> = t["ports"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|p| format!("{}->{}", p["host"], p["guest"]))
            .collect();
        println!(
            "{:<24} {:<16} {:<10} {:>8} {:>8}  {}",
            t["id"].as_str().unwrap_or_default(),
            t["name"].as_str().unwrap_or_default(),
            t["state"].as_str().unwrap_or_default(),
            t["pid"].as_u64().map_or("-".to_string(), |p| p.to_string()),
            t["restarts"],
            ports.join(",")
        );
    }
    Ok(ExitCode::SUCCESS)
}
