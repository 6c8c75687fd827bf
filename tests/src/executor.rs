//! Running the real `qemu-executor` binary in a sandbox of its own: a temp
//! dir for state and cache, output captured line by line, and the process
//! group killed when the test ends, pass or fail.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proc::GroupChild;

/// Dirs of one test: state, cache and scratch files.
pub struct Sandbox {
    pub root: tempfile::TempDir,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Self {
        Sandbox {
            // The prefix lets tests/run.sh find any qemu a test left behind.
            root: tempfile::Builder::new()
                .prefix("qe-test-")
                .tempdir()
                .expect("temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.root.path()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path().join("state")
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.path().join("cache")
    }

    /// qemu processes started from this sandbox that are still alive.
    pub fn live_qemus(&self) -> Vec<(u32, String)> {
        crate::proc::processes_matching(&self.path().display().to_string())
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("qemu-system"))
            .collect()
    }

    /// Fails the test if a qemu started from this sandbox is still alive.
    pub fn assert_no_qemu(&self) {
        let left = self.live_qemus();
        assert!(left.is_empty(), "qemu outlived the test: {left:?}");
    }

    /// The serial consoles of every task run in this sandbox, one after
    /// the other.
    pub fn serial_logs(&self) -> String {
        std::fs::read_dir(self.state_dir().join("tasks"))
            .expect("a task dir")
            .flatten()
            .map(|d| std::fs::read_to_string(d.path().join("serial.log")).unwrap_or_default())
            .collect()
    }

    /// Writes a file into the sandbox and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, contents).expect("write sandbox file");
        p
    }

    /// The executor command with this sandbox's dirs.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(crate::executor_bin());
        cmd.args(args)
            .env("QEMU_EXECUTOR_STATE_DIR", self.state_dir())
            .env("QEMU_EXECUTOR_CACHE_DIR", self.cache_dir())
            .env_remove("QEMU_EXECUTOR_CONFIG")
            .env("RUST_LOG", "info");
        cmd
    }

    /// Runs the executor to completion.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        let child = GroupChild::spawn({
            let mut c = self.command(args);
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
            c
        })
        .expect("spawn qemu-executor");
        child.wait_with_output().expect("wait for qemu-executor")
    }

    /// Starts the executor in the background with its output followed.
    pub fn spawn(&self, args: &[&str]) -> Running {
        self.spawn_command(self.command(args))
    }

    /// Starts `cmd` (say, the executor under another user) in the
    /// background with its output followed.
    pub fn spawn_command(&self, mut cmd: Command) -> Running {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = GroupChild::spawn(cmd).expect("spawn qemu-executor");
        let (tx, lines) = channel();
        let stderr_log = Arc::new(Mutex::new(String::new()));
        let stdout = child.child_mut().stdout.take().expect("piped stdout");
        let stderr = child.child_mut().stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let log = stderr_log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[executor] {line}");
                log.lock().unwrap().push_str(&line);
                log.lock().unwrap().push('\n');
            }
        });
        Running {
            child,
            lines,
            stdout_seen: Vec::new(),
            stderr: stderr_log,
        }
    }
}

/// A running executor.
pub struct Running {
    pub child: GroupChild,
    lines: Receiver<String>,
    pub stdout_seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    /// Waits for a stdout line containing `needle` and returns it.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    eprintln!("[executor stdout] {line}");
                    self.stdout_seen.push(line.clone());
                    if line.contains(needle) {
                        return Some(line);
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Stops the executor with SIGTERM; returns its exit code, stdout and
    /// stderr.
    pub fn terminate(mut self) -> (i32, Vec<String>, String) {
        self.child.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self
            .child
            .wait_timeout(Duration::from_secs(60))
            .expect("wait")
            .expect("the executor ends after SIGTERM");
        let stdout = self.drain_stdout();
        (status.code().unwrap_or(-1), stdout, self.stderr())
    }

    /// Everything printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Collects the rest of stdout (after the process ended).
    pub fn drain_stdout(&mut self) -> Vec<String> {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.stdout_seen.push(line);
        }
        self.stdout_seen.clone()
    }
}

/// A TCP port free right now on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// An HTTP GET on loopback with patient timeouts, by hand so that the test
/// sees exactly what came through the forward.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.starts_with("HTTP/").then_some(body)
}
