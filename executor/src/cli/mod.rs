//! Command-line verbs, one file each. Each verb parses its own arguments,
//! calls into the library and maps the outcome to an exit code.

mod fingerprint;
mod policy;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// Exit code for errors that no verb maps more precisely.
pub const EXIT_ERROR: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "qemu-executor",
    version,
    about = "Fetch, verify, police and supervise qemu virtual machines"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Options every verb understands.
#[derive(Debug, Args)]
pub struct GlobalOpts {
    /// Log lines for people (default) or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Image cache; default $XDG_CACHE_HOME/qemu-executor, or
    /// /var/cache/qemu-executor as root.
    #[arg(long, global = true, env = "QEMU_EXECUTOR_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Operator configuration (policies, fetch limits, argument allowlist).
    #[arg(long, global = true, env = "QEMU_EXECUTOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// More log detail (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fetch, verify, police, launch and supervise one task until it ends.
    Run(run::RunArgs),
    /// Describe this host: qemu, its accelerators, KVM, cpus and memory.
    Fingerprint(fingerprint::FingerprintArgs),
    /// Check a policy component against a task, or run its table of cases.
    Policy(policy::PolicyArgs),
}

pub fn init_tracing(global: &GlobalOpts) {
    let default = match global.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match global.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run::run(args, &cli.global).await,
            Command::Fingerprint(args) => fingerprint::run(args, &cli.global).await,
            Command::Policy(args) => policy::run(args, &cli.global).await,
        }
    })
}
