//! One VM's life: start qemu (as our child or under a shim), watch it
//! boot until every port really answers (or KVM turns out to lie), wait
//! for it to end, and stop it gracefully: ACPI power button, then `quit`,
//! then SIGKILL of the group.
//!
//! - `spawn`: the command line and the start, or the adoption of a qemu
//!   an earlier process started;
//! - `boot`: the boot watch (ports, serial marker, KVM failures);
//! - `stop`: stop requests and the graceful stop.

mod boot;
mod spawn;
mod stop;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use policy_sdk::{PortMapping, Task};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio_util::sync::CancellationToken;

use crate::logtail::log_tail;
use crate::qemu::cmdline::CmdlineError;
use crate::qemu::process::{ProcessError, ProcessIdentity, VmProcess};
use crate::qemu::qmp::{Event, Qmp, QmpError};

pub use boot::{Boot, BootWatch, kvm_failure};
pub use spawn::{Launch, ShimSettings, SpawnMode};
pub use stop::StopSignal;

/// How long a running qemu gets to answer on its QMP socket when adopted.
const ADOPT_QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long qemu's last events may take to arrive after its exit.
const LAST_EVENTS_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("Cannot build the qemu command line")]
    Cmdline(#[from] CmdlineError),
    #[error("Cannot start qemu")]
    Process(#[from] ProcessError),
    #[error("qemu exited before its QMP socket was up ({status}): {log_tail}")]
    EarlyExit { status: String, log_tail: String },
    #[error("Cannot talk to qemu over QMP")]
    Qmp(#[from] QmpError),
}

/// The files of one task.
#[derive(Debug, Clone)]
pub struct TaskDir {
    pub root: PathBuf,
}

impl TaskDir {
    pub fn serial_log(&self) -> PathBuf {
        self.root.join("serial.log")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.root.join("qemu.log")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.root.join("qmp.sock")
    }
    pub fn overlay(&self) -> PathBuf {
        self.root.join("disk.qcow2")
    }
    pub fn task_file(&self) -> PathBuf {
        self.root.join("task.json")
    }

    /// The directory's name: unique among tasks, safe as a file name; the
    /// holder of the task's image lease and the name of its cgroups.
    pub fn key(&self) -> String {
        self.root
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    }

    /// Creates a fresh task directory `<state>/tasks/<name>-<suffix>`;
    /// the error names the directory that could not be written.
    pub fn create(state_dir: &Path, name: &str) -> Result<TaskDir, (PathBuf, std::io::Error)> {
        let parent = state_dir.join("tasks");
        let make = || -> std::io::Result<PathBuf> {
            std::fs::create_dir_all(&parent)?;
            // A fresh directory, never one planted in advance: overlays and
            // sockets are only ever created inside it.
            let dir = tempfile::Builder::new()
                .prefix(&format!("{name}-"))
                .rand_bytes(6)
                .tempdir_in(&parent)?;
            Ok(dir.keep())
        };
        make()
            .map(|root| TaskDir { root })
            .map_err(|e| (parent.clone(), e))
    }

    /// Writes the final task as `task.json`, for whoever reads the
    /// directory later: whole or not at all, whenever we are killed.
    pub fn write_task(&self, task: &Task) -> std::io::Result<()> {
        use std::io::Write as _;
        let text = serde_json::to_string_pretty(task).expect("a task always serializes");
        let mut tmp = tempfile::NamedTempFile::new_in(&self.root)?;
        tmp.write_all(text.as_bytes())?;
        tmp.persist(self.task_file()).map_err(|e| e.error)?;
        Ok(())
    }
}

/// How a graceful stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopHow {
    /// The guest obeyed the ACPI power button.
    Powerdown,
    /// qemu was told to `quit` (graceful shutdown disabled for the task).
    Quit,
    /// The guest ignored the button until the kill timeout.
    Killed,
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The guest powered itself off.
    GuestShutdown,
    /// We stopped it, on a signal or a request.
    Stopped(StopHow),
    /// qemu ended on its own without a guest shutdown.
    QemuExited { status: String, log_tail: String },
    /// The guest never answered on its ports in time, and was stopped.
    NotReady { after: Duration },
    /// KVM failed this guest and the task forbids falling back to tcg.
    KvmUnusable { reason: String },
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::GuestShutdown => f.write_str("the guest shut down"),
            Ending::Stopped(StopHow::Powerdown) => {
                f.write_str("stopped: the guest powered off on the ACPI power button")
            }
            Ending::Stopped(StopHow::Quit) => f.write_str("stopped: qemu quit"),
            Ending::Stopped(StopHow::Killed) => {
                f.write_str("killed: the guest ignored the power button until the kill timeout")
            }
            Ending::QemuExited { status, log_tail } => {
                write!(f, "qemu failed ({status})")?;
                if !log_tail.is_empty() {
                    write!(f, ": {log_tail}")?;
                }
                Ok(())
            }
            Ending::NotReady { after } => {
                write!(f, "not ready after {}s; stopped", after.as_secs())
            }
            Ending::KvmUnusable { reason } => {
                write!(
                    f,
                    "KVM cannot run this guest ({reason}) and kvm_fallback is off"
                )
            }
        }
    }
}

/// A running qemu with its QMP session.
pub struct Vm {
    pub process: VmProcess,
    pub qmp: Qmp,
    events: broadcast::Receiver<Event>,
    pub dir: TaskDir,
    shutdown_by_guest: bool,
    /// Where this launch's output starts in qemu's log, which a relaunch
    /// appends to.
    log_start: u64,
}

/// A running VM as the launch pipeline drives it: a real qemu ([`Vm`]),
/// or a stand-in in the pipeline's tests.
pub trait Machine: Send {
    fn identity(&self) -> ProcessIdentity;
    /// The shim's identity, when qemu runs under one.
    fn shim(&self) -> Option<ProcessIdentity>;
    /// Watches the boot until every check passes, KVM fails, the VM ends,
    /// the ready timeout passes, or `cancel` fires.
    fn boot<'a>(
        &'a mut self,
        watch: &'a BootWatch<'a>,
        cancel: &'a CancellationToken,
        on_port: &'a mut (dyn FnMut(&PortMapping) + Send),
    ) -> impl Future<Output = Boot> + Send + 'a;
    /// Waits for the VM to end by itself (`Some`), or for `cancel`.
    fn wait<'a>(
        &'a mut self,
        cancel: &'a CancellationToken,
    ) -> impl Future<Output = Option<Ending>> + Send + 'a;
    /// Stops the VM: gracefully within `kill_timeout` when asked to, then
    /// for good; always reaps qemu.
    fn stop(
        &mut self,
        graceful: bool,
        kill_timeout: Duration,
    ) -> impl Future<Output = Ending> + Send + '_;
}

impl Machine for Vm {
    fn identity(&self) -> ProcessIdentity {
        self.process.identity()
    }

    fn shim(&self) -> Option<ProcessIdentity> {
        self.process.shim()
    }

    fn boot<'a>(
        &'a mut self,
        watch: &'a BootWatch<'a>,
        cancel: &'a CancellationToken,
        on_port: &'a mut (dyn FnMut(&PortMapping) + Send),
    ) -> impl Future<Output = Boot> + Send + 'a {
        Vm::boot(self, watch, cancel, on_port)
    }

    fn wait<'a>(
        &'a mut self,
        cancel: &'a CancellationToken,
    ) -> impl Future<Output = Option<Ending>> + Send + 'a {
        Vm::wait(self, cancel)
    }

    fn stop(
        &mut self,
        graceful: bool,
        kill_timeout: Duration,
    ) -> impl Future<Output = Ending> + Send + '_ {
        Vm::stop(self, graceful, kill_timeout)
    }
}

impl Vm {
    pub async fn adopt(process: VmProcess, dir: TaskDir) -> Result<Vm, SuperviseError> {
        let qmp = Qmp::connect(&dir.qmp_socket(), ADOPT_QMP_TIMEOUT).await?;
        let events = qmp.events();
        let log_start = std::fs::metadata(dir.qemu_log()).map_or(0, |m| m.len());
        Ok(Vm {
            process,
            qmp,
            events,
            dir,
            shutdown_by_guest: false,
            log_start,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn log_tail(&self) -> String {
        log_tail(&self.dir.qemu_log(), self.log_start)
    }

    async fn read_last_events(&mut self) {
        let _ = tokio::time::timeout(LAST_EVENTS_WAIT, self.qmp.closed()).await;
        loop {
            match self.events.try_recv() {
                Ok(ev) if ev.name == "SHUTDOWN" => {
                    self.shutdown_by_guest |= ev.data["guest"].as_bool() == Some(true);
                }
                Ok(_) | Err(TryRecvError::Lagged(_)) => {}
                Err(TryRecvError::Empty | TryRecvError::Closed) => return,
            }
        }
    }

    fn ending_after_exit(
        &self,
        status: std::io::Result<std::process::ExitStatus>,
        tail: String,
    ) -> Ending {
        match status {
            Ok(s) if s.success() && self.shutdown_by_guest => Ending::GuestShutdown,
            other => Ending::QemuExited {
                status: describe_status(other),
                log_tail: tail,
            },
        }
    }

    pub async fn wait(&mut self, cancel: &CancellationToken) -> Option<Ending> {
        loop {
            tokio::select! {
                status = self.process.wait() => {
                    self.read_last_events().await;
                    let tail = self.log_tail();
                    return Some(self.ending_after_exit(status, tail));
                }
                event = self.events.recv() => match event {
                    Ok(ev) if ev.name == "SHUTDOWN" => {
                        self.shutdown_by_guest |= ev.data["guest"].as_bool() == Some(true);
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => {
                        // Nothing more will come; only the exit is left.
                        let status = self.process.wait().await;
                        let tail = self.log_tail();
                        return Some(self.ending_after_exit(status, tail));
                    }
                },
                _ = cancel.cancelled() => return None,
            }
        }
    }
}

pub fn describe_status(status: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => format!(
                "killed by {}",
                Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.to_string())
            ),
            _ => s.to_string(),
        },
        Err(e) => format!("cannot wait for qemu: {e}"),
    }
}
