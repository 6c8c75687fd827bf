//! `qemu-executor run TASK [--task NAME] [--policy FILE[=SETTINGS_JSON]]...`
//!
//! Prints what a person at the terminal needs on stdout (the policy diff,
//! the accelerator, one `ready:` line per port, how the VM ended); the step
//! by step log goes to stderr. The exit code says how it ended.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use policy_sdk::Task;
use qemu_executor::fetch::Fetcher;
use qemu_executor::launch::{
    self, Event, Exit, Holdings, LaunchError, LiveSeam, Pipeline, Placement,
};
use qemu_executor::policy::{ChainOutcome, PolicySpec};
use qemu_executor::vm::{Ending, StopSignal};
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
            return Ok(Exit::INVALID.into());
        }
    };
    // The operator's configuration and policies are input too: a bad file,
    // module, settings or sha256 pin exits 2, a policy that fails while
    // loading exits 3, as a policy failing on the task would.
    let config = match super::load_config(global) {
        Ok(config) => config,
        Err(e) => return Ok(report(&e, Exit::INVALID)),
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
            let code = if fault { Exit::REJECTED } else { Exit::INVALID };
            return Ok(report(&e, code));
        }
    };
    let fetcher = args
        .file_dirs
        .iter()
        .try_fold(Fetcher::new(config.fetch.clone())?, |f, dir| {
            std::path::absolute(dir).map(|dir| f.granting(dir))
        })?;
    let pipeline = Pipeline {
        seam: LiveSeam {
            probe: super::probe(global, &config),
            chain,
            fetcher,
            cache: super::open_cache(global)?,
        },
        state_dir: global.state_dir(),
        // qemu is our child and dies with us.
        detached: None,
        config,
    };

    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        let signal = super::interrupted().await;
        tracing::info!(%signal, "stopping");
        on_signal.cancel();
    });

    match run_task(&pipeline, task, &StopSignal::from_token(cancel)).await {
        Ok(ending) => {
            say!("ended: {ending}");
            Ok(ending.exit().into())
        }
        Err(e) => {
            super::print_error(&e);
            Ok(e.exit().into())
        }
    }
}

/// Every step of the pipeline in turn, printing as it goes; what the VM
/// held is given back however it ended.
async fn run_task(
    pipeline: &Pipeline,
    task: Task,
    stop: &StopSignal,
) -> Result<Ending, LaunchError> {
    let name = task.name.clone();
    let mut on_event = |event: Event<'_>| print_event(&name, event);
    let admitted = pipeline.admit(task, &mut on_event).await?;
    let plan = pipeline.plan(&admitted, &mut on_event).await?;
    let dir = launch::task_dir(&pipeline.state_dir, &admitted.task.name)?;
    say!("task dir: {}", dir.root.display());
    let placement = Placement {
        dir,
        exit_record: None,
        forwards: Vec::new(),
        // What `--allow-file-dir` opens is in the fetcher already.
        file_dir: None,
    };
    let checksum = admitted.task.checksum.clone();
    let prepared = pipeline
        .prepare(admitted, plan, &placement, stop, None, &mut on_event)
        .await?;
    let ended = pipeline
        .launch(&prepared, &placement, stop, &mut on_event)
        .await;
    pipeline.release(&Holdings {
        dir: placement.dir.clone(),
        checksums: vec![checksum],
        cgroups: Vec::new(),
        exit_record: None,
    });
    ended
}

fn print_event(task: &str, event: Event<'_>) {
    match event {
        Event::Facts(facts) => {
            tracing::info!(task, kvm = %facts.kvm, qemu = facts.qemu_version.as_deref().unwrap_or("none"), "host facts");
        }
        Event::Policies(outcome) => print_policies(outcome),
        Event::Accelerator { chosen, reason, .. } => match reason {
            Some(reason) => say!("accelerator: {chosen} ({reason})"),
            None => say!("accelerator: {chosen}"),
        },
        Event::Image(fetched) => {
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
        // `run` confines nothing beyond qemu's own sandbox.
        Event::Confined { .. } => {}
        Event::Started {
            pid, accelerator, ..
        } => say!("started: qemu pid {pid} under {accelerator}"),
        Event::PortReady(port) => say!(
            "ready: {} {}:{} -> guest {}",
            port.protocol,
            port.host_ip,
            port.host,
            port.guest
        ),
        Event::Ready { after } => say!("ready after {:.1}s", after.as_secs_f64()),
        Event::KvmFallback { reason } => {
            say!("kvm failed ({reason}); relaunching under tcg");
        }
        Event::Stopping => say!("stopping"),
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

fn report(err: &anyhow::Error, code: Exit) -> ExitCode {
    super::print_error(err.as_ref());
    code.into()
}
