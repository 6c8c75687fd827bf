//! One VM's life: start qemu, watch it boot until every port really
//! answers (or KVM turns out to lie), wait for it to end, and stop it
//! gracefully: ACPI power button, then `quit`, then SIGKILL of the group.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use policy_sdk::{Accelerator, PortMapping, Task};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::logtail::LogTail;
use crate::qemu::cmdline::{BootMedium, CmdlineError, Confinement, QemuCommand};
use crate::qemu::process::{ProcessError, Spawn, VmProcess};
use crate::qemu::qmp::{Event, Qmp, QmpError};
use crate::qemu::shim::ShimSpawn;
use crate::readiness;

mod spawn;
mod stop;

pub use spawn::{ShimSettings, SpawnMode};
pub use stop::StopSignal;

/// How long qemu gets to open its QMP socket.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a running qemu gets to answer on its QMP socket when adopted.
const ADOPT_QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// After `quit`, how long before SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(3);
/// How long qemu's last events may take to arrive after its exit.
const LAST_EVENTS_WAIT: Duration = Duration::from_secs(1);
/// How often logs are read while the guest boots.
const BOOT_TICK: Duration = Duration::from_millis(200);
/// Under kvm, how long a guest with nothing to check (no port check, no
/// console line) is still watched for KVM's failures before it counts as
/// ready. A lying KVM fails a guest in its first seconds; declaring it
/// ready at once would leave it hung under kvm with no fallback.
const KVM_WATCH: Duration = Duration::from_secs(30);

/// Lines in qemu's own output that mean KVM cannot run this guest.
const KVM_FAILURE_MARKERS: [&str; 5] = [
    "KVM internal error",
    "kvm run failed",
    "failed to initialize kvm",
    "Could not access KVM kernel module",
    "KVM: entry failed",
];

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

impl Ending {
    /// The exit code `run` ends with; documented in the README.
    pub fn exit_code(&self) -> u8 {
        match self {
            Ending::GuestShutdown | Ending::Stopped(StopHow::Powerdown | StopHow::Quit) => 0,
            Ending::QemuExited { .. } | Ending::KvmUnusable { .. } => 5,
            Ending::Stopped(StopHow::Killed) => 6,
            Ending::NotReady { .. } => 7,
        }
    }
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

/// How the boot went.
#[derive(Debug)]
pub enum Boot {
    Ready,
    /// KVM failed this guest; the reason says how it showed.
    KvmFailed(String),
    Ended(Ending),
    NotReady,
    Cancelled,
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
            SpawnMode::Direct { die_with_parent } => VmProcess::Child(
                Spawn {
                    binary: self.qemu,
                    args: &argv,
                    dir: &self.dir.root,
                    log: &self.dir.qemu_log(),
                    die_with_parent: *die_with_parent,
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

/// What the boot watch needs to know.
pub struct BootWatch<'a> {
    pub ports: &'a [PortMapping],
    pub ready_serial: Option<&'a str>,
    pub ready_timeout: Duration,
    /// Whether this boot runs under kvm, where a failure may be KVM's.
    pub under_kvm: bool,
    /// Under kvm: a guest that prints nothing on its serial console for
    /// this long is taken as hung. `None` outside kvm or when disabled.
    pub kvm_stall: Option<Duration>,
}

impl Vm {
    /// Takes over a running qemu that an earlier agent started: connects
    /// to its QMP socket (qemu accepts a new client once the old one is
    /// gone).
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

    /// The last lines qemu wrote in this launch.
    fn log_tail(&self) -> String {
        log_tail(&self.dir.qemu_log(), self.log_start)
    }

    /// Watches the boot until every port answers (and the serial marker
    /// shows, if the task names one). `on_port` is called once per port as
    /// it becomes ready.
    pub async fn boot(
        &mut self,
        watch: &BootWatch<'_>,
        cancel: &CancellationToken,
        mut on_port: impl FnMut(&PortMapping),
    ) -> Boot {
        let started = Instant::now();
        let deadline = started + watch.ready_timeout;
        let mut serial = LogTail::new(self.dir.serial_log());
        let mut qemu_log = LogTail::starting_at(self.dir.qemu_log(), self.log_start);
        let mut last_serial_growth = started;
        let mut serial_ok = watch.ready_serial.is_none();
        let guest_checked = readiness::guest_is_checked(watch.ports, watch.ready_serial);
        let kvm_watch_until = (watch.under_kvm && !guest_checked).then(|| started + KVM_WATCH);

        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(watch.ports.len().max(1));
        let mut probes = tokio::task::JoinSet::new();
        for (i, port) in watch.ports.iter().enumerate() {
            let (port, tx) = (port.clone(), ready_tx.clone());
            probes.spawn(async move {
                readiness::wait_for(&port).await;
                let _ = tx.send(i).await;
            });
        }
        drop(ready_tx);
        let mut pending_ports = watch.ports.len();
        let mut tick = tokio::time::interval(BOOT_TICK);

        loop {
            let kvm_watched = kvm_watch_until.is_none_or(|until| Instant::now() >= until);
            if pending_ports == 0 && serial_ok && kvm_watched {
                return Boot::Ready;
            }
            tokio::select! {
                status = self.process.wait() => {
                    self.read_last_events().await;
                    let tail = self.log_tail();
                    if watch.under_kvm && let Some(marker) = kvm_failure(&tail) {
                        return Boot::KvmFailed(marker);
                    }
                    return Boot::Ended(self.ending_after_exit(status, tail));
                }
                event = self.events.recv() => {
                    match event {
                        Ok(ev) => if let Some(boot) = self.on_boot_event(&ev, watch.under_kvm).await {
                            return boot;
                        },
                        Err(RecvError::Lagged(_)) => {}
                        // The connection is gone; qemu's exit follows.
                        Err(RecvError::Closed) => {
                            let status = self.process.wait().await;
                            let tail = self.log_tail();
                            return Boot::Ended(self.ending_after_exit(status, tail));
                        }
                    }
                }
                Some(i) = ready_rx.recv() => {
                    on_port(&watch.ports[i]);
                    pending_ports -= 1;
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    if serial.poll() {
                        last_serial_growth = now;
                    }
                    if let Some(marker) = watch.ready_serial
                        && !serial_ok
                        && serial.contains(marker)
                    {
                        serial_ok = true;
                    }
                    qemu_log.poll();
                    if watch.under_kvm && let Some(marker) = kvm_failure(qemu_log.text()) {
                        return Boot::KvmFailed(marker);
                    }
                    if let Some(stall) = watch.kvm_stall
                        && now - last_serial_growth >= stall
                    {
                        return Boot::KvmFailed(format!(
                            "no output on the serial console for {}s under kvm",
                            stall.as_secs()
                        ));
                    }
                    if now >= deadline {
                        // Only the KVM watch left: the guest has nothing
                        // else to show.
                        if pending_ports == 0 && serial_ok {
                            return Boot::Ready;
                        }
                        return Boot::NotReady;
                    }
                }
                _ = cancel.cancelled() => return Boot::Cancelled,
            }
        }
    }

    async fn on_boot_event(&mut self, event: &Event, under_kvm: bool) -> Option<Boot> {
        match event.name.as_str() {
            "SHUTDOWN" => {
                self.shutdown_by_guest |= event.data["guest"].as_bool() == Some(true);
                None
            }
            "STOP" => match self.qmp.status().await.as_deref() {
                Ok("internal-error") if under_kvm => Some(Boot::KvmFailed(
                    "KVM internal error: qemu stopped the guest (query-status: internal-error)"
                        .into(),
                )),
                Ok("internal-error") => Some(Boot::Ended(Ending::QemuExited {
                    status: "internal error (query-status: internal-error)".into(),
                    log_tail: self.log_tail(),
                })),
                _ => None,
            },
            "GUEST_PANICKED" => Some(Boot::Ended(Ending::QemuExited {
                status: "guest panicked".into(),
                log_tail: String::new(),
            })),
            _ => None,
        }
    }

    /// Reads the events qemu sent before it exited. Its exit and its last
    /// events (the guest's SHUTDOWN) race to us; once its side of the
    /// socket has closed, everything it sent is queued. Without this a
    /// guest's power-off could pass for a failure.
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

    /// Waits for the VM to end by itself, or for `cancel`.
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

    /// Stops the VM: the ACPI power button and up to `kill_timeout` for
    /// the guest to power off (when `graceful`), then `quit`, then SIGKILL
    /// of the process group. Always reaps qemu.
    pub async fn stop(&mut self, graceful: bool, kill_timeout: Duration) -> Ending {
        if let Ok(Some(status)) = self.process.try_wait().await {
            let tail = self.log_tail();
            return self.ending_after_exit(Ok(status), tail);
        }
        if graceful {
            tracing::info!(
                pid = self.pid(),
                timeout_s = kill_timeout.as_secs(),
                "pressing the ACPI power button"
            );
            if let Err(e) = self.qmp.execute("system_powerdown", None).await {
                tracing::warn!(error = %e, "system_powerdown failed");
            }
            let never = CancellationToken::new();
            if let Ok(ending) = tokio::time::timeout(kill_timeout, self.wait(&never)).await {
                return match ending {
                    Some(Ending::GuestShutdown) => Ending::Stopped(StopHow::Powerdown),
                    Some(other) => other,
                    None => unreachable!("never cancelled"),
                };
            }
            tracing::warn!(
                pid = self.pid(),
                "the guest ignored the power button; stopping qemu"
            );
        }
        let how = if graceful {
            StopHow::Killed
        } else {
            StopHow::Quit
        };
        let _ = tokio::time::timeout(QUIT_GRACE, self.qmp.execute("quit", None)).await;
        if tokio::time::timeout(QUIT_GRACE, self.process.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                pid = self.pid(),
                "qemu did not quit; killing its process group"
            );
            self.process.signal_group(Signal::SIGKILL);
            let _ = self.process.wait().await;
        }
        Ending::Stopped(how)
    }
}

/// The marker line that shows KVM failed, if `log` has one.
pub fn kvm_failure(log: &str) -> Option<String> {
    log.lines()
        .find(|line| KVM_FAILURE_MARKERS.iter().any(|m| line.contains(m)))
        .map(|line| line.trim().to_string())
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

/// The last lines of qemu's own log from byte `from` on, for error
/// messages.
pub fn log_tail(path: &Path, from: u64) -> String {
    let mut tail = LogTail::starting_at(path.to_path_buf(), from);
    tail.poll();
    let text = tail.text();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_markers() {
        let log = "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.pni [bit 0]\nKVM internal error. Suberror: 1\nextra data[0]: 0x1\n";
        assert_eq!(
            kvm_failure(log).as_deref(),
            Some("KVM internal error. Suberror: 1")
        );
        assert_eq!(
            kvm_failure("qemu-system-x86_64: -accel kvm: failed to initialize kvm: No such file or directory").as_deref(),
            Some("qemu-system-x86_64: -accel kvm: failed to initialize kvm: No such file or directory")
        );
        assert_eq!(
            kvm_failure("qemu-system-x86_64: warning: something else"),
            None
        );
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Ending::GuestShutdown.exit_code(), 0);
        assert_eq!(Ending::Stopped(StopHow::Powerdown).exit_code(), 0);
        assert_eq!(Ending::Stopped(StopHow::Killed).exit_code(), 6);
        assert_eq!(
            Ending::NotReady {
                after: Duration::from_secs(1)
            }
            .exit_code(),
            7
        );
        assert_eq!(
            Ending::QemuExited {
                status: "exit code 1".into(),
                log_tail: String::new()
            }
            .exit_code(),
            5
        );
    }

    #[test]
    fn tail_keeps_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "1\n2\n\n3\n4\n5\n6\n7\n").unwrap();
        assert_eq!(log_tail(&p, 0), "3 | 4 | 5 | 6 | 7");
        assert_eq!(log_tail(&p, 9), "5 | 6 | 7");
        assert_eq!(log_tail(&dir.path().join("missing"), 0), "");
    }
}
