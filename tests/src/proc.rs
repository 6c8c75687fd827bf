//! Child processes for tests: each in its own process group, killed with
//! the whole group and reaped when dropped, so a failing test leaves no
//! qemu behind.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// A child in its own process group, killed with that group on drop.
pub struct GroupChild {
    child: Option<Child>,
    pgid: Pid,
}

impl GroupChild {
    pub fn spawn(mut cmd: Command) -> io::Result<Self> {
        cmd.process_group(0);
        let child = cmd.spawn()?;
        let pgid = Pid::from_raw(child.id() as i32);
        Ok(GroupChild {
            child: Some(child),
            pgid,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child not yet taken")
    }

    pub fn signal(&self, signal: Signal) {
        let _ = nix::sys::signal::kill(Pid::from_raw(self.id() as i32), signal);
    }

    /// Waits for the child to exit, up to `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child_mut().try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the child and returns its full output.
    pub fn wait_with_output(mut self) -> io::Result<std::process::Output> {
        let child = self.child.take().expect("child not yet taken");
        let out = child.wait_with_output();
        // Whatever the child left in its group goes too.
        let _ = killpg(self.pgid, Signal::SIGKILL);
        out
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        let _ = killpg(self.pgid, Signal::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `check` until it returns `Some` or the deadline passes.
pub fn wait_until<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every live process whose command line contains `needle` (from /proc).
pub fn processes_matching(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = raw
            .split(|&b| b == 0)
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        if cmdline.contains(needle) {
            found.push((pid, cmdline));
        }
    }
    found
}
