//! Confinement of each VM when the agent runs as root: its own cgroup with
//! a memory limit and a cpu weight, an unprivileged user, a private mount
//! namespace and qemu's own chroot into its task directory (with its
//! seccomp sandbox on top). What cannot apply on this host is reported, at
//! start and in each task's status, never dropped silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use config::AgentConfig;

pub mod config;

#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("agent.user: no user {0:?} on this host (create it, e.g. `useradd --system {0}`)")]
    NoSuchUser(String),
    #[error("Cannot look up user {name:?}")]
    Lookup {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("Cannot prepare {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One isolation mechanism: whether it applies, and what it is or why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mechanism {
    pub active: bool,
    pub detail: String,
}

impl Mechanism {
    pub fn on(detail: impl Into<String>) -> Self {
        Mechanism {
            active: true,
            detail: detail.into(),
        }
    }

    pub fn off(why: impl Into<String>) -> Self {
        Mechanism {
            active: false,
            detail: why.into(),
        }
    }
}

/// Mechanisms by name: `cgroup`, `user`, `sandbox`, `mount_namespace`,
/// `chroot`.
pub type IsolationReport = BTreeMap<String, Mechanism>;

/// The cgroup mounts of this host, from /proc/self/mountinfo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupMounts {
    pub v2: Option<PathBuf>,
    /// v1 hierarchies by controller (`memory`, `cpu`, ...).
    pub v1: Vec<(String, PathBuf)>,
}

impl CgroupMounts {
    fn v1_for(&self, controller: &str) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(c, _)| c == controller)
            .map(|(_, p)| p.as_path())
    }
}

/// Reads the cgroup mounts out of mountinfo text. Pure.
pub fn parse_mountinfo(text: &str) -> CgroupMounts {
    let mut mounts = CgroupMounts::default();
    for line in text.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = before.split_whitespace().nth(4) else {
            continue;
        };
        let mut rest = after.split_whitespace();
        let (Some(fstype), _source, Some(options)) = (rest.next(), rest.next(), rest.next()) else {
            continue;
        };
        let point = PathBuf::from(mount_point.replace("\\040", " "));
        match fstype {
            "cgroup2" if mounts.v2.is_none() => mounts.v2 = Some(point),
            "cgroup" => {
                for option in options.split(',') {
                    if matches!(option, "memory" | "cpu") {
                        mounts.v1.push((option.to_string(), point.clone()));
                    }
                }
            }
            _ => {}
        }
    }
    mounts
}

/// Where VM cgroups go on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cgroups {
    V2 { parent: PathBuf },
    V1 { memory: PathBuf, cpu: PathBuf },
    Off(String),
}

/// The user qemu drops to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// What the agent can apply on this host, decided once at start.
#[derive(Debug, Clone)]
pub struct Isolation {
    cgroups: Cgroups,
    /// Why cgroup v1 is used instead of v2, when it is.
    cgroup_note: Option<String>,
    pub user: Option<RunAs>,
    user_why: String,
    pub chroot: bool,
    chroot_why: String,
    pub mount_namespace: bool,
    mount_namespace_why: String,
    sandbox: bool,
    headroom_mb: u32,
}

/// The cgroups of one VM.
#[derive(Debug, Clone, Default)]
pub struct VmCgroups {
    pub paths: Vec<PathBuf>,
    pub report: Option<Mechanism>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IsolationError + '_ {
    move |source| IsolationError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Isolation {
    /// Decides what applies, from the configuration and this host.
    pub fn detect(config: &AgentConfig, sandbox: bool) -> Result<Isolation, IsolationError> {
        let is_root = nix::unistd::geteuid().is_root();
        let not_root = "the agent does not run as root";
        let (cgroups, cgroup_note) = if !config.cgroups {
            (
                Cgroups::Off("disabled by [agent] cgroups = false".into()),
                None,
            )
        } else if !is_root {
            (Cgroups::Off(not_root.into()), None)
        } else {
            let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            choose_cgroups(&parse_mountinfo(&text), &config.cgroup_parent)
        };
        let (user, user_why) = match (&config.user, is_root) {
            (Some(name), true) => {
                let found = nix::unistd::User::from_name(name).map_err(|source| {
                    IsolationError::Lookup {
                        name: name.clone(),
                        source,
                    }
                })?;
                let found = found.ok_or_else(|| IsolationError::NoSuchUser(name.clone()))?;
                (
                    Some(RunAs {
                        name: name.clone(),
                        uid: found.uid.as_raw(),
                        gid: found.gid.as_raw(),
                    }),
                    String::new(),
                )
            }
            (Some(name), false) => (
                None,
                format!(
                    "{not_root}, so it cannot switch qemu to {name:?}; qemu runs as the agent's user"
                ),
            ),
            (None, true) => (
                None,
                "no user set under [agent] in executor.toml; qemu runs as root".into(),
            ),
            (None, false) => (
                None,
                format!(
                    "{not_root}; qemu runs as the agent's user (uid {})",
                    nix::unistd::geteuid()
                ),
            ),
        };
        let root_only = |enabled: bool, key: &str| match (enabled, is_root) {
            (false, _) => (false, format!("disabled by [agent] {key} = false")),
            (true, false) => (false, format!("{not_root} (it needs CAP_SYS_ADMIN)")),
            (true, true) => (true, String::new()),
        };
        let (chroot, chroot_why) = root_only(config.chroot, "chroot");
        let (mount_namespace, mount_namespace_why) =
            root_only(config.mount_namespace, "mount_namespace");
        Ok(Isolation {
            cgroups,
            cgroup_note,
            user,
            user_why,
            chroot,
            chroot_why,
            mount_namespace,
            mount_namespace_why,
            sandbox,
            headroom_mb: config.memory_headroom_mb,
        })
    }

    /// What applies to every VM, for the start-up log and `/v1/health`.
    pub fn report(&self) -> IsolationReport {
        let mut report = IsolationReport::new();
        let cgroup = match &self.cgroups {
            Cgroups::V2 { parent } => Mechanism::on(format!(
                "cgroup v2 under {}: memory.max = guest memory + {} MiB, cpu.weight = 100 per cpu",
                parent.display(),
                self.headroom_mb
            )),
            Cgroups::V1 { memory, cpu } => Mechanism::on(format!(
                "cgroup v1 under {} and {}: memory.limit_in_bytes = guest memory + {} MiB, cpu.shares = 1024 per cpu{}",
                memory.display(),
                cpu.display(),
                self.headroom_mb,
                self.cgroup_note
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            )),
            Cgroups::Off(why) => Mechanism::off(why.clone()),
        };
        report.insert("cgroup".into(), cgroup);
        report.insert(
            "user".into(),
            match &self.user {
                Some(u) => Mechanism::on(format!(
                    "qemu drops to {} (uid {}, gid {}) with -runas",
                    u.name, u.uid, u.gid
                )),
                None => Mechanism::off(self.user_why.clone()),
            },
        );
        report.insert(
            "chroot".into(),
            if self.chroot {
                Mechanism::on("qemu -chroot into its task directory once its files are open")
            } else {
                Mechanism::off(self.chroot_why.clone())
            },
        );
        report.insert(
            "mount_namespace".into(),
            if self.mount_namespace {
                Mechanism::on("qemu starts in a private mount namespace (all mounts private)")
            } else {
                Mechanism::off(self.mount_namespace_why.clone())
            },
        );
        let confinement = crate::qemu::cmdline::Confinement {
            sandbox: self.sandbox,
            chroot: None,
            runas: self.user.as_ref().map(|u| u.name.clone()),
        };
        report.insert(
            "sandbox".into(),
            if self.sandbox {
                Mechanism::on(format!("-sandbox {}", confinement.sandbox_options()))
            } else {
                Mechanism::off("disabled by [qemu] sandbox = false")
            },
        );
        report
    }

    /// Creates the cgroups of VM `id` with its limits. A failure is
    /// reported in the task's status, and the VM runs without them.
    pub fn cgroups_for(&self, id: &str, memory_mb: u32, cpus: u32) -> VmCgroups {
        let limit = (u64::from(memory_mb) + u64::from(self.headroom_mb)) << 20;
        let made = match &self.cgroups {
            Cgroups::Off(_) => return VmCgroups::default(),
            Cgroups::V2 { parent } => {
                let dir = parent.join(id);
                let weight = (100 * u64::from(cpus)).clamp(1, 10_000);
                make_cgroup(&dir, &[("memory.max", limit), ("cpu.weight", weight)]).map(|()| {
                    (
                        vec![dir.clone()],
                        format!(
                            "cgroup v2 {}: memory.max = {limit} ({memory_mb} MiB + {} MiB headroom), cpu.weight = {weight}",
                            dir.display(),
                            self.headroom_mb
                        ),
                    )
                })
            }
            Cgroups::V1 { memory, cpu } => {
                let (mem_dir, cpu_dir) = (memory.join(id), cpu.join(id));
                let shares = 1024 * u64::from(cpus.max(1));
                make_cgroup(&mem_dir, &[("memory.limit_in_bytes", limit)])
                    .and_then(|()| make_cgroup(&cpu_dir, &[("cpu.shares", shares)]))
                    .map(|()| {
                        (
                            vec![mem_dir.clone(), cpu_dir.clone()],
                            format!(
                                "cgroup v1 {} and {}: memory.limit_in_bytes = {limit} ({memory_mb} MiB + {} MiB headroom), cpu.shares = {shares}",
                                mem_dir.display(),
                                cpu_dir.display(),
                                self.headroom_mb
                            ),
                        )
                    })
            }
        };
        match made {
            Ok((paths, detail)) => VmCgroups {
                paths,
                report: Some(Mechanism::on(detail)),
            },
            Err(e) => {
                tracing::warn!(task = id, error = %crate::error_chain(&e), "VM runs without its cgroup");
                VmCgroups {
                    paths: Vec::new(),
                    report: Some(Mechanism::off(format!(
                        "cannot create it: {}",
                        crate::error_chain(&e)
                    ))),
                }
            }
        }
    }

    /// Gives the VM's user the QMP socket in task directory `dir`: qemu
    /// creates it as root, before `-runas` drops to that user.
    pub fn hand_over_qmp_socket(&self, dir: &Path) -> Result<(), IsolationError> {
        let Some(user) = &self.user else {
            return Ok(());
        };
        let socket = dir.join("qmp.sock");
        std::os::unix::fs::chown(&socket, Some(user.uid), Some(user.gid)).map_err(io_err(&socket))
    }

    /// Gives the task directory and the files qemu writes to the VM's user.
    pub fn hand_over(&self, dir: &Path, files: &[PathBuf]) -> Result<(), IsolationError> {
        let Some(user) = &self.user else {
            return Ok(());
        };
        for file in files {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .map_err(io_err(file))?;
            std::os::unix::fs::chown(file, Some(user.uid), Some(user.gid)).map_err(io_err(file))?;
        }
        std::os::unix::fs::chown(dir, Some(user.uid), Some(user.gid)).map_err(io_err(dir))?;
        Ok(())
    }
}

/// Removes a VM's cgroups once it is gone (they must be empty by then).
pub fn remove_cgroups(paths: &[PathBuf]) {
    for path in paths {
        if let Err(e) = std::fs::remove_dir(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the VM's cgroup");
        }
    }
}

fn make_cgroup(dir: &Path, settings: &[(&str, u64)]) -> Result<(), IsolationError> {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(dir)(e)),
    }
    for (file, value) in settings {
        let path = dir.join(file);
        std::fs::write(&path, value.to_string()).map_err(io_err(&path))?;
    }
    Ok(())
}

/// cgroup v2 where it has the memory and cpu controllers, else v1.
fn choose_cgroups(mounts: &CgroupMounts, parent_name: &str) -> (Cgroups, Option<String>) {
    let mut v2_problem = "no cgroup v2 mount".to_string();
    if let Some(root) = &mounts.v2 {
        match try_v2(root, parent_name) {
            Ok(parent) => return (Cgroups::V2 { parent }, None),
            Err(why) => v2_problem = format!("cgroup v2 at {}: {why}", root.display()),
        }
    }
    match (mounts.v1_for("memory"), mounts.v1_for("cpu")) {
        (Some(memory), Some(cpu)) => {
            let (memory, cpu) = (memory.join(parent_name), cpu.join(parent_name));
            for dir in [&memory, &cpu] {
                if let Err(e) = std::fs::create_dir_all(dir) {
                    return (
                        Cgroups::Off(format!(
                            "{v2_problem}; cannot create {}: {e}",
                            dir.display()
                        )),
                        None,
                    );
                }
            }
            (Cgroups::V1 { memory, cpu }, Some(v2_problem))
        }
        _ => (
            Cgroups::Off(format!(
                "{v2_problem}; no cgroup v1 memory and cpu hierarchies either"
            )),
            None,
        ),
    }
}

fn try_v2(root: &Path, parent_name: &str) -> Result<PathBuf, String> {
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(|e| format!("cannot read cgroup.controllers: {e}"))?;
    let missing: Vec<&str> = ["memory", "cpu"]
        .into_iter()
        .filter(|c| !controllers.split_whitespace().any(|x| x == *c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "lacks the {} controller(s) (it offers: {})",
            missing.join(" and "),
            controllers.trim()
        ));
    }
    let parent = root.join(parent_name);
    let enable = |dir: &Path| {
        std::fs::write(dir.join("cgroup.subtree_control"), "+memory +cpu")
            .map_err(|e| format!("cannot enable memory and cpu in {}: {e}", dir.display()))
    };
    enable(root)?;
    std::fs::create_dir_all(&parent)
        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    enable(&parent)?;
    Ok(parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
28 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:12 - cgroup cgroup rw,cpu,cpuacct
31 25 0:28 / /sys/fs/cgroup/memory rw,nosuid shared:15 - cgroup cgroup rw,memory
32 25 0:29 / /sys/fs/cgroup/pids rw,nosuid shared:16 - cgroup cgroup rw,pids
";

    #[test]
    fn hybrid_host_has_v2_and_v1_memory_and_cpu() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.v2, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(m.v1_for("memory"), Some(Path::new("/sys/fs/cgroup/memory")));
        assert_eq!(
            m.v1_for("cpu"),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(m.v1_for("pids"), None);
        let pure_v2 = "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let m = parse_mountinfo(pure_v2);
        assert_eq!(m.v2, Some(PathBuf::from("/sys/fs/cgroup")));
        assert!(m.v1.is_empty());
        assert_eq!(parse_mountinfo("garbage\n"), CgroupMounts::default());
    }

    #[test]
    fn v2_without_the_controllers_falls_back_to_v1_and_says_why() {
        let fake = tempfile::tempdir().unwrap();
        let v2 = fake.path().join("unified");
        let (mem, cpu) = (fake.path().join("memory"), fake.path().join("cpu"));
        for d in [&v2, &mem, &cpu] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(v2.join("cgroup.controllers"), "hugetlb\n").unwrap();
        let mounts = CgroupMounts {
            v2: Some(v2.clone()),
            v1: vec![("memory".into(), mem.clone()), ("cpu".into(), cpu.clone())],
        };
        let (chosen, note) = choose_cgroups(&mounts, "qe");
        assert_eq!(
            chosen,
            Cgroups::V1 {
                memory: mem.join("qe"),
                cpu: cpu.join("qe")
            }
        );
        let note = note.unwrap();
        assert!(
            note.contains("lacks the memory and cpu controller(s)"),
            "{note}"
        );
        assert!(note.contains("hugetlb"), "{note}");

        // With the controllers, v2 is chosen and they are enabled below.
        std::fs::write(v2.join("cgroup.controllers"), "cpu io memory pids\n").unwrap();
        let (chosen, _) = choose_cgroups(&mounts, "qe");
        assert_eq!(
            chosen,
            Cgroups::V2 {
                parent: v2.join("qe")
            }
        );
        assert_eq!(
            std::fs::read_to_string(v2.join("qe/cgroup.subtree_control")).unwrap(),
            "+memory +cpu"
        );

        let none = CgroupMounts::default();
        let (chosen, _) = choose_cgroups(&none, "qe");
        assert!(matches!(chosen, Cgroups::Off(ref why) if why.contains("no cgroup v2 mount")));
    }

    #[test]
    fn v2_limits_are_guest_memory_plus_headroom_and_weight_per_cpu() {
        let fake = tempfile::tempdir().unwrap();
        let iso = Isolation {
            cgroups: Cgroups::V2 {
                parent: fake.path().to_path_buf(),
            },
            cgroup_note: None,
            user: None,
            user_why: String::new(),
            chroot: false,
            chroot_why: String::new(),
            mount_namespace: false,
            mount_namespace_why: String::new(),
            sandbox: true,
            headroom_mb: 384,
        };
        let made = iso.cgroups_for("web-1", 256, 2);
        let dir = fake.path().join("web-1");
        assert_eq!(made.paths, vec![dir.clone()]);
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.max")).unwrap(),
            ((256u64 + 384) << 20).to_string()
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("cpu.weight")).unwrap(),
            "200"
        );
        assert!(made.report.unwrap().active);
    }
}
