//! How qemu is started: the command line, then qemu as our own child or
//! under a shim, and its QMP session.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use policy_sdk::{Accelerator, Task};

use super::{SuperviseError, TaskDir, Vm, describe_status};
use crate::logtail::log_tail;
use crate::qemu::cmdline::{BootMedium, CmdlineError, Confinement, QemuCommand};
use crate::qemu::process::{Spawn, VmProcess};
use crate::qemu::qmp::Qmp;
use crate::qemu::shim::ShimSpawn;

/// How long qemu gets to open its QMP socket.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a qemu whose QMP session failed gets to show it is exiting.
const EXIT_AFTER_QMP: Duration = Duration::from_secs(2);

/// How qemu is started.
#[derive(Debug, Clone)]
pub enum SpawnMode {
    /// As our own child, killed when we die (`run`, where nothing else
    /// would ever stop it).
    Direct,
    /// Under a shim in a session of its own, so that it outlives us and
    /// its exit status is kept (the agent, the Nomad plugin).
    Shim(ShimSettings),
}
/// What the shim needs besides qemu's command line.
#[derive(Debug, Clone)]
pub struct ShimSettings {
    /// The `qemu-executor` binary that runs `shim`.
    pub exe: PathBuf,
    pub exit_record: PathBuf,
    pub cgroups: Vec<PathBuf>,
    pub mount_namespace: bool,
    /// Logs the shim copies while qemu runs.
    pub forwards: Vec<crate::qemu::forward::Forward>,
}

/// What one launch needs besides the task.
pub struct Launch<'a> {
    pub qemu: &'a Path,
    pub task: &'a Task,
    pub accelerator: Accelerator,
    pub medium: BootMedium,
    pub dir: &'a TaskDir,
    pub extra_args: &'a [String],
    pub confinement: Confinement,
    pub spawn: &'a SpawnMode,
}

impl Launch<'_> {
    pub fn argv(&self) -> Result<Vec<std::ffi::OsString>, CmdlineError> {
        QemuCommand {
            name: &self.task.name,
            machine_type: &self.task.machine_type,
            accelerator: self.accelerator,
            memory_mb: self.task.memory_mb,
            cpus: self.task.cpus,
            medium: self.medium.clone(),
            ports: &self.task.ports,
            qmp_socket: &self.dir.qmp_socket(),
            serial_log: &self.dir.serial_log(),
            extra_args: self.extra_args,
            confinement: self.confinement.clone(),
        }
        .argv()
    }

    /// Starts qemu and negotiates QMP.
    pub async fn start(&self) -> Result<Vm, SuperviseError> {
        let argv = self.argv()?;
        // A stale socket from an earlier attempt would be connected to in
        // vain.
        let _ = std::fs::remove_file(self.dir.qmp_socket());
        let log_start = std::fs::metadata(self.dir.qemu_log()).map_or(0, |m| m.len());
        let mut process = match self.spawn {
            SpawnMode::Direct => VmProcess::Child(
                Spawn {
                    binary: self.qemu,
                    args: &argv,
                    dir: &self.dir.root,
                    log: &self.dir.qemu_log(),
                    die_with_parent: true,
                }
                .start()?,
            ),
            SpawnMode::Shim(shim) => VmProcess::Shimmed(
                ShimSpawn {
                    exe: &shim.exe,
                    qemu: self.qemu,
                    args: &argv,
                    dir: &self.dir.root,
                    log: &self.dir.qemu_log(),
                    exit_record: &shim.exit_record,
                    cgroups: &shim.cgroups,
                    mount_namespace: shim.mount_namespace,
                    forwards: &shim.forwards,
                }
                .start()
                .await?,
            ),
        };
        let socket = self.dir.qmp_socket();
        let qmp = tokio::select! {
            qmp = Qmp::connect(&socket, QMP_CONNECT_TIMEOUT) => qmp,
            status = process.wait() => {
                return Err(SuperviseError::EarlyExit {
                    status: describe_status(status),
                    log_tail: log_tail(&self.dir.qemu_log(), log_start),
                });
            }
        };
        let qmp = match qmp {
            Ok(q) => q,
            Err(e) => {
                // qemu that gives up on its own arguments (a host port it
                // cannot forward, say) opens the socket and exits: QMP then
                // fails first, but qemu's own message says why.
                if let Ok(status) = tokio::time::timeout(EXIT_AFTER_QMP, process.wait()).await {
                    return Err(SuperviseError::EarlyExit {
                        status: describe_status(status),
                        log_tail: log_tail(&self.dir.qemu_log(), log_start),
                    });
                }
                process.signal_group(Signal::SIGKILL);
                let _ = process.wait().await;
                return Err(e.into());
            }
        };
        let events = qmp.events();
        Ok(Vm {
            process,
            qmp,
            events,
            dir: self.dir.clone(),
            shutdown_by_guest: false,
            log_start,
        })
    }
}
