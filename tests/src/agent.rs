//! Driving the real agent: start it on a socket in the sandbox, talk HTTP
//! to it over that socket by hand (so a test sees exactly what went over
//! the wire), and make sure every VM it started goes when the test ends,
//! pass or fail: its VMs live in sessions of their own, outside the
//! agent's process group.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::executor::{Running, Sandbox};
use crate::proc::{processes_matching, wait_until};

/// An answer from the agent.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request over the Unix socket, `Connection: close`.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> std::io::Result<Answer> {
    request_with(socket, method, path, &[], content_type, body)
}

/// [`request`] with more header lines.
pub fn request_with(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    content_type: Option<&str>,
    body: &[u8],
) -> std::io::Result<Answer> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    // A server may answer (413) before reading a large body, and close.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    Ok(parse_answer(&raw))
}

fn parse_answer(raw: &[u8]) -> Answer {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = raw.get(split + 4..).unwrap_or_default();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Decodes a chunked body (sizes count bytes).
fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&rest[..eol]);
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        let data = &rest[eol + 2..];
        if n == 0 || data.len() < n {
            break;
        }
        out.extend_from_slice(&data[..n]);
        rest = data[n..].strip_prefix(b"\r\n").unwrap_or(&data[n..]);
    }
    out
}

/// The agent under test, with its socket.
pub struct AgentUnderTest {
    pub run: Running,
    pub socket: PathBuf,
}

impl AgentUnderTest {
    /// Starts `qemu-executor agent` with the sandbox's dirs, `config`, and
    /// `extra` arguments, and waits until it answers.
    pub fn start(sandbox: &Sandbox, config: &Path, extra: &[&str]) -> AgentUnderTest {
        Self::start_as(sandbox, config, extra, None)
    }

    /// As [`AgentUnderTest::start`], as `user` when given (through
    /// `setpriv`).
    pub fn start_as(
        sandbox: &Sandbox,
        config: &Path,
        extra: &[&str],
        user: Option<&str>,
    ) -> AgentUnderTest {
        let socket = sandbox.path().join("agent.sock");
        let mut args = vec![
            "--config",
            config.to_str().unwrap(),
            "agent",
            "--socket",
            socket.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let run = match user {
            None => sandbox.spawn(&args),
            Some(user) => {
                let direct = sandbox.command(&args);
                let mut cmd = Command::new("setpriv");
                cmd.arg(format!("--reuid={user}"))
                    .arg(format!("--regid={user}"))
                    .args(["--clear-groups", "--"])
                    .arg(direct.get_program())
                    .args(direct.get_args());
                for (k, v) in direct.get_envs() {
                    match v {
                        Some(v) => cmd.env(k, v),
                        None => cmd.env_remove(k),
                    };
                }
                sandbox.spawn_command(cmd)
            }
        };
        let agent = AgentUnderTest { run, socket };
        wait_until(Duration::from_secs(60), || {
            agent.get("/v1/health").ok().filter(|a| a.status == 200)
        })
        .unwrap_or_else(|| panic!("the agent never answered:\n{}", agent.run.stderr()));
        agent
    }

    pub fn get(&self, path: &str) -> std::io::Result<Answer> {
        request(&self.socket, "GET", path, None, b"")
    }

    pub fn post(&self, path: &str, content_type: &str, body: &[u8]) -> Answer {
        request(&self.socket, "POST", path, Some(content_type), body)
            .unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", self.run.stderr()))
    }

    /// Submits a TOML task and returns its id.
    pub fn submit_toml(&self, toml: &str) -> String {
        let a = self.post("/v1/tasks", "application/toml", toml.as_bytes());
        assert_eq!(a.status, 201, "{}", a.body);
        a.json()["id"].as_str().unwrap().to_string()
    }

    pub fn status(&self, id: &str) -> serde_json::Value {
        let a = self
            .get(&format!("/v1/tasks/{id}"))
            .unwrap_or_else(|e| panic!("status {id}: {e}"));
        assert_eq!(a.status, 200, "{}", a.body);
        a.json()
    }

    /// Waits until task `id` is in `state`; panics with its status if not.
    pub fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> serde_json::Value {
        wait_until(timeout, || {
            let s = self.status(id);
            (s["state"] == state).then_some(s)
        })
        .unwrap_or_else(|| {
            panic!(
                "task {id} never got to {state}: {:#}\n{}",
                self.status(id),
                self.run.stderr()
            )
        })
    }
}

/// Kills, when dropped, every process (qemu, shims) whose command line
/// names the sandbox, and removes the test's cgroups: the agent's VMs are
/// in sessions of their own, so killing the agent's group misses them.
pub struct Reaper {
    needle: String,
    cgroup_parent: String,
}

impl Reaper {
    pub fn new(sandbox: &Sandbox, cgroup_parent: &str) -> Reaper {
        Reaper {
            needle: sandbox.path().display().to_string(),
            cgroup_parent: cgroup_parent.to_string(),
        }
    }

    /// Processes of the sandbox other than the agent: shims and qemu.
    pub fn vm_processes(&self) -> Vec<(u32, String)> {
        processes_matching(&self.needle)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(" shim ") || cmd.contains("qemu-system"))
            .collect()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for (pid, _) in self.vm_processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(300));
        for hierarchy in ["memory", "cpu"] {
            let parent = Path::new("/sys/fs/cgroup")
                .join(hierarchy)
                .join(&self.cgroup_parent);
            if let Ok(entries) = std::fs::read_dir(&parent) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&parent);
        }
    }
}

/// The unprivileged user the tests run qemu as, created if missing.
pub fn test_user() -> &'static str {
    const USER: &str = "qe-test-qemu";
    let exists = Command::new("id")
        .arg(USER)
        .output()
        .is_ok_and(|o| o.status.success());
    if !exists {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ])
            .output()
            .expect("useradd runs");
        // Another test may have created it meanwhile.
        let created_meanwhile = Command::new("id")
            .arg(USER)
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            out.status.success() || created_meanwhile,
            "useradd {USER} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    USER
}

/// A cgroup parent name unique to this test run.
pub fn cgroup_parent(test: &str) -> String {
    format!("qe-test-{test}-{}", std::process::id())
}

/// Generous: a guest boots in about 11 s of one core under TCG, and the
/// tests boot several at once on a shared machine.
pub const BOOT: Duration = Duration::from_secs(300);
pub const POWER_OFF_LINE: &str = "qe-guest: power button, powering off";

/// A task for the test guest under TCG, with `extra` lines appended.
pub fn task_toml(name: &str, url: &str, checksum: &str, port: u16, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nimage_source = \"{url}\"\nchecksum = \"{checksum}\"\nhost_port = {port}\nguest_port = 8080\nmemory_mb = 256\naccelerator = \"tcg\"\nready_timeout_s = 280\nkill_timeout_s = 60\n{extra}"
    )
}

/// Sends `signal` to process `pid`.
pub fn kill(pid: u64, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}

/// qemu's pid in a task's status.
pub fn pid_of(status: &serde_json::Value) -> u64 {
    status["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid: {status:#}"))
}

/// Waits for the agent to exit; returns its raw wait status.
pub fn wait_exit(agent: &mut AgentUnderTest) -> i32 {
    let status = agent
        .run
        .child
        .wait_timeout(Duration::from_secs(120))
        .unwrap()
        .unwrap_or_else(|| panic!("the agent did not exit:\n{}", agent.run.stderr()));
    std::os::unix::process::ExitStatusExt::into_raw(status)
}

/// The serial console of a task, from its status's task directory.
pub fn serial_log(status: &serde_json::Value) -> String {
    let dir = status["dir"].as_str().unwrap();
    std::fs::read_to_string(std::path::Path::new(dir).join("serial.log")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_answers() {
        let a = parse_answer(
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 18\r\n\r\n{\"error\": \"No x\"}\n",
        );
        assert_eq!(a.status, 404);
        assert_eq!(a.header("Content-Type"), Some("application/json"));
        assert_eq!(a.json()["error"], "No x");
        let a = parse_answer(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        );
        assert_eq!(a.body, "hello world");
    }
}
