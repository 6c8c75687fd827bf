//! Command-line verbs, one file each. Each verb parses its own arguments,
//! calls into the library and maps the outcome to an exit code.

mod agent;
mod cache;
mod client;
mod convert;
mod fetch;
mod fingerprint;
mod logs;
mod ls;
mod nomad_plugin;
mod policy;
mod run;
mod shim;
mod status;
mod stop;
mod submit;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// Prints a line on stdout for the person running us, control characters
/// escaped (lines carry task fields and policy output). A closed stdout (a
/// pipe whose reader went away) must not abort a VM's supervision halfway,
/// so write errors are ignored.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!($($arg)*);
        let _ = writeln!(std::io::stdout(), "{}", qemu_executor::text::Printable(&line));
    }};
}
pub(crate) use say;

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
    /// Task directories, the KVM verdict and cached host facts; default
    /// $XDG_STATE_HOME/qemu-executor, or /var/lib/qemu-executor as root.
    #[arg(long, global = true, env = "QEMU_EXECUTOR_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
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
    /// Fetch and verify one image into the cache; print its path.
    Fetch(fetch::FetchArgs),
    /// Inspect and trim the image cache.
    Cache(cache::CacheArgs),
    /// Policy tooling: check a task, run a table of cases, inspect a module, start a new policy.
    Policy(policy::PolicyArgs),
    /// Print the task file (TOML) equivalent to a job file's qemu task.
    Convert(convert::ConvertArgs),
    /// Run many tasks under one long-running agent, driven over a socket.
    Agent(agent::AgentArgs),
    /// Hand a task file to the agent; prints the task's id.
    Submit(submit::SubmitArgs),
    /// List the agent's tasks.
    Ls(ls::LsArgs),
    /// Show one task as JSON: state, pid, ports, policies, restarts, usage.
    Status(status::StatusArgs),
    /// Stop a task gracefully and wait until it has ended.
    Stop(stop::StopArgs),
    /// Print a task's qemu log, or its serial console with --serial.
    Logs(logs::LogsArgs),
    /// Serve Nomad as its task-driver plugin (Nomad's client starts this).
    NomadPlugin(nomad_plugin::NomadPluginArgs),
    /// The per-VM shim the agent starts (internal).
    #[command(hide = true)]
    Shim(shim::ShimArgs),
}

impl GlobalOpts {
    /// `--state-dir` or the default, made absolute against the working
    /// directory now: qemu gets paths below it on its command line.
    pub fn state_dir(&self) -> PathBuf {
        absolute(
            self.state_dir
                .clone()
                .unwrap_or_else(qemu_executor::dirs::default_state_dir),
        )
    }

    /// `--cache-dir` or the default, made absolute against the working
    /// directory now: qemu opens cached images by their path, and refuses a
    /// relative one only after the whole download.
    pub fn cache_dir(&self) -> PathBuf {
        absolute(
            self.cache_dir
                .clone()
                .unwrap_or_else(qemu_executor::dirs::default_cache_dir),
        )
    }
}

/// `path` joined to the working directory when relative (`..` and symlinks
/// left as they are); as it is if the working directory is gone.
fn absolute(path: PathBuf) -> PathBuf {
    std::path::absolute(&path).unwrap_or(path)
}

pub fn init_tracing(cli: &Cli) {
    let global = &cli.global;
    let default = match global.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(qemu_executor::logging::Stderr)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    if matches!(cli.command, Command::NomadPlugin(_)) {
        // Nomad's plugin loader reads hclog's JSON from a plugin's stderr.
        return builder
            .with_ansi(false)
            .event_format(qemu_executor::nomad::hclog::HclogFormat)
            .init();
    }
    match global.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if !supervises(&cli.command) {
        die_quietly_on_a_closed_pipe();
    }
    let command = match cli.command {
        // The shim stays a small synchronous process: no runtime.
        Command::Shim(args) => return Ok(shim::run(args)),
        other => other,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        match command {
            Command::Run(args) => run::run(args, &cli.global).await,
            Command::Fingerprint(args) => fingerprint::run(args, &cli.global).await,
            Command::Fetch(args) => fetch::run(args, &cli.global).await,
            Command::Cache(args) => cache::run(args, &cli.global).await,
            Command::Policy(args) => policy::run(args, &cli.global).await,
            Command::Convert(args) => convert::run(args, &cli.global).await,
            Command::Agent(args) => agent::run(args, &cli.global).await,
            Command::Submit(args) => submit::run(args).await,
            Command::Ls(args) => ls::run(args).await,
            Command::Status(args) => status::run(args).await,
            Command::Stop(args) => stop::run(args).await,
            Command::Logs(args) => logs::run(args).await,
            Command::NomadPlugin(args) => nomad_plugin::run(args, &cli.global).await,
            Command::Shim(_) => unreachable!("handled before the runtime"),
        }
    })
}

/// Verbs that look after VMs: a reader of their output that goes away
/// must not take them down (their writes fail with EPIPE instead, which
/// they ignore).
fn supervises(command: &Command) -> bool {
    matches!(
        command,
        Command::Run(_) | Command::Agent(_) | Command::NomadPlugin(_) | Command::Shim(_)
    )
}

/// The other verbs end as Unix tools do when their reader goes away
/// (`qemu-executor status ID | head -1`): quietly, by SIGPIPE, instead of
/// a panic in `println!`.
fn die_quietly_on_a_closed_pipe() {
    // SAFETY: called before any thread or runtime starts, and SIG_DFL is
    // the kernel's own default action, so no handler code runs in us.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The operator's configuration: `--config` if given, else defaults.
pub fn load_config(global: &GlobalOpts) -> anyhow::Result<qemu_executor::config::Config> {
    Ok(qemu_executor::config::Config::load_or_default(
        global.config.as_deref(),
    )?)
}

/// The host probe, with the operator's qemu binary if one is configured.
pub fn probe(
    global: &GlobalOpts,
    config: &qemu_executor::config::Config,
) -> qemu_executor::host::probe::Probe {
    let mut probe = qemu_executor::host::probe::Probe::new(global.state_dir());
    if let Some(binary) = &config.qemu.binary {
        probe.qemu_binary = Some(binary.clone());
    }
    probe
}

/// The policy chain: the `[[policy]]` entries of executor.toml, then those
/// given on the command line. Loading compiles modules (or reads them back
/// from the cache), so it runs on a blocking thread.
pub async fn load_chain(
    global: &GlobalOpts,
    config: &qemu_executor::config::Config,
    extra: Vec<qemu_executor::policy::PolicySpec>,
) -> anyhow::Result<qemu_executor::policy::Chain> {
    use qemu_executor::policy::{Chain, PolicyEngine, artifact_dir};
    let mut specs = config.policy_specs()?;
    specs.extend(extra);
    let engine = PolicyEngine::new(&artifact_dir(&global.cache_dir()))?;
    let chain = tokio::task::spawn_blocking(move || Chain::load(&engine, &specs)).await??;
    Ok(chain)
}

/// Prints an error with its whole chain of causes, as `main` does, control
/// characters escaped (messages carry URLs and servers' answers).
pub fn print_error(err: &dyn std::error::Error) {
    use qemu_executor::text::Printable;
    qemu_executor::eprint_line!("error: {}", Printable(&err.to_string()));
    let mut cause = err.source();
    while let Some(c) = cause {
        qemu_executor::eprint_line!("  caused by: {}", Printable(&c.to_string()));
        cause = c.source();
    }
}

/// The image cache: `--cache-dir` if given, else the default for this user.
pub fn open_cache(global: &GlobalOpts) -> anyhow::Result<qemu_executor::cache::Cache> {
    Ok(qemu_executor::cache::Cache::open(&global.cache_dir())?)
}

/// Resolves on the first SIGINT or SIGTERM, naming it.
pub async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // Without signal handlers the default action ends us anyway.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}
