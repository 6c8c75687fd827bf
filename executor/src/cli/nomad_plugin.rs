//! `qemu-executor nomad-plugin`: the task-driver plugin Nomad's client
//! starts (see `qemu_executor::nomad`). Refuses to run without Nomad's
//! magic cookie, since its stdout belongs to go-plugin's handshake.

use std::process::ExitCode;

use clap::Args;
use qemu_executor::launch::Exit;
use qemu_executor::nomad::{self, Defaults, NomadError};
use tokio_util::sync::CancellationToken;

use super::GlobalOpts;

#[derive(Debug, Args)]
pub struct NomadPluginArgs {}

pub async fn run(_args: NomadPluginArgs, global: &GlobalOpts) -> anyhow::Result<ExitCode> {
    if !nomad::started_by_nomad() {
        eprintln!("{}", NomadError::NotUnderNomad);
        return Ok(Exit::ERROR.into());
    }
    // go-plugin's plugins ignore SIGINT: a Ctrl-C in the agent's terminal
    // is for the agent, which stops its plugins itself.
    // SAFETY: SIG_IGN installs no handler code.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::SigHandler::SigIgn,
        )
    }?;
    let shutdown = CancellationToken::new();
    let on_term = shutdown.clone();
    tokio::spawn(async move {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
            tracing::info!("SIGTERM: exiting; the VMs keep running");
            on_term.cancel();
        }
    });
    let defaults = Defaults {
        config: global.config.clone(),
        state_dir: global.state_dir(),
        cache_dir: global.cache_dir(),
    };
    nomad::serve(defaults, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
