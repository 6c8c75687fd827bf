//! The qemu process: its own session and process group, logs in files that
//! outlive us, identified by pid plus start time, always reaped.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("Cannot open qemu's log file {}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot start {}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A process we can recognise again: a reused pid has another start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessIdentity {
    pub pid: u32,
    /// Field 22 of /proc/PID/stat: clock ticks since boot.
    pub start_time: u64,
}

impl ProcessIdentity {
    pub fn of(pid: u32) -> Option<Self> {
        Some(ProcessIdentity {
            pid,
            start_time: start_time(pid)?,
        })
    }

    /// Whether this very process still exists (a zombie counts as gone).
    pub fn is_alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .ok()
            .and_then(|stat| parse_stat(&stat))
            .is_some_and(|(state, start)| start == self.start_time && state != 'Z')
    }
}

/// Reads the start time of `pid`, if it exists.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, start)| start)
}

/// State and start time from a /proc/PID/stat line. The command name in
/// field 2 may hold spaces and parentheses, so fields are counted after the
/// last ')'.
pub fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `state` was field 3; the start time is field 22.
    let start = fields.nth(22 - 4)?.parse().ok()?;
    Some((state, start))
}

/// A running qemu that we started.
#[derive(Debug)]
pub struct QemuProcess {
    child: tokio::process::Child,
    pub identity: ProcessIdentity,
}

/// How to start qemu.
pub struct Spawn<'a> {
    pub binary: &'a Path,
    pub args: &'a [OsString],
    pub dir: &'a Path,
    /// qemu's stdout and stderr go here, appended, so they survive us.
    pub log: &'a Path,
    /// Kill qemu when the thread that started it dies (for `run`, where
    /// nothing else would ever stop it). The agent leaves this off so its
    /// VMs outlive it.
    pub die_with_parent: bool,
}

/// Opens qemu's log for appending: a relaunch adds to what came before.
pub fn open_log(path: &Path) -> Result<std::fs::File, ProcessError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| ProcessError::Log {
            path: path.to_path_buf(),
            source,
        })
}

impl Spawn<'_> {
    pub fn start(&self) -> Result<QemuProcess, ProcessError> {
        let log = open_log(self.log)?;
        let log_err = log.try_clone().map_err(|source| ProcessError::Log {
            path: self.log.to_path_buf(),
            source,
        })?;
        let mut cmd = std::process::Command::new(self.binary);
        cmd.args(self.args)
            .current_dir(self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let die_with_parent = self.die_with_parent;
        // SAFETY: the closure runs in the child between fork and exec and
        // only makes async-signal-safe system calls (setsid, prctl).
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                if die_with_parent {
                    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                        .map_err(std::io::Error::from)?;
                }
                Ok(())
            });
        }
        let child = tokio::process::Command::from(cmd)
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                binary: self.binary.to_path_buf(),
                source,
            })?;
        let pid = child.id().unwrap_or(0);
        let identity = ProcessIdentity {
            pid,
            start_time: start_time(pid).unwrap_or(0),
        };
        tracing::info!(pid, "qemu started");
        Ok(QemuProcess { child, identity })
    }
}

impl QemuProcess {
    pub fn pid(&self) -> u32 {
        self.identity.pid
    }

    /// Waits for qemu to exit and reaps it.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Signals qemu's whole process group (it leads its own session).
    pub fn signal_group(&self, signal: Signal) {
        if let Err(e) = killpg(Pid::from_raw(self.identity.pid as i32), signal) {
            tracing::debug!(pid = self.identity.pid, %signal, error = %e, "killpg failed");
        }
    }
}

/// The qemu a [`crate::vm::Vm`] supervises: a child of ours
/// (`run`), or a child of its shim (the agent), started by this agent or
/// adopted from an earlier one.
#[derive(Debug)]
pub enum VmProcess {
    Child(QemuProcess),
    Shimmed(super::shim::ShimmedQemu),
}

impl VmProcess {
    pub fn identity(&self) -> ProcessIdentity {
        match self {
            VmProcess::Child(p) => p.identity,
            VmProcess::Shimmed(s) => s.qemu,
        }
    }

    pub fn pid(&self) -> u32 {
        self.identity().pid
    }

    /// The shim's identity, for a shimmed qemu.
    pub fn shim(&self) -> Option<ProcessIdentity> {
        match self {
            VmProcess::Child(_) => None,
            VmProcess::Shimmed(s) => Some(s.shim),
        }
    }

    /// Waits for qemu to end and returns its status.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self {
            VmProcess::Child(p) => p.wait().await,
            VmProcess::Shimmed(s) => s.wait().await,
        }
    }

    pub async fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        match self {
            VmProcess::Child(p) => p.try_wait(),
            VmProcess::Shimmed(s) => s.try_wait().await,
        }
    }

    pub fn signal_group(&self, signal: Signal) {
        match self {
            VmProcess::Child(p) => p.signal_group(signal),
            VmProcess::Shimmed(s) => s.signal_group(signal),
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        // Only reached with qemu still running if the supervisor itself
        // failed: never leave the VM behind.
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal_group(Signal::SIGKILL);
            let _ = self.child.start_kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_awkward_command_names() {
        let stat = "12345 (qemu (x) y) S 1 12345 12345 0 -1 4194560 1234 0 0 0 10 5 0 0 20 0 3 0 98765 123456 789 18446744073709551615";
        assert_eq!(parse_stat(stat), Some(('S', 98765)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) R 1 2"), None);
    }

    #[test]
    fn own_identity_is_alive_and_a_different_start_time_is_not() {
        let me = ProcessIdentity::of(std::process::id()).unwrap();
        assert!(me.is_alive());
        let impostor = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!impostor.is_alive());
    }

    #[tokio::test]
    async fn spawned_process_leads_its_own_group_and_is_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out.log");
        let args: Vec<OsString> = vec!["-c".into(), "echo hello >&2; sleep 30".into()];
        let mut p = Spawn {
            binary: Path::new("/bin/sh"),
            args: &args,
            dir: dir.path(),
            log: &log,
            die_with_parent: true,
        }
        .start()
        .unwrap();
        let pid = p.pid() as i32;
        assert_eq!(
            nix::unistd::getpgid(Some(Pid::from_raw(pid))).unwrap(),
            Pid::from_raw(pid)
        );
        assert_eq!(
            nix::unistd::getsid(Some(Pid::from_raw(pid))).unwrap(),
            Pid::from_raw(pid)
        );
        assert!(p.identity.is_alive());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string(&log).unwrap().contains("hello") {
            assert!(
                std::time::Instant::now() < deadline,
                "stderr never reached the log"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        p.signal_group(Signal::SIGKILL);
        let status = p.wait().await.unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        assert!(!p.identity.is_alive());
    }
}
