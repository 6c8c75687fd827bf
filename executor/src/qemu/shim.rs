//! The per-VM shim: a tiny process (`qemu-executor shim`, in its own
//! session) that is qemu's parent, so that qemu's exit status is never lost
//! when the agent that launched it is gone.
//!
//! The agent cannot reap a qemu it did not start (after its own restart it
//! is no longer the parent), and a process's exit status only goes to its
//! parent. The shim joins the VM's cgroups, starts qemu in a session of its
//! own (in a private mount namespace when asked), tells the agent qemu's
//! pid and start time on stdout, waits for qemu, and writes the raw wait
//! status and the time into the exit record, atomically. qemu is bound to
//! the shim with `PR_SET_PDEATHSIG`, so a killed shim takes its VM along
//! instead of leaving one nobody can account for.

use std::ffi::OsString;
use std::io::Write as _;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{SigHandler, Signal, killpg, signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt as _;

use super::forward::{Forward, Forwarder};
use super::pidfd::PidFd;
use super::process::{ProcessError, ProcessIdentity};

/// How long the final copy of the logs may hold up the exit record.
const FORWARD_GRACE: Duration = Duration::from_secs(2);
/// How long the shim gets to start qemu and report its pid.
const REPORT_TIMEOUT: Duration = Duration::from_secs(15);
/// Signals the shim ignores: a terminal's, or a stray one to its group.
const IGNORED: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGPIPE,
];

/// Exit code of the shim when it could not start qemu.
pub const SHIM_FAILED: u8 = 125;

/// How qemu ended, as the shim saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub qemu_pid: u32,
    pub qemu_start_time: u64,
    /// The raw status from waitpid, so code and signal both survive.
    pub wait_status: i32,
    /// Milliseconds since the epoch.
    pub ended_at_ms: u64,
}

impl ExitRecord {
    pub fn status(&self) -> ExitStatus {
        ExitStatus::from_raw(self.wait_status)
    }

    /// The record at `path`, if the shim wrote one.
    pub fn read(path: &Path) -> Option<ExitRecord> {
        let text = std::fs::read(path).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Writes the record with temp file, fsync and rename, so a reader sees
    /// the whole record or none.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(&serde_json::to_vec(self).expect("a record serializes"))?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the shim is told on its command line.
#[derive(Debug, Clone)]
pub struct ShimArgs {
    pub exit_record: PathBuf,
    /// cgroup directories to join before qemu starts (one per hierarchy).
    pub cgroups: Vec<PathBuf>,
    pub mount_namespace: bool,
    pub dir: PathBuf,
    pub qemu: PathBuf,
    pub args: Vec<OsString>,
    /// Log files to copy elsewhere while qemu runs (a Nomad task's
    /// stdout and stderr).
    pub forwards: Vec<Forward>,
}

/// The shim's body. Its stderr is qemu's log; its stdout is the pipe on
/// which the agent waits for qemu's pid. Returns the shim's exit code.
pub fn run(args: &ShimArgs) -> u8 {
    match run_inner(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("qemu-executor shim: {e}");
            SHIM_FAILED
        }
    }
}

fn run_inner(args: &ShimArgs) -> std::io::Result<()> {
    // The agent's terminal, a stray group signal or the agent's death must
    // not take the shim down: only SIGKILL does, and takes qemu with it.
    for sig in IGNORED {
        // SAFETY: SIG_IGN installs no handler code.
        unsafe { signal(sig, SigHandler::SigIgn) }.map_err(std::io::Error::from)?;
    }
    let _ = std::fs::remove_file(&args.exit_record);
    let me = std::process::id().to_string();
    for cgroup in &args.cgroups {
        std::fs::write(cgroup.join("cgroup.procs"), &me).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot join {}: {e}", cgroup.display()))
        })?;
    }
    let stderr = std::io::stderr().as_fd_owned()?;
    let mut cmd = std::process::Command::new(&args.qemu);
    cmd.args(&args.args)
        .current_dir(&args.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stderr.try_clone()?))
        .stderr(Stdio::from(stderr));
    let shim_pid = nix::unistd::getpid();
    let private_mounts = args.mount_namespace;
    // SAFETY: runs between fork and exec and only makes async-signal-safe
    // system calls (sigaction, setsid, prctl, getppid, unshare, mount).
    unsafe {
        cmd.pre_exec(move || {
            // Ignored signals stay ignored across exec: give qemu back the
            // defaults, so that SIGTERM still ends it.
            for sig in IGNORED {
                signal(sig, SigHandler::SigDfl).map_err(std::io::Error::from)?;
            }
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // The shim may have died before the line above took effect.
            if nix::unistd::getppid() != shim_pid {
                return Err(std::io::Error::other("the shim is gone"));
            }
            if private_mounts {
                use nix::mount::{MsFlags, mount};
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                    .map_err(std::io::Error::from)?;
                // Nothing qemu's namespace mounts or unmounts reaches the
                // host, and the other way round.
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&str>,
                )
                .map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot start {}: {e}", args.qemu.display()),
        )
    })?;
    let identity = ProcessIdentity::of(child.id()).unwrap_or(ProcessIdentity {
        pid: child.id(),
        start_time: 0,
    });
    {
        let mut out = std::io::stdout().lock();
        // The agent may be gone already; qemu runs on regardless.
        let _ = writeln!(out, "qemu {} {}", identity.pid, identity.start_time);
        let _ = out.flush();
    }
    // Let go of the pipe, so the agent never blocks on it.
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(null);
    }
    let forwarders: Vec<Forwarder> = args
        .forwards
        .iter()
        .cloned()
        .map(Forwarder::start)
        .collect();
    let status = loop {
        match child.wait() {
            Ok(status) => break status,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    };
    for forwarder in forwarders {
        forwarder.finish(FORWARD_GRACE);
    }
    ExitRecord {
        qemu_pid: identity.pid,
        qemu_start_time: identity.start_time,
        wait_status: status.into_raw(),
        ended_at_ms: now_ms(),
    }
    .write(&args.exit_record)
}

trait StderrFd {
    fn as_fd_owned(&self) -> std::io::Result<std::os::fd::OwnedFd>;
}

impl StderrFd for std::io::Stderr {
    fn as_fd_owned(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd as _;
        self.as_fd().try_clone_to_owned()
    }
}

/// How the agent starts a shim.
pub struct ShimSpawn<'a> {
    /// The `qemu-executor` binary (the agent's own).
    pub exe: &'a Path,
    pub qemu: &'a Path,
    pub args: &'a [OsString],
    pub dir: &'a Path,
    /// qemu's log, which the shim's stderr also goes to.
    pub log: &'a Path,
    pub exit_record: &'a Path,
    pub cgroups: &'a [PathBuf],
    pub mount_namespace: bool,
    pub forwards: &'a [Forward],
}

impl ShimSpawn<'_> {
    /// The shim's command line after the program name.
    pub fn argv(&self) -> Vec<OsString> {
        let mut argv: Vec<OsString> = vec!["shim".into(), "--exit-record".into()];
        argv.push(self.exit_record.into());
        for cgroup in self.cgroups {
            argv.push("--cgroup".into());
            argv.push(cgroup.into());
        }
        if self.mount_namespace {
            argv.push("--mount-namespace".into());
        }
        for forward in self.forwards {
            argv.push("--forward-from".into());
            argv.push(forward.from.clone().into());
            argv.push("--forward-to".into());
            argv.push(forward.to.clone().into());
        }
        argv.extend(["--dir".into(), self.dir.into(), "--".into()]);
        argv.push(self.qemu.into());
        argv.extend(self.args.iter().cloned());
        argv
    }

    /// Starts the shim in a session of its own (it outlives the agent) and
    /// waits for it to report qemu's pid.
    pub async fn start(&self) -> Result<ShimmedQemu, ProcessError> {
        let spawn_err = |source: std::io::Error| ProcessError::Spawn {
            binary: self.exe.to_path_buf(),
            source,
        };
        let log = super::process::open_log(self.log)?;
        let log_start = log.metadata().map_or(0, |m| m.len());
        let mut cmd = std::process::Command::new(self.exe);
        cmd.args(self.argv())
            .current_dir(self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            // Quiet unless something goes wrong: it writes into qemu's log.
            .env("RUST_LOG", "warn");
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let mut child = tokio::process::Command::from(cmd)
            .spawn()
            .map_err(spawn_err)?;
        let shim_pid = child.id().unwrap_or(0);
        let shim = ProcessIdentity::of(shim_pid)
            .ok_or_else(|| spawn_err(std::io::Error::other("the shim ended before it started")))?;
        let pidfd = PidFd::open(&shim).map_err(spawn_err)?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(REPORT_TIMEOUT, lines.next_line()).await;
        let qemu = match line {
            Ok(Ok(Some(line))) => parse_report(&line),
            _ => None,
        };
        let Some(qemu) = qemu else {
            let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            return Err(spawn_err(std::io::Error::other(format!(
                "the shim did not start qemu ({}): {}",
                match status {
                    Ok(Ok(s)) => s.to_string(),
                    _ => "still running".to_string(),
                },
                crate::logtail::log_tail(self.log, log_start)
            ))));
        };
        tracing::info!(
            pid = qemu.pid,
            shim = shim.pid,
            "qemu started under its shim"
        );
        Ok(ShimmedQemu {
            qemu,
            shim,
            exit_record: self.exit_record.to_path_buf(),
            pidfd,
            child: Some(child),
            ended: None,
        })
    }
}

/// `qemu <pid> <start time>`, the shim's one line of report.
pub fn parse_report(line: &str) -> Option<ProcessIdentity> {
    let mut parts = line.split_whitespace();
    (parts.next()? == "qemu").then_some(())?;
    let pid = parts.next()?.parse().ok()?;
    let start_time = parts.next()?.parse().ok()?;
    Some(ProcessIdentity { pid, start_time })
}

/// A qemu supervised through its shim: started by this agent, or adopted
/// from an earlier one.
#[derive(Debug)]
pub struct ShimmedQemu {
    pub qemu: ProcessIdentity,
    pub shim: ProcessIdentity,
    exit_record: PathBuf,
    pidfd: PidFd,
    /// The shim when this agent started it, to reap it.
    child: Option<tokio::process::Child>,
    ended: Option<ExitStatus>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("The shim (pid {0}) is gone")]
    ShimGone(u32),
    #[error("Cannot watch the shim (pid {pid})")]
    Watch {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

impl ShimmedQemu {
    /// Takes over a VM whose shim an earlier agent started. Fails if the
    /// shim with that identity is gone (a reused pid is not it).
    pub fn adopt(
        qemu: ProcessIdentity,
        shim: ProcessIdentity,
        exit_record: PathBuf,
    ) -> Result<ShimmedQemu, AdoptError> {
        let pidfd = PidFd::open(&shim).map_err(|source| {
            if source.raw_os_error() == Some(libc::ESRCH) {
                AdoptError::ShimGone(shim.pid)
            } else {
                AdoptError::Watch {
                    pid: shim.pid,
                    source,
                }
            }
        })?;
        Ok(ShimmedQemu {
            qemu,
            shim,
            exit_record,
            pidfd,
            child: None,
            ended: None,
        })
    }

    /// Waits for the shim to end and returns qemu's status from its record.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.ended {
            return Ok(status);
        }
        self.pidfd.exited().await;
        self.finish().await
    }

    pub async fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        if let Some(status) = self.ended {
            return Ok(Some(status));
        }
        if !self.pidfd.has_exited() {
            return Ok(None);
        }
        self.finish().await.map(Some)
    }

    async fn finish(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(child) = &mut self.child {
            let _ = child.wait().await;
        }
        match ExitRecord::read(&self.exit_record) {
            Some(record) if record.qemu_pid == self.qemu.pid => {
                self.ended = Some(record.status());
                Ok(record.status())
            }
            _ => {
                // Killed before it could write: pdeathsig took qemu along,
                // but make sure of it.
                self.signal_group(Signal::SIGKILL);
                Err(std::io::Error::other(
                    "qemu's shim ended without recording how qemu ended",
                ))
            }
        }
    }

    /// Signals qemu's process group, if qemu is still the process it was.
    pub fn signal_group(&self, signal: Signal) {
        if !self.qemu.is_alive() {
            return;
        }
        if let Err(e) = killpg(Pid::from_raw(self.qemu.pid as i32), signal) {
            tracing::debug!(pid = self.qemu.pid, %signal, error = %e, "killpg failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_line() {
        assert_eq!(
            parse_report("qemu 42 12345\n"),
            Some(ProcessIdentity {
                pid: 42,
                start_time: 12345
            })
        );
        assert_eq!(parse_report("qemu 42"), None);
        assert_eq!(parse_report("bash 42 1"), None);
        assert_eq!(parse_report(""), None);
    }

    #[test]
    fn exit_record_round_trip_keeps_code_and_signal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exit.json");
        assert_eq!(ExitRecord::read(&path), None);
        let killed = ExitRecord {
            qemu_pid: 7,
            qemu_start_time: 9,
            wait_status: 9, // killed by SIGKILL
            ended_at_ms: 1,
        };
        killed.write(&path).unwrap();
        let back = ExitRecord::read(&path).unwrap();
        assert_eq!(back, killed);
        assert_eq!(back.status().signal(), Some(9));
        let clean = ExitRecord {
            wait_status: 3 << 8,
            ..killed
        };
        clean.write(&path).unwrap();
        assert_eq!(ExitRecord::read(&path).unwrap().status().code(), Some(3));
    }

    #[test]
    fn argv_ends_with_qemu_and_its_arguments() {
        let args: Vec<OsString> = vec!["-m".into(), "256".into()];
        let cgroups = vec![PathBuf::from("/sys/fs/cgroup/memory/qe/t")];
        let spawn = ShimSpawn {
            exe: Path::new("/usr/bin/qemu-executor"),
            qemu: Path::new("/usr/bin/qemu-system-x86_64"),
            args: &args,
            dir: Path::new("/var/lib/qe/tasks/t"),
            log: Path::new("/var/lib/qe/tasks/t/qemu.log"),
            exit_record: Path::new("/var/lib/qe/agent/exits/t.json"),
            cgroups: &cgroups,
            mount_namespace: true,
            forwards: &[Forward {
                from: PathBuf::from("/var/lib/qe/tasks/t/serial.log"),
                to: PathBuf::from("/nomad/alloc/a/logs/.web.stdout.fifo"),
            }],
        };
        let argv: Vec<String> = spawn
            .argv()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            argv,
            [
                "shim",
                "--exit-record",
                "/var/lib/qe/agent/exits/t.json",
                "--cgroup",
                "/sys/fs/cgroup/memory/qe/t",
                "--mount-namespace",
                "--forward-from",
                "/var/lib/qe/tasks/t/serial.log",
                "--forward-to",
                "/nomad/alloc/a/logs/.web.stdout.fifo",
                "--dir",
                "/var/lib/qe/tasks/t",
                "--",
                "/usr/bin/qemu-system-x86_64",
                "-m",
                "256"
            ]
        );
    }
}
