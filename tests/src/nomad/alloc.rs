//! An allocation directory as a Nomad client lays it out for a task, the
//! log FIFOs its logmon creates and reads, and the `TaskConfig` the client
//! sends in `StartTask`.
//!
//! Layout (Nomad's `allocdir`): `<alloc_dir>/alloc/{data,logs,tmp}`, the
//! task directory `<alloc_dir>/<task>/{local,secrets,tmp}`, and the FIFOs
//! `<alloc_dir>/alloc/logs/.<task>.stdout.fifo` and `.stderr.fifo`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::stat::Mode;
use nomad_proto::driver::{
    AllocatedCpuResources, AllocatedMemoryResources, AllocatedTaskResources, LinuxResources,
    PortMapping, Resources, TaskConfig,
};

/// A FIFO the test reads as logmon does, everything kept in memory.
pub struct Fifo {
    pub path: PathBuf,
    buf: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

impl Fifo {
    /// Creates the FIFO (mode 0600, as logmon does) and starts reading it.
    ///
    /// The read end is opened `O_RDWR`: a FIFO opened for reading only
    /// reports end-of-file each time its last writer closes it (the plugin
    /// that started the VM is killed, the VM's shim takes over), and a
    /// writer that opens it `O_WRONLY|O_NONBLOCK` gets `ENXIO` while no
    /// reader has it open. Holding both ends makes the reader count as a
    /// writer, so it never sees EOF, and the FIFO is open before any
    /// writer comes, which is what a writer from Nomad can rely on.
    /// `O_NONBLOCK` lets the reading thread look at its stop flag between
    /// reads instead of blocking forever.
    pub fn create(path: &Path) -> Fifo {
        nix::unistd::mkfifo(path, Mode::S_IRUSR | Mode::S_IWUSR)
            .unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
        let mut file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let buf = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (out, stopped) = (buf.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while !stopped.load(Ordering::Relaxed) {
                match file.read(&mut chunk) {
                    Ok(n) if n > 0 => out.lock().unwrap().extend_from_slice(&chunk[..n]),
                    Ok(_) => std::thread::sleep(Duration::from_millis(20)),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("reading a log FIFO: {e}"),
                }
            }
        });
        Fifo {
            path: path.to_path_buf(),
            buf,
            stop,
        }
    }

    /// Everything read so far.
    pub fn contents(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }

    /// Waits until `needle` came through the FIFO.
    pub async fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.contents().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A random UUID from the kernel, as Nomad's ids look.
pub fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("the kernel's uuid source")
        .trim()
        .to_string()
}

/// One allocation with one task, and its log FIFOs being read.
pub struct AllocDir {
    pub alloc_id: String,
    pub task_name: String,
    pub dir: PathBuf,
    pub stdout: Fifo,
    pub stderr: Fifo,
}

impl AllocDir {
    /// Lays out an allocation under `parent` for task `task_name`.
    pub fn new(parent: &Path, task_name: &str) -> AllocDir {
        let alloc_id = uuid();
        let dir = parent.join(&alloc_id);
        for sub in ["alloc/data", "alloc/logs", "alloc/tmp"] {
            std::fs::create_dir_all(dir.join(sub)).expect("alloc dir");
        }
        for sub in ["local", "secrets", "tmp"] {
            std::fs::create_dir_all(dir.join(task_name).join(sub)).expect("task dir");
        }
        let logs = dir.join("alloc/logs");
        let stdout = Fifo::create(&logs.join(format!(".{task_name}.stdout.fifo")));
        let stderr = Fifo::create(&logs.join(format!(".{task_name}.stderr.fifo")));
        AllocDir {
            alloc_id,
            task_name: task_name.to_string(),
            dir,
            stdout,
            stderr,
        }
    }

    /// The task directory, `<alloc_dir>/<task name>`.
    pub fn task_dir(&self) -> PathBuf {
        self.dir.join(&self.task_name)
    }

    /// A task id for one start of this task:
    /// `<alloc id>/<task name>/<8 hex>`, as Nomad's task runner makes one
    /// per driver invocation (slashes and all).
    pub fn new_task_id(&self) -> String {
        format!("{}/{}/{}", self.alloc_id, self.task_name, &uuid()[..8])
    }

    /// A `TaskConfig` for one start of this task, under a fresh task id,
    /// with `driver_config` (the msgpack bytes of its `config {}`), 256 MB
    /// and one core by default.
    pub fn task_config(&self, driver_config: Vec<u8>) -> TaskConfigBuilder {
        TaskConfigBuilder {
            alloc: AllocIds {
                alloc_id: self.alloc_id.clone(),
                task_name: self.task_name.clone(),
                task_id: self.new_task_id(),
                dir: self.dir.clone(),
                stdout: self.stdout.path.clone(),
                stderr: self.stderr.path.clone(),
            },
            driver_config,
            memory_mb: 256,
            cpuset_cpus: "0".to_string(),
            ports: Vec::new(),
        }
    }
}

struct AllocIds {
    alloc_id: String,
    task_name: String,
    task_id: String,
    dir: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
}

/// Builds the `TaskConfig` a Nomad client sends.
pub struct TaskConfigBuilder {
    alloc: AllocIds,
    driver_config: Vec<u8>,
    memory_mb: i64,
    cpuset_cpus: String,
    ports: Vec<PortMapping>,
}

impl TaskConfigBuilder {
    pub fn memory_mb(mut self, mb: i64) -> Self {
        self.memory_mb = mb;
        self
    }

    /// The reserved cores, comma-joined as Nomad writes them.
    pub fn cpuset_cpus(mut self, cpus: &str) -> Self {
        self.cpuset_cpus = cpus.to_string();
        self
    }

    /// A port of the group network: `label`, the host port Nomad
    /// allocated, and `to` (the port inside; 0 for the same).
    pub fn port(mut self, label: &str, value: u16, to: u16) -> Self {
        self.ports.push(PortMapping {
            label: label.to_string(),
            value: value.into(),
            to: to.into(),
            host_ip: "127.0.0.1".to_string(),
        });
        self
    }

    pub fn build(self) -> TaskConfig {
        let a = self.alloc;
        let task_dir = a.dir.join(&a.task_name);
        let mut env: HashMap<String, String> = [
            ("NOMAD_ALLOC_ID", a.alloc_id.clone()),
            ("NOMAD_TASK_NAME", a.task_name.clone()),
            ("NOMAD_GROUP_NAME", "vms".to_string()),
            ("NOMAD_JOB_NAME", "qemu-conformance".to_string()),
            ("NOMAD_ALLOC_DIR", a.dir.join("alloc").display().to_string()),
            (
                "NOMAD_TASK_DIR",
                task_dir.join("local").display().to_string(),
            ),
            (
                "NOMAD_SECRETS_DIR",
                task_dir.join("secrets").display().to_string(),
            ),
            ("NOMAD_MEMORY_LIMIT", self.memory_mb.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for p in &self.ports {
            env.insert(format!("NOMAD_HOST_PORT_{}", p.label), p.value.to_string());
            env.insert(format!("NOMAD_PORT_{}", p.label), p.to.to_string());
        }
        TaskConfig {
            id: a.task_id,
            name: a.task_name,
            msgpack_driver_config: self.driver_config,
            env,
            resources: Some(Resources {
                allocated_resources: Some(AllocatedTaskResources {
                    cpu: Some(AllocatedCpuResources { cpu_shares: 100 }),
                    memory: Some(AllocatedMemoryResources {
                        memory_mb: self.memory_mb,
                        memory_max_mb: 0,
                    }),
                    networks: Vec::new(),
                }),
                linux_resources: Some(LinuxResources {
                    cpu_period: 100_000,
                    cpu_quota: 0,
                    cpu_shares: 100,
                    memory_limit_bytes: self.memory_mb << 20,
                    oom_score_adj: 0,
                    cpuset_cpus: self.cpuset_cpus,
                    percent_ticks: 0.0,
                    cpuset_cgroup: String::new(),
                }),
                ports: self.ports,
            }),
            alloc_dir: a.dir.display().to_string(),
            stdout_path: a.stdout.display().to_string(),
            stderr_path: a.stderr.display().to_string(),
            task_group_name: "vms".to_string(),
            job_name: "qemu-conformance".to_string(),
            job_id: "qemu-conformance".to_string(),
            alloc_id: a.alloc_id,
            namespace: "default".to_string(),
            node_name: "harness".to_string(),
            node_id: uuid(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn lays_out_the_alloc_and_reads_the_fifos_across_writers() {
        let parent = tempfile::tempdir().unwrap();
        let alloc = AllocDir::new(parent.path(), "web");
        let task_id = alloc.new_task_id();
        let parts: Vec<&str> = task_id.split('/').collect();
        assert_eq!(parts.len(), 3, "{task_id}");
        assert_eq!(parts[0], alloc.alloc_id);
        assert_eq!(parts[1], "web");
        assert!(parts[2].len() == 8 && parts[2].chars().all(|c| c.is_ascii_hexdigit()));
        assert!(alloc.task_dir().join("local").is_dir());

        // Two writers one after the other, as the plugin and then the
        // VM's shim: the reader sees both, and a non-blocking writer can
        // open at once.
        for text in ["first\n", "second\n"] {
            let mut w = OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&alloc.stdout.path)
                .unwrap();
            w.write_all(text.as_bytes()).unwrap();
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        assert!(
            rt.block_on(
                alloc
                    .stdout
                    .wait_for("first\nsecond\n", Duration::from_secs(5))
            )
        );
        assert_eq!(alloc.stderr.contents(), "");

        let config = alloc
            .task_config(vec![0x80])
            .memory_mb(512)
            .cpuset_cpus("0,1")
            .port("http", 20000, 8080)
            .build();
        assert!(config.id.starts_with(&format!("{}/web/", alloc.alloc_id)));
        assert_ne!(config.id, task_id, "a fresh id per start");
        assert_eq!(config.stdout_path, alloc.stdout.path.display().to_string());
        let r = config.resources.unwrap();
        assert_eq!(
            r.allocated_resources.unwrap().memory.unwrap().memory_mb,
            512
        );
        assert_eq!(r.linux_resources.unwrap().memory_limit_bytes, 512 << 20);
        assert_eq!(r.ports[0].value, 20000);
        assert_eq!(r.ports[0].to, 8080);
        assert_eq!(config.env["NOMAD_HOST_PORT_http"], "20000");
    }
}
