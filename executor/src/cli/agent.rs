//! `qemu-executor agent --socket PATH [--stop-tasks-on-exit]`: many VMs
//! under one long-running executor, driven over HTTP on a Unix socket.
//! `--state-dir`, `--cache-dir` and `--config` are the global options.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use qemu_executor::agent::{Agent, server};
use qemu_executor::fetch::Fetcher;
use qemu_executor::host::isolation::Isolation;
use qemu_executor::launch::{Detached, LiveSeam, Pipeline};
use tokio_util::sync::CancellationToken;

use super::GlobalOpts;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Where to listen; default /run/qemu-executor.sock as root, else
    /// $XDG_RUNTIME_DIR/qemu-executor.sock.
    #[arg(long, env = "QEMU_EXECUTOR_SOCKET")]
    pub socket: Option<PathBuf>,
    /// The socket's permissions, in octal. Default 600: only the agent's
    /// user may connect.
    #[arg(long, value_parser = parse_mode, default_value = "600")]
    pub socket_mode: u32,
    /// On SIGTERM or SIGINT, stop every VM gracefully before exiting. By
    /// default they keep running, and the next agent takes them over.
    #[arg(long)]
    pub stop_tasks_on_exit: bool,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode such as 600"))
}

pub async fn run(args: AgentArgs, global: &GlobalOpts) -> anyhow::Result<ExitCode> {
    let config = super::load_config(global)?;
    // Absolute already (`GlobalOpts`): qemu gets paths below them on its
    // command line and chroots into task directories.
    let state_dir = global.state_dir();
    let cache = qemu_executor::cache::Cache::open(&global.cache_dir())?;
    let isolation = Isolation::detect(&config.agent, config.qemu.sandbox)?;
    let chain = super::load_chain(global, &config, Vec::new()).await?;
    let pipeline = Pipeline {
        seam: LiveSeam {
            probe: super::probe(global, &config),
            chain,
            fetcher: Fetcher::new(config.fetch.clone())?,
            cache,
        },
        state_dir,
        // The agent starts qemu under shims that outlive it.
        detached: Some(Detached {
            exe: std::env::current_exe()?,
            isolation,
        }),
        config,
    };
    let agent = Agent::open(pipeline)?;
    let socket = args
        .socket
        .unwrap_or_else(qemu_executor::dirs::default_socket);
    let listener = server::bind(&socket, args.socket_mode)?;
    let tasks = agent.recover()?;
    tracing::info!(socket = %socket.display(), tasks, "agent listening");

    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(server::serve(
        agent.clone(),
        listener,
        socket,
        shutdown.clone(),
    ));
    let signal = super::interrupted().await;
    agent.stop_accepting();
    shutdown.cancel();
    let _ = serving.await;
    if args.stop_tasks_on_exit {
        tracing::info!(%signal, "stopping every task before exiting");
        agent.stop_all().await;
    } else {
        let live = agent
            .list()
            .iter()
            .filter(|t| !t.state.is_terminal())
            .count();
        tracing::info!(%signal, live, "exiting; the VMs keep running for the next agent");
    }
    Ok(ExitCode::SUCCESS)
}
