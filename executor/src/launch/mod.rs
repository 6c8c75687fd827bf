//! The one way a VM is run, for `run`, the agent and the Nomad plugin:
//!
//! 1. [`Pipeline::admit`]: host facts, the policy chain, the `args`
//!    allowlist. Once per task: the agent keeps the admission across
//!    restarts.
//! 2. [`Pipeline::plan`]: the accelerator on this host now, and qemu.
//! 3. [`Pipeline::prepare`]: `task.json`, the image fetched and leased (a
//!    stop wins over a slow download), the VM's cgroups and files.
//! 4. [`Pipeline::launch`]: boot, watch, fall back from a lying KVM, wait
//!    for the end or a stop; or [`Pipeline::adopt`] and
//!    [`Pipeline::resume`] for a VM an earlier process started.
//! 5. [`Pipeline::release`]: what the VM held goes back.
//!
//! Who owns the kvm→tcg decision: the `accel-fallback` policy may rewrite
//! the task before anything runs (an operator's choice, visible as a
//! diff); [`accelerator::choose`] then honours the task against this
//! host's facts; and only a guest that really fails under kvm makes
//! [`Pipeline::launch`] relaunch it under tcg and record the verdict that
//! the next two steps read.
//!
//! The front ends map [`Event`]s and the one [`LaunchError`] to their own
//! outputs. Everything that touches the host or the policy sandbox goes
//! through the [`Seam`], so the steps are unit-tested without qemu.

pub mod accelerator;
mod error;
mod event;
pub mod exit;
mod live;
mod seam;
mod supervise;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

use policy_sdk::{Accelerator, Checksum, HostFacts, Task};

use crate::config::Config;
use crate::fetch::{Fetched, ProgressObserver};
use crate::host::isolation::{Isolation, IsolationReport};
use crate::host::probe::QemuInfo;
use crate::policy::ChainOutcome;
use crate::qemu::forward::Forward;
use crate::vm::{StopSignal, TaskDir};

pub use error::{Kind, LaunchError};
pub use event::Event;
pub use exit::Exit;
pub use live::LiveSeam;
pub use seam::{Adoption, Found, Seam};
pub use supervise::Phase;

/// The steps, and what they run with.
pub struct Pipeline<S: Seam = LiveSeam> {
    pub config: Config,
    /// Task directories and the KVM verdict.
    pub state_dir: PathBuf,
    pub seam: S,
    /// VMs under shims that outlive us (the agent, the plugin), confined as
    /// this says; `None`: qemu is our child and dies with us (`run`).
    pub detached: Option<Detached>,
}

/// How detached VMs are started and confined.
pub struct Detached {
    /// The `qemu-executor` binary that runs `shim`.
    pub exe: PathBuf,
    pub isolation: Isolation,
}

/// A task the policies accepted, with its `args` checked.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub task: Task,
    pub extra_args: Vec<String>,
    /// The host facts the policies saw, which a plan made right after the
    /// admission reuses; `None` for an earlier admission (an agent's
    /// relaunch), whose plan probes the host again.
    facts: Option<HostFacts>,
}

impl Admitted {
    /// The admission of a task the chain accepted earlier (an agent's
    /// stored task): only the operator's `args` allowlist is checked again.
    pub fn of(task: Task, config: &Config) -> Result<Admitted, LaunchError> {
        let extra_args = config.args.check(&task.args)?;
        Ok(Admitted {
            task,
            extra_args,
            facts: None,
        })
    }
}

/// What this host runs the task with now.
#[derive(Debug, Clone)]
pub struct Plan {
    pub accelerator: Accelerator,
    /// Why the accelerator differs from the task's, if it does.
    pub reason: Option<String>,
    pub qemu: QemuInfo,
}

/// Where a task's VM lives, as its front end chose.
#[derive(Debug, Clone)]
pub struct Placement {
    pub dir: TaskDir,
    /// Where a detached VM's shim records qemu's end.
    pub exit_record: Option<PathBuf>,
    /// Logs the shim copies while qemu runs (Nomad's FIFOs).
    pub forwards: Vec<Forward>,
    /// A directory the front end vouches for, from which the task may read
    /// a `file://` image besides the operator's `[fetch] file_dirs`: a
    /// Nomad task's own directory, where its artifacts land.
    pub file_dir: Option<PathBuf>,
}

/// A task ready to boot.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub admitted: Admitted,
    pub plan: Plan,
    pub image: Fetched,
    pub cgroups: Vec<PathBuf>,
}

/// What a VM holds until [`Pipeline::release`].
#[derive(Debug, Clone)]
pub struct Holdings {
    pub dir: TaskDir,
    /// Every checksum the task leased (the submitted and the final one
    /// when a policy rewrote it).
    pub checksums: Vec<Checksum>,
    pub cgroups: Vec<PathBuf>,
    pub exit_record: Option<PathBuf>,
}

/// Creates a fresh task directory `<state>/tasks/<name>-<suffix>`.
pub fn task_dir(state_dir: &std::path::Path, name: &str) -> Result<TaskDir, LaunchError> {
    TaskDir::create(state_dir, name).map_err(|(path, source)| LaunchError::TaskDir { path, source })
}

impl<S: Seam> Pipeline<S> {
    /// Host facts and the policy chain, then the operator's `args`
    /// allowlist for what the chain let through.
    pub async fn admit(
        &self,
        task: Task,
        on_event: &mut (impl FnMut(Event<'_>) + Send),
    ) -> Result<Admitted, LaunchError> {
        let facts = self.seam.facts().await;
        on_event(Event::Facts(&facts));
        let outcome = self.seam.evaluate(task, &facts).await;
        on_event(Event::Policies(&outcome));
        match outcome {
            ChainOutcome::Accepted { task, .. } => Ok(Admitted {
                facts: Some(facts),
                ..Admitted::of(task, &self.config)?
            }),
            rejected @ ChainOutcome::Rejected { fault, .. } => Err(LaunchError::Rejected {
                summary: rejected.to_string(),
                fault,
            }),
        }
    }

    /// The accelerator this host gives the task now (for an earlier
    /// admission, a KVM verdict recorded since then counts), and qemu.
    pub async fn plan(
        &self,
        admitted: &Admitted,
        on_event: &mut (impl FnMut(Event<'_>) + Send),
    ) -> Result<Plan, LaunchError> {
        let facts = match &admitted.facts {
            Some(facts) => facts.clone(),
            None => self.seam.facts().await,
        };
        let (accelerator, reason) = accelerator::choose(&admitted.task, &facts)?;
        on_event(Event::Accelerator {
            requested: admitted.task.accelerator,
            chosen: accelerator,
            reason: reason.as_deref(),
        });
        let qemu = self.seam.qemu().await?;
        Ok(Plan {
            accelerator,
            reason,
            qemu,
        })
    }

    /// Writes `task.json`, fetches and leases the image (giving way to a
    /// stop), and confines a detached VM. A failure gives back what this
    /// step took.
    pub async fn prepare(
        &self,
        admitted: Admitted,
        plan: Plan,
        placement: &Placement,
        stop: &StopSignal,
        progress: Option<ProgressObserver>,
        on_event: &mut (impl FnMut(Event<'_>) + Send),
    ) -> Result<Prepared, LaunchError> {
        let task = &admitted.task;
        let dir = &placement.dir;
        dir.write_task(task).map_err(|source| LaunchError::Write {
            path: dir.task_file(),
            source,
        })?;
        let key = dir.key();
        let image = tokio::select! {
            fetched = self.seam.fetch(&task.image_source, &task.checksum, &key, placement.file_dir.as_deref(), progress) => fetched?,
            _ = stop.requested() => {
                // The fetch may have leased the image just before it was
                // dropped.
                if let Err(e) = self.seam.release_lease(&task.checksum, &key) {
                    tracing::warn!(task = %key, error = %crate::error_chain(&e), "cannot release the image lease");
                }
                return Err(LaunchError::Interrupted);
            }
        };
        on_event(Event::Image(&image));
        let cgroups = match self.confine(task, dir, on_event) {
            Ok(cgroups) => cgroups,
            Err((e, cgroups)) => {
                self.release(&Holdings {
                    dir: dir.clone(),
                    checksums: vec![task.checksum.clone()],
                    cgroups,
                    exit_record: None,
                });
                return Err(e);
            }
        };
        Ok(Prepared {
            admitted,
            plan,
            image,
            cgroups,
        })
    }

    /// A detached VM's cgroups and the files its user must own.
    fn confine(
        &self,
        task: &Task,
        dir: &TaskDir,
        on_event: &mut (impl FnMut(Event<'_>) + Send),
    ) -> Result<Vec<PathBuf>, (LaunchError, Vec<PathBuf>)> {
        let Some(detached) = &self.detached else {
            return Ok(Vec::new());
        };
        let isolation = &detached.isolation;
        let made = isolation.cgroups_for(&dir.key(), task.memory_mb, task.cpus);
        let mut report: IsolationReport = isolation.report();
        if let Some(m) = made.report {
            report.insert("cgroup".into(), m);
        }
        on_event(Event::Confined {
            cgroups: &made.paths,
            report: &report,
        });
        isolation
            .hand_over(&dir.root, &[dir.serial_log(), dir.qemu_log()])
            .map_err(|e| (e.into(), made.paths.clone()))?;
        Ok(made.paths)
    }

    /// Takes back a VM an earlier process started, by its shim's and
    /// qemu's identities; renews its lease first, so gc leaves its image.
    pub async fn adopt(&self, found: &Found, checksum: &Checksum) -> Adoption<S::Vm> {
        if let Err(e) = self.seam.renew_lease(checksum, &found.dir.key()) {
            tracing::warn!(task = %found.dir.key(), error = %crate::error_chain(&e), "cannot renew the image lease");
        }
        self.seam.adopt(found).await
    }

    /// Gives back what a VM held: its overlay, QMP socket, exit record,
    /// cgroups and leases. The logs and `task.json` stay.
    pub fn release(&self, holdings: &Holdings) {
        let dir = &holdings.dir;
        let files = [
            Some(dir.overlay()),
            Some(dir.qmp_socket()),
            holdings.exit_record.clone(),
        ];
        for leftover in files.into_iter().flatten() {
            let _ = std::fs::remove_file(leftover);
        }
        crate::host::isolation::remove_cgroups(&holdings.cgroups);
        let key = dir.key();
        let mut released: Vec<&Checksum> = Vec::new();
        for checksum in &holdings.checksums {
            if released.contains(&checksum) {
                continue;
            }
            released.push(checksum);
            if let Err(e) = self.seam.release_lease(checksum, &key) {
                tracing::warn!(task = %key, error = %crate::error_chain(&e), "cannot release the image lease");
            }
        }
    }

    /// Serial silence under kvm that counts as a hang; `None` disables it.
    fn kvm_stall(&self) -> Option<Duration> {
        (self.config.qemu.kvm_stall_s > 0)
            .then(|| Duration::from_secs(self.config.qemu.kvm_stall_s.into()))
    }
}
