//! `qemu-executor logs ID [--serial] [-f]`: qemu's own log, or the guest's
//! serial console; with `-f`, followed until the task ends.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Args;
use http::Method;
use http_body_util::BodyExt as _;

use super::client::{SocketArg, check_id};

#[derive(Debug, Args)]
pub struct LogsArgs {
    pub id: String,
    /// The guest's serial console instead of qemu's log.
    #[arg(long)]
    pub serial: bool,
    /// Keep printing as the log grows, until the task ends.
    #[arg(short, long)]
    pub follow: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

pub async fn run(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let id = check_id(&args.id)?;
    let client = args.socket.client();
    let path = format!(
        "/v1/tasks/{id}/logs?serial={}&follow={}",
        args.serial, args.follow
    );
    let resp = client.send(Method::GET, &path, None).await?;
    if !resp.status().is_success() {
        // Read the error the usual way.
        client.json(Method::GET, &path, None).await?;
        anyhow::bail!("the agent answered {}", resp.status());
    }
    let mut body = resp.into_body();
    let mut out = std::io::stdout().lock();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            out.write_all(&data)?;
            out.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
