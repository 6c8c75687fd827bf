//! `qemu-executor run TASK [--task NAME] [--policy FILE[=SETTINGS_JSON]]...`
//!
//! Prints what a person at the terminal needs on stdout (the policy diff,
//! the accelerator, one `ready:` line per port, how the VM ended); the step
//! by step log goes to stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use qemu_executor::fetch::Fetcher;
use qemu_executor::launcher::LaunchEvent;
use qemu_executor::policy::{ChainOutcome, PolicySpec};
use qemu_executor::runner::{RunEvent, Runner, exit};
use tokio_util::sync::CancellationToken;

use super::{GlobalOpts, say};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Task file (.toml, .json) or the scheduler's job file (.hcl, .nomad).
    pub task: PathBuf,
    /// The job file's qemu task to run, as TASK or GROUP/TASK; needed when
    /// the job has several.
    #[arg(long = "task", value_name = "NAME")]
    pub task_name: Option<String>,
    /// A policy to run before launch, after those of executor.toml:
    /// FILE or FILE=SETTINGS_JSON. Repeatable; order matters.
    #[arg(long = "policy", value_name = "FILE[=SETTINGS_JSON]")]
    pub policies: Vec<String>,
    /// A directory `file://` image sources may be read from, besides
    /// `[fetch] file_dirs`. Repeatable. None by default: the task file may
    /// not be the operator's (CI), and `run` often runs as root.
    #[arg(long = "allow-file-dir", value_name = "DIR")]
    pub file_dirs: Vec<PathBuf>,
}

pub async fn run(args: RunArgs, global: &GlobalOpts) -> anyhow::Result<ExitCode> {
    let task = match qemu_executor::jobfile::load_task(&args.task, args.task_name.as_deref()) {
        Ok(task) => task,
        Err(e) => {
            super::print_error(&e);
            return Ok(ExitCode::from(exit::INVALID));
        }
    };
    // The operator's configuration and policies are input too: a bad file,
    // module, settings or sha256 pin exits 2, a policy that fails while
    // loading exits 3, as a policy failing on the task would.
    let config = match super::load_config(global) {
        Ok(config) => config,
        Err(e) => return Ok(report(&e, exit::INVALID)),
    };
    let extra: Vec<PolicySpec> = args
        .policies
        .iter()
        .map(|p| PolicySpec::parse_cli(p))
        .collect();
    let chain = match super::load_chain(global, &config, extra).await {
        Ok(chain) => chain,
        Err(e) => {
            let fault = e
                .downcast_ref::<qemu_executor::policy::PolicyError>()
                .is_some_and(|p| p.is_fault());
            let code = if fault { exit::REJECTED } else { exit::INVALID };
            return Ok(report(&e, code));
        }
    };
    let probe = super::probe(global, &config);
    let fetcher = args
        .file_dirs
        .iter()
        .try_fold(Fetcher::new(config.fetch.clone())?, |f, dir| {
            std::path::absolute(dir).map(|dir| f.granting(dir))
        })?;
    let runner = Runner {
        fetcher,
        cache: super::open_cache(global)?,
        state_dir: global.state_dir(),
        chain,
        probe,
        die_with_parent: true,
        config,
    };

    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        let signal = super::interrupted().await;
        tracing::info!(%signal, "stopping");
        on_signal.cancel();
    });

    let name = task.name.clone();
    match runner
        .run(task, &cancel, |event| print_event(&name, event))
        .await
    {
        Ok(ending) => {
            say!("ended: {ending}");
            Ok(ExitCode::from(ending.exit_code()))
        }
        Err(e) => {
            super::print_error(&e);
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}

fn print_event(task: &str, event: RunEvent<'_>) {
    match event {
        RunEvent::Facts(facts) => {
            tracing::info!(task, kvm = %facts.kvm, qemu = facts.qemu_version.as_deref().unwrap_or("none"), "host facts");
        }
        RunEvent::Policies(outcome) => print_policies(outcome),
        RunEvent::Accelerator { chosen, reason } => match reason {
            Some(reason) => say!("accelerator: {chosen} ({reason})"),
            None => say!("accelerator: {chosen}"),
        },
        RunEvent::TaskDir(dir) => say!("task dir: {}", dir.root.display()),
        RunEvent::Image(fetched) => {
            let how = if fetched.cache_hit {
                "cached"
            } else {
                "downloaded"
            };
            say!(
                "image: {} ({how}, {} bytes)",
                fetched.path.display(),
                fetched.size
            );
        }
        RunEvent::Launch(event) => print_launch(event),
    }
}

fn print_policies(outcome: &ChainOutcome) {
    for step in outcome.steps() {
        match &step.reason {
            Some(reason) => say!(
                "policy {}: {} ({reason})",
                step.policy,
                step.decision.as_str()
            ),
            None => say!("policy {}: {}", step.policy, step.decision.as_str()),
        }
        for change in &step.diff {
            say!("  {change}");
        }
    }
}

fn print_launch(event: LaunchEvent<'_>) {
    match event {
        LaunchEvent::Started {
            pid, accelerator, ..
        } => {
            say!("started: qemu pid {pid} under {accelerator}");
        }
        LaunchEvent::PortReady(port) => say!(
            "ready: {} {}:{} -> guest {}",
            port.protocol,
            port.host_ip,
            port.host,
            port.guest
        ),
        LaunchEvent::Ready { after } => say!("ready after {:.1}s", after.as_secs_f64()),
        LaunchEvent::KvmFallback { reason } => {
            say!("kvm failed ({reason}); relaunching under tcg");
        }
        LaunchEvent::Stopping => say!("stopping"),
    }
}

fn report(err: &anyhow::Error, code: u8) -> ExitCode {
    super::print_error(err.as_ref());
    ExitCode::from(code)
}
