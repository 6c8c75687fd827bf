//! The plugin under test, launched and spoken to the way a Nomad client
//! does it through go-plugin: the environment Nomad sets, only the first
//! stdout line read (with a deadline) as the handshake, the rest of stdout
//! drained, stderr collected as log lines, gRPC over the announced Unix
//! socket with the message size limits raised to go-plugin's, and the
//! kill sequence of `plugin.Client.Kill`: controller Shutdown, up to 2 s
//! for the plugin to exit by itself, then SIGKILL to its pid alone.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use nomad_proto::base::base_plugin_client::BasePluginClient;
use nomad_proto::driver::driver_client::DriverClient;
use nomad_proto::handshake::{MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE};
use nomad_proto::plugin::Empty;
use nomad_proto::plugin::grpc_controller_client::GrpcControllerClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::pb::health_client::HealthClient;

use super::handshake::{check_hclog_line, parse_handshake};
use crate::executor::Sandbox;
use crate::proc::GroupChild;

/// go-plugin's `StartTimeout` default: how long the client waits for the
/// handshake line.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long go-plugin's `Kill` waits after the controller's Shutdown.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// go-plugin raises both gRPC message limits to `math.MaxInt32`.
const MAX_MESSAGE: usize = i32::MAX as usize;

/// How the plugin ended under [`PluginUnderTest::kill`].
#[derive(Debug)]
pub struct Killed {
    /// It exited within [`KILL_GRACE`] of the controller's Shutdown,
    /// without SIGKILL.
    pub by_itself: bool,
    pub status: ExitStatus,
    /// How the controller's Shutdown call ended (an error is fine when
    /// the plugin exits before it answers).
    pub shutdown_call: Result<(), tonic::Status>,
}

/// The command Nomad runs for the plugin: the binary from its
/// `plugin_dir`, the agent's `args`, the agent's environment plus the
/// go-plugin variables, stdin from nowhere. Without `cookie` it is the
/// binary started by hand.
pub fn plugin_command(sandbox: &Sandbox, config: Option<&Path>, cookie: bool) -> Command {
    let mut cmd = Command::new(crate::executor_bin());
    cmd.arg("--state-dir")
        .arg(sandbox.state_dir())
        .arg("--cache-dir")
        .arg(sandbox.cache_dir());
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    cmd.arg("nomad-plugin")
        // The test's own environment must not leak into the plugin's
        // settings: the flags above are the whole configuration.
        .env_remove("QEMU_EXECUTOR_CONFIG")
        .env_remove("QEMU_EXECUTOR_STATE_DIR")
        .env_remove("QEMU_EXECUTOR_CACHE_DIR")
        .env_remove(MAGIC_COOKIE_KEY)
        .stdin(Stdio::null());
    if cookie {
        cmd.env(MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE)
            .env("PLUGIN_MIN_PORT", "10000")
            .env("PLUGIN_MAX_PORT", "25000")
            .env("PLUGIN_PROTOCOL_VERSIONS", "2");
    }
    cmd
}

/// A running plugin and a gRPC channel to it.
pub struct PluginUnderTest {
    child: GroupChild,
    /// The processes that hold the read ends of the plugin's stdout and
    /// stderr, as Nomad's agent does; killing them is the agent's crash.
    relays: Relays,
    pub socket: PathBuf,
    channel: Channel,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Whatever came on stdout after the handshake line.
    stray_stdout: Arc<Mutex<Vec<u8>>>,
    stdout_reader: Option<JoinHandle<()>>,
    stderr_reader: Option<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl PluginUnderTest {
    /// Launches the plugin as Nomad does, reads and checks its handshake
    /// and connects to it. Panics, with the plugin's stderr, if any step
    /// fails.
    pub async fn start(sandbox: &Sandbox, config: Option<&Path>) -> PluginUnderTest {
        let mut cmd = plugin_command(sandbox, config, true);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = GroupChild::spawn(cmd).expect("spawn qemu-executor nomad-plugin");
        let pid = child.id();
        let mut relays = Relays::default();
        let stdout = relays.relay(Stdio::from(
            child.child_mut().stdout.take().expect("piped stdout"),
        ));
        let stderr_pipe = relays.relay(Stdio::from(
            child.child_mut().stderr.take().expect("piped stderr"),
        ));

        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr_pipe);
            let mut raw = Vec::new();
            while reader.read_until(b'\n', &mut raw).unwrap_or(0) > 0 {
                let line = String::from_utf8_lossy(&raw).trim_end().to_string();
                eprintln!("[plugin {pid}] {line}");
                lines.lock().unwrap().push(line);
                raw.clear();
            }
        });

        let (first_tx, first_rx) = mpsc::channel();
        let stray_stdout = Arc::new(Mutex::new(Vec::new()));
        let stray = stray_stdout.clone();
        let stdout_reader = std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut first = Vec::new();
            let _ = reader.read_until(b'\n', &mut first);
            let _ = first_tx.send(first);
            // go-plugin keeps draining stdout; so do we, keeping it all.
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                eprintln!(
                    "[plugin {pid} STDOUT] {}",
                    String::from_utf8_lossy(&buf[..n])
                );
                stray.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });

        let first = tokio::task::spawn_blocking(move || first_rx.recv_timeout(START_TIMEOUT))
            .await
            .expect("handshake reader");
        let text = |s: &Arc<Mutex<Vec<String>>>| s.lock().unwrap().join("\n");
        let first = first.unwrap_or_else(|_| {
            panic!(
                "no handshake line within {START_TIMEOUT:?}; stderr:\n{}",
                text(&stderr)
            )
        });
        let handshake = parse_handshake(&first)
            .unwrap_or_else(|e| panic!("bad handshake: {e}; stderr:\n{}", text(&stderr)));
        let socket = handshake.socket;
        let is_socket = std::fs::metadata(&socket).is_ok_and(|m| m.file_type().is_socket());
        assert!(
            is_socket,
            "the handshake names {}, which is not a socket",
            socket.display()
        );
        let channel = tokio::time::timeout(Duration::from_secs(10), connect(&socket))
            .await
            .unwrap_or_else(|_| panic!("connecting to {} timed out", socket.display()))
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
        PluginUnderTest {
            child,
            relays,
            socket,
            channel,
            stderr,
            stray_stdout,
            stdout_reader: Some(stdout_reader),
            stderr_reader: Some(stderr_reader),
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What a crash of the Nomad agent does to a plugin that lives on:
    /// nobody reads its stdout and stderr any more, so its writes fail
    /// with EPIPE.
    pub fn kill_stdio_readers(&mut self) {
        self.relays.kill();
    }

    /// A fresh gRPC connection, as an agent that reattaches makes.
    pub async fn reconnect(&mut self) {
        self.channel = tokio::time::timeout(Duration::from_secs(10), connect(&self.socket))
            .await
            .expect("reconnecting in time")
            .unwrap_or_else(|e| panic!("reconnecting to {}: {e}", self.socket.display()));
    }

    /// Sends `signal` to the plugin's pid.
    pub fn signal(&self, signal: Signal) {
        self.child.signal(signal);
    }

    pub fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    pub fn controller(&self) -> GrpcControllerClient<Channel> {
        GrpcControllerClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    pub fn base(&self) -> BasePluginClient<Channel> {
        BasePluginClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    pub fn driver(&self) -> DriverClient<Channel> {
        DriverClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// Every stderr line so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Every stderr line so far, as one text for failure messages.
    pub fn stderr_text(&self) -> String {
        self.stderr_lines().join("\n")
    }

    /// Fails unless every stderr line so far is a log line Nomad's log
    /// forwarding understands.
    pub fn assert_stderr_is_hclog(&self) {
        let lines = self.stderr_lines();
        assert!(!lines.is_empty(), "the plugin logged nothing at all");
        let bad: Vec<String> = lines
            .iter()
            .filter_map(|l| check_hclog_line(l).err())
            .collect();
        assert!(
            bad.is_empty(),
            "{} of {} stderr lines are not hclog JSON:\n{}",
            bad.len(),
            lines.len(),
            bad.join("\n")
        );
    }

    /// Fails if anything but the handshake line came on stdout so far.
    pub fn assert_no_stray_stdout(&self) {
        let stray = self.stray_stdout.lock().unwrap();
        assert!(
            stray.is_empty(),
            "the plugin wrote to stdout after its handshake line: {:?}",
            String::from_utf8_lossy(&stray)
        );
    }

    /// Has the plugin exited (reaping it if so)?
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.child_mut().try_wait().expect("try_wait");
        }
        self.status
    }

    async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ends the plugin as a Nomad client does: the controller's Shutdown,
    /// up to [`KILL_GRACE`] for the plugin to exit, then SIGKILL to the
    /// plugin's pid only (not its group: go-plugin kills the process).
    /// Then checks that nothing but the handshake ever came on stdout, and
    /// that stdout and stderr closed with the plugin.
    pub async fn kill(&mut self) -> Killed {
        let shutdown_call = match tokio::time::timeout(
            Duration::from_secs(10),
            self.controller().shutdown(Empty {}),
        )
        .await
        {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(tonic::Status::deadline_exceeded(
                "controller Shutdown did not answer in 10 s",
            )),
        };
        let mut by_itself = true;
        let status = match self.wait_exit(KILL_GRACE).await {
            Some(status) => status,
            None => {
                by_itself = false;
                let _ = kill(Pid::from_raw(self.pid() as i32), Signal::SIGKILL);
                self.wait_exit(Duration::from_secs(10))
                    .await
                    .expect("the plugin ends after SIGKILL")
            }
        };
        // Both pipes close with the plugin unless a process it started
        // inherited them: a VM shim holding Nomad's pipes to a dead plugin
        // could write into them, or die of SIGPIPE once Nomad closes them.
        for (name, reader) in [
            ("stdout", self.stdout_reader.take()),
            ("stderr", self.stderr_reader.take()),
        ] {
            let reader = reader.expect("pipe reader");
            let deadline = Instant::now() + Duration::from_secs(5);
            while !reader.is_finished() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(
                reader.is_finished(),
                "the plugin's {name} is still open after it exited: a process it started inherited it"
            );
            let _ = reader.join();
        }
        self.assert_no_stray_stdout();
        Killed {
            by_itself,
            status,
            shutdown_call,
        }
    }

    /// [`PluginUnderTest::kill`], checking that the plugin went by itself
    /// with status 0, removed its socket (a Go plugin's listener unlinks
    /// it), and logged nothing but hclog JSON.
    pub async fn kill_cleanly(&mut self) {
        let killed = self.kill().await;
        assert!(
            killed.by_itself,
            "the plugin needed SIGKILL after the controller's Shutdown ({:?})",
            killed.shutdown_call
        );
        assert_eq!(killed.status.code(), Some(0), "{killed:?}");
        assert!(
            !self.socket.exists(),
            "the plugin left its socket behind: {}",
            self.socket.display()
        );
        self.assert_stderr_is_hclog();
    }
}

impl Drop for PluginUnderTest {
    fn drop(&mut self) {
        // GroupChild kills the plugin's group and reaps it; VMs run in
        // sessions of their own and are the reaper's business.
        if !std::thread::panicking() {
            self.assert_no_stray_stdout();
        }
    }
}

/// `cat` processes copying the plugin's output to the test: each holds
/// the read end of one of the plugin's pipes.
#[derive(Default)]
struct Relays(Vec<std::process::Child>);

impl Relays {
    fn relay(&mut self, from: Stdio) -> std::process::ChildStdout {
        let mut cat = Command::new("cat")
            .stdin(from)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn cat as a relay");
        let out = cat.stdout.take().expect("piped relay");
        self.0.push(cat);
        out
    }

    fn kill(&mut self) {
        for cat in &mut self.0 {
            let _ = cat.kill();
            let _ = cat.wait();
        }
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gRPC channel over the Unix socket: plaintext HTTP/2, any authority
/// (go-plugin dials `unix:` addresses the same way).
async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    Endpoint::from_static("http://plugin")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
}
