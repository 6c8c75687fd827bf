//! One task from file to end: host facts, the policy chain, the accelerator,
//! the image, the launch and the supervision. Shared by `run` and the agent.
//!
//! Policies run before the download, so a policy that refuses an image
//! source (or points it at a mirror) decides before a byte is fetched.

use std::path::PathBuf;
use std::time::Duration;

use policy_sdk::{Accelerator, HostFacts, Task};
use tokio_util::sync::CancellationToken;

use crate::cache::{Cache, CacheError};
use crate::config::Config;
use crate::fetch::{FetchError, Fetched, Fetcher};
use crate::fingerprint::{FingerprintError, Probe};
use crate::launcher::{self, HostSettings, LaunchError, LaunchEvent, Prepared};
use crate::passthrough::ArgsError;
use crate::policy::{Chain, ChainOutcome};
use crate::supervisor::{Ending, SpawnMode, StopSignal, TaskDir};

/// Exit codes of `run`, documented in the README.
pub mod exit {
    pub const ERROR: u8 = 1;
    pub const INVALID: u8 = 2;
    pub const REJECTED: u8 = 3;
    pub const FETCH: u8 = 4;
    pub const QEMU: u8 = 5;
    pub const INTERRUPTED: u8 = 130;
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Rejected(String),
    #[error("Task refused")]
    Args(#[from] ArgsError),
    #[error("Cannot fetch the image")]
    Fetch(#[from] FetchError),
    #[error("Cannot use the image cache")]
    Cache(#[from] CacheError),
    #[error("Cannot find qemu")]
    Qemu(#[from] FingerprintError),
    #[error("Cannot launch the task")]
    Launch(#[from] LaunchError),
    #[error("Cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Interrupted before the VM started; nothing was launched")]
    Interrupted,
}

impl RunError {
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Rejected(_) => exit::REJECTED,
            RunError::Args(_) => exit::INVALID,
            RunError::Fetch(_) => exit::FETCH,
            RunError::Qemu(_) | RunError::Launch(_) => exit::QEMU,
            RunError::Interrupted => exit::INTERRUPTED,
            RunError::Cache(_) | RunError::Write { .. } => exit::ERROR,
        }
    }
}

/// What happens on the way, for `run` to print and the agent to record.
#[derive(Debug)]
pub enum RunEvent<'a> {
    Facts(&'a HostFacts),
    Policies(&'a ChainOutcome),
    Accelerator {
        chosen: Accelerator,
        reason: Option<&'a str>,
    },
    Image(&'a Fetched),
    TaskDir(&'a TaskDir),
    Launch(LaunchEvent<'a>),
}

/// Everything a run needs that outlives one task.
pub struct Runner {
    pub config: Config,
    pub state_dir: PathBuf,
    pub cache: Cache,
    pub fetcher: Fetcher,
    pub chain: Chain,
    pub probe: Probe,
    /// qemu dies with the executor (`run`), or outlives it (agent).
    pub die_with_parent: bool,
}

impl Runner {
    /// Runs `task` until the VM ends, or until `cancel` stops it
    /// gracefully.
    pub async fn run(
        &self,
        task: Task,
        cancel: &CancellationToken,
        mut on_event: impl FnMut(RunEvent<'_>),
    ) -> Result<Ending, RunError> {
        let facts = self.probe.host_facts().await;
        on_event(RunEvent::Facts(&facts));

        let outcome = self.chain.evaluate(task, &facts).await;
        on_event(RunEvent::Policies(&outcome));
        let task = match outcome {
            ChainOutcome::Accepted { task, .. } => task,
            rejected @ ChainOutcome::Rejected { .. } => {
                return Err(RunError::Rejected(rejected.to_string()));
            }
        };
        let extra_args = self.config.args.check(&task.args)?;
        let (accelerator, reason) = launcher::choose_accelerator(&task, &facts)?;
        on_event(RunEvent::Accelerator {
            chosen: accelerator,
            reason: reason.as_deref(),
        });
        let qemu = self.probe.qemu().await?;

        let dir = launcher::create_task_dir(&self.state_dir, &task.name)?;
        on_event(RunEvent::TaskDir(&dir));
        write_task(&dir, &task)?;
        let holder = dir
            .root
            .file_name()
            .map_or_else(|| task.name.clone(), |n| n.to_string_lossy().into_owned());
        let fetch = self.fetcher.fetch_leased(
            &self.cache,
            &task.image_source,
            &task.checksum,
            &holder,
            std::process::id(),
        );
        let (fetched, lease) = tokio::select! {
            r = fetch => r?,
            _ = cancel.cancelled() => return Err(RunError::Interrupted),
        };
        on_event(RunEvent::Image(&fetched));

        let host = HostSettings {
            qemu: qemu.binary.clone(),
            qemu_version: Some(qemu.version.clone()),
            state_dir: self.state_dir.clone(),
            sandbox: self.config.qemu.sandbox,
            kvm_stall: (self.config.qemu.kvm_stall_s > 0)
                .then(|| Duration::from_secs(self.config.qemu.kvm_stall_s.into())),
            spawn: SpawnMode::Direct {
                die_with_parent: self.die_with_parent,
            },
            chroot: false,
            runas: None,
            owner: None,
        };
        let prepared = Prepared {
            task: &task,
            accelerator,
            image: &fetched.path,
            extra_args: &extra_args,
            dir: &dir,
        };
        let stop = StopSignal::from_token(cancel.clone());
        let ended = launcher::launch(&host, prepared, &stop, |e| {
            on_event(RunEvent::Launch(e));
        })
        .await;

        // The overlay and socket are the VM's; the logs and task stay.
        for leftover in [dir.overlay(), dir.qmp_socket()] {
            let _ = std::fs::remove_file(leftover);
        }
        if let Err(e) = lease.release() {
            tracing::warn!(task = %task.name, error = %crate::error_chain(&e), "cannot release the image lease");
        }
        Ok(ended?)
    }
}

fn write_task(dir: &TaskDir, task: &Task) -> Result<(), RunError> {
    let path = dir.root.join("task.json");
    let text = serde_json::to_string_pretty(task).expect("a task always serializes");
    std::fs::write(&path, text).map_err(|source| RunError::Write { path, source })
}
