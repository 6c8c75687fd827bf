//! Waiting for a process that is not our child: a pidfd (Linux 5.3+) turns
//! readable when the process exits, so the agent sleeps in epoll instead of
//! polling /proc, whoever the process's parent is.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

use super::process::ProcessIdentity;

/// A pidfd registered with the tokio reactor.
#[derive(Debug)]
pub struct PidFd {
    fd: AsyncFd<OwnedFd>,
    pid: u32,
}

impl PidFd {
    /// Opens a pidfd for `identity`, and only if the process with that pid
    /// still has that start time once the fd is open: a pidfd pins the
    /// process it was opened for, so checking after opening closes the
    /// window in which the pid could have been reused.
    pub fn open(identity: &ProcessIdentity) -> io::Result<PidFd> {
        let pid = libc::pid_t::try_from(identity.pid)
            .map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or
        // -1; it touches no memory of ours.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, libc::PIDFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = i32::try_from(raw).map_err(|_| io::Error::other("pidfd out of range"))?;
        // SAFETY: the kernel just returned this fd to us and nothing else
        // owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        if !identity.is_alive() {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        // SAFETY: `owned` is a valid open fd, and the AsyncFd owns it (and
        // so keeps it open and unchanged) for its whole life.
        let fd = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }?;
        Ok(PidFd {
            fd,
            pid: identity.pid,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Resolves once the process has exited (it may still be a zombie).
    pub async fn exited(&self) {
        // Readable stays readable once the process is gone: no need to
        // clear readiness. An error means the reactor is gone; callers
        // treat that like an exit.
        if let Err(e) = self.fd.readable().await {
            tracing::warn!(pid = self.pid, error = %e, "cannot wait on pidfd");
        }
    }

    /// Whether the process has exited, without waiting.
    pub fn has_exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & libc::POLLIN != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn readable_when_the_process_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        let identity = ProcessIdentity::of(child.id()).unwrap();
        let pidfd = PidFd::open(&identity).unwrap();
        assert!(!pidfd.has_exited());
        tokio::time::timeout(Duration::from_secs(10), pidfd.exited())
            .await
            .expect("exit seen");
        assert!(pidfd.has_exited());
        child.wait().unwrap();
    }

    #[test]
    fn a_stale_identity_is_refused() {
        let me = ProcessIdentity::of(std::process::id()).unwrap();
        let reused = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        let err = PidFd::open(&reused).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
    }
}
