//! A Nomad task onto our task: its `config` block (cty msgpack against
//! [`super::schema::TASK_ATTRS`]), plus what Nomad allocated: memory,
//! cores, and the group network's ports. Pure: the image checksum of an
//! `image_path` is computed by the caller before this runs.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use policy_sdk::Task;
use serde::Deserialize;

use super::cty::{self, CtyError, Whole};
use crate::task::{FieldErrors, TaskFile};

/// The only emulator this executor runs; the operator picks its binary.
pub const EMULATOR: &str = "qemu-system-x86_64";

#[derive(Debug, thiserror::Error)]
pub enum TaskConfigError {
    #[error("Invalid task config")]
    Decode(#[from] CtyError),
    #[error("Invalid task config: {field}: {problem}")]
    Field { field: String, problem: String },
    #[error("Invalid task config: {0}")]
    Task(FieldErrors),
}

fn field(field: &str, problem: impl Into<String>) -> TaskConfigError {
    TaskConfigError::Field {
        field: field.to_string(),
        problem: problem.into(),
    }
}

/// The task's `config` block.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NomadTaskConfig {
    #[serde(default)]
    pub image_source: Option<String>,
    #[serde(default)]
    pub image_path: Option<String>,
    #[serde(default)]
    pub checksum: Option<String>,
    #[serde(default)]
    pub accelerator: Option<String>,
    #[serde(default)]
    pub kvm_fallback: Option<bool>,
    #[serde(default)]
    pub host_port: Option<Whole>,
    #[serde(default)]
    pub guest_port: Option<Whole>,
    #[serde(default)]
    pub port_map: Option<Vec<BTreeMap<String, Whole>>>,
    #[serde(default)]
    pub graceful_shutdown: Option<bool>,
    #[serde(default)]
    pub args: Option<Vec<String>>,
    #[serde(default)]
    pub machine_type: Option<String>,
    #[serde(default)]
    pub drive_interface: Option<String>,
    #[serde(default)]
    pub ready_serial: Option<String>,
    #[serde(default)]
    pub ready_timeout_s: Option<Whole>,
    #[serde(default)]
    pub ready_check: Option<String>,
    #[serde(default)]
    pub emulator: Option<String>,
}

impl NomadTaskConfig {
    pub fn decode(bytes: &[u8]) -> Result<NomadTaskConfig, TaskConfigError> {
        let value = cty::decode(bytes)?;
        if value.is_null() {
            return Err(field(
                "config",
                "missing: the task needs image_source or image_path",
            ));
        }
        Ok(cty::read(value)?)
    }
}

/// One port of the group network, as Nomad allocated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocatedPort {
    pub label: String,
    /// The host port.
    pub value: i64,
    /// The port inside; 0 or less means the same as `value`.
    pub to: i64,
    pub host_ip: String,
}

/// What Nomad decided for the task, besides its config block.
#[derive(Debug, Clone)]
pub struct Allocation<'a> {
    pub task_name: &'a str,
    /// `<alloc_dir>/<task name>`, where Nomad's artifacts land.
    pub task_dir: &'a Path,
    pub memory_mb: i64,
    /// The reserved cores, e.g. "0,2-3"; empty when none are reserved.
    pub cpuset_cpus: &'a str,
    pub ports: &'a [AllocatedPort],
}

/// The task this Nomad task is, validated like any task file.
pub fn to_task(config: NomadTaskConfig, alloc: &Allocation<'_>) -> Result<Task, TaskConfigError> {
    if let Some(e) = config.emulator.as_deref().filter(|e| *e != EMULATOR) {
        return Err(field(
            "emulator",
            format!("{e:?} is not offered: this executor runs {EMULATOR} only"),
        ));
    }
    let image_source = match (&config.image_source, &config.image_path) {
        (Some(_), Some(_)) => {
            return Err(field(
                "image_path",
                "set with image_source: give one of the two",
            ));
        }
        (Some(source), None) => source.clone(),
        (None, Some(path)) => {
            let path = resolve_image_path(alloc.task_dir, path)?;
            format!("file://{}", path.display())
        }
        (None, None) => return Err(field("image_source", "missing (or give image_path)")),
    };
    let checksum = config
        .checksum
        .clone()
        .ok_or_else(|| field("checksum", "missing"))?;
    let check = config.ready_check.clone().unwrap_or_else(|| "none".into());
    let ports = forwards(&config, alloc, &check)?;
    if ports.is_empty() {
        // A VM is reached through a forwarded port, as in a task file.
        return Err(field(
            "network",
            "no port to forward: give the group a network port (or set host_port and guest_port)",
        ));
    }
    let mut file = serde_json::json!({
        "name": task_name(alloc.task_name),
        "image_source": image_source,
        "checksum": checksum,
        "ports": ports,
        "args": config.args.clone().unwrap_or_default(),
        // Restarts are Nomad's, by its restart block.
        "restart": {"attempts": 0},
    });
    let map = file.as_object_mut().expect("an object");
    let mut set = |k: &str, v: serde_json::Value| {
        if !v.is_null() {
            map.insert(k.to_string(), v);
        }
    };
    let whole = |w: Option<Whole>| serde_json::json!(w.map(|Whole(v)| v));
    set("accelerator", serde_json::json!(config.accelerator));
    set("kvm_fallback", serde_json::json!(config.kvm_fallback));
    set(
        "graceful_shutdown",
        serde_json::json!(config.graceful_shutdown),
    );
    set("machine_type", serde_json::json!(config.machine_type));
    set("drive_interface", serde_json::json!(config.drive_interface));
    set("ready_serial", serde_json::json!(config.ready_serial));
    set("ready_timeout_s", whole(config.ready_timeout_s));
    if alloc.memory_mb > 0 {
        set("memory_mb", serde_json::json!(alloc.memory_mb));
    }
    set("cpus", serde_json::json!(cores(alloc.cpuset_cpus)?.max(1)));
    let file: TaskFile = cty::read(file)?;
    file.into_task().map_err(TaskConfigError::Task)
}

/// The ports to forward: the group's, each to its `to` (or the one
/// `port_map` names for its label; with a `port_map`, only those), plus
/// the seed's single `host_port` → `guest_port`.
fn forwards(
    config: &NomadTaskConfig,
    alloc: &Allocation<'_>,
    check: &str,
) -> Result<Vec<serde_json::Value>, TaskConfigError> {
    let port = |host: i64, guest: i64, host_ip: &str| {
        let mut p = serde_json::json!({"host": host, "guest": guest, "check": check});
        if !host_ip.is_empty() {
            p["host_ip"] = host_ip.into();
        }
        p
    };
    let mut out = Vec::new();
    match &config.port_map {
        Some(maps) => {
            for (label, Whole(guest)) in maps.iter().flatten() {
                let allocated =
                    alloc
                        .ports
                        .iter()
                        .find(|p| &p.label == label)
                        .ok_or_else(|| {
                            field(
                                &format!("port_map.{label}"),
                                "no port with this label in the group's network",
                            )
                        })?;
                out.push(port(allocated.value, *guest, &allocated.host_ip));
            }
        }
        None => {
            for p in alloc.ports {
                let guest = if p.to > 0 { p.to } else { p.value };
                out.push(port(p.value, guest, &p.host_ip));
            }
        }
    }
    match (config.host_port, config.guest_port) {
        (Some(Whole(host)), Some(Whole(guest))) => out.push(port(host, guest, "")),
        (None, None) => {}
        (Some(_), None) => return Err(field("guest_port", "missing: host_port needs it")),
        (None, Some(_)) => return Err(field("host_port", "missing: guest_port needs it")),
    }
    Ok(out)
}

/// Nomad task names allow more than our names do (a name becomes a
/// directory name): anything else becomes '-'.
pub fn task_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = cleaned.trim_start_matches(['.', '-']);
    let short: String = trimmed
        .chars()
        .take(policy_sdk::taskfile::MAX_NAME_LEN)
        .collect();
    if short.is_empty() {
        "task".to_string()
    } else {
        short
    }
}

/// The number of cores in a cpuset list such as "0,2-3".
fn cores(cpuset: &str) -> Result<i64, TaskConfigError> {
    let bad = || {
        field(
            "resources.cores",
            format!("cannot read the reserved cores {cpuset:?}"),
        )
    };
    let mut count = 0i64;
    for part in cpuset.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        count += match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (i64, i64) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if b < a {
                    return Err(bad());
                }
                b - a + 1
            }
            None => {
                part.parse::<i64>().map_err(|_| bad())?;
                1
            }
        };
    }
    Ok(count)
}

/// `image_path` is where the job's artifact put the image: inside the task
/// directory, which it may not leave.
pub fn resolve_image_path(task_dir: &Path, path: &str) -> Result<PathBuf, TaskConfigError> {
    let relative = Path::new(path);
    let escapes = relative.is_absolute()
        || relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if escapes || path.is_empty() {
        return Err(field(
            "image_path",
            format!("{path:?} must be a path inside the task directory, without '..'"),
        ));
    }
    let joined = task_dir.join(relative);
    // A symlink among the artifacts must not lead the plugin, as root, to
    // hash or copy a file elsewhere (the fetch checks again when it opens
    // the file; this keeps the digest of the first read confined too).
    if let (Ok(real), Ok(root)) = (
        std::fs::canonicalize(&joined),
        std::fs::canonicalize(task_dir),
    ) && !real.starts_with(&root)
    {
        return Err(field(
            "image_path",
            format!("{path:?} leads outside the task directory through a symlink"),
        ));
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_sdk::{Accelerator, ReadyCheck};

    fn alloc<'a>(ports: &'a [AllocatedPort], cpuset: &'a str) -> Allocation<'a> {
        Allocation {
            task_name: "web server",
            task_dir: Path::new("/nomad/alloc/a1/web"),
            memory_mb: 256,
            cpuset_cpus: cpuset,
            ports,
        }
    }

    fn http_port() -> Vec<AllocatedPort> {
        vec![AllocatedPort {
            label: "http".into(),
            value: 23456,
            to: 8080,
            host_ip: "127.0.0.1".into(),
        }]
    }

    fn seed() -> NomadTaskConfig {
        NomadTaskConfig {
            image_source: Some("http://images/guest.iso".into()),
            checksum: Some("md5:0123456789abcdef0123456789abcdef".into()),
            accelerator: Some("tcg".into()),
            ..Default::default()
        }
    }

    #[test]
    fn group_ports_memory_and_cores_come_from_the_allocation() {
        let ports = http_port();
        let task = to_task(seed(), &alloc(&ports, "0,2-3")).unwrap();
        assert_eq!(task.name, "web-server");
        assert_eq!(task.memory_mb, 256);
        assert_eq!(task.cpus, 3);
        assert_eq!(task.accelerator, Accelerator::Tcg);
        assert_eq!(task.ports.len(), 1);
        let p = &task.ports[0];
        assert_eq!((p.host, p.guest), (23456, 8080));
        assert_eq!(p.host_ip, "127.0.0.1");
        // Nomad's service checks own readiness unless the job asks.
        assert_eq!(p.check, ReadyCheck::None);
        assert_eq!(task.restart.attempts, 0);
    }

    #[test]
    fn port_map_picks_labels_and_names_a_missing_one() {
        let mut ports = http_port();
        ports.push(AllocatedPort {
            label: "ssh".into(),
            value: 23457,
            to: 0,
            host_ip: String::new(),
        });
        let mut config = seed();
        config.port_map = Some(vec![BTreeMap::from([("ssh".to_string(), Whole(22))])]);
        let task = to_task(config.clone(), &alloc(&ports, "")).unwrap();
        assert_eq!(task.ports.len(), 1);
        assert_eq!((task.ports[0].host, task.ports[0].guest), (23457, 22));
        assert_eq!(task.cpus, 1);

        config.port_map = Some(vec![BTreeMap::from([("db".to_string(), Whole(5432))])]);
        let err = to_task(config, &alloc(&ports, "")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid task config: port_map.db: no port with this label in the group's network"
        );
    }

    #[test]
    fn image_path_stays_in_the_task_directory() {
        let mut config = seed();
        config.image_source = None;
        config.image_path = Some("local/guest.iso".into());
        let ports = http_port();
        let task = to_task(config.clone(), &alloc(&ports, "")).unwrap();
        assert_eq!(
            task.image_source,
            "file:///nomad/alloc/a1/web/local/guest.iso"
        );
        for bad in ["../../etc/shadow", "/etc/shadow", ""] {
            config.image_path = Some(bad.into());
            let err = to_task(config.clone(), &alloc(&[], "")).unwrap_err();
            assert!(err.to_string().contains("image_path"), "{bad}: {err}");
        }
    }

    #[test]
    fn image_path_symlinks_stay_in_the_task_directory() {
        let alloc_dir = tempfile::tempdir().unwrap();
        let task_dir = alloc_dir.path().join("web");
        std::fs::create_dir_all(task_dir.join("local")).unwrap();
        std::fs::write(alloc_dir.path().join("other.img"), b"other tenant").unwrap();
        std::fs::write(task_dir.join("local/own.img"), b"own").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", task_dir.join("local/shadow.img")).unwrap();
        std::os::unix::fs::symlink("../../other.img", task_dir.join("local/other.img")).unwrap();
        std::os::unix::fs::symlink("own.img", task_dir.join("local/alias.img")).unwrap();
        for bad in ["local/shadow.img", "local/other.img"] {
            let err = resolve_image_path(&task_dir, bad).unwrap_err();
            assert!(
                err.to_string().contains("through a symlink"),
                "{bad}: {err}"
            );
        }
        for good in ["local/own.img", "local/alias.img"] {
            assert_eq!(
                resolve_image_path(&task_dir, good).unwrap(),
                task_dir.join(good)
            );
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let mut config = seed();
        config.accelerator = Some("hvf".into());
        let err = to_task(config, &alloc(&http_port(), "")).unwrap_err();
        let chain = crate::error_chain(&err);
        assert!(
            chain.contains("accelerator: unknown variant `hvf`"),
            "{chain}"
        );

        let mut config = seed();
        config.checksum = None;
        let err = to_task(config, &alloc(&http_port(), "")).unwrap_err();
        assert_eq!(err.to_string(), "Invalid task config: checksum: missing");

        let mut config = seed();
        config.emulator = Some("qemu-system-aarch64".into());
        assert!(
            to_task(config, &alloc(&http_port(), ""))
                .unwrap_err()
                .to_string()
                .contains("emulator")
        );

        let mut config = seed();
        config.host_port = Some(Whole(8080));
        assert!(
            to_task(config, &alloc(&http_port(), ""))
                .unwrap_err()
                .to_string()
                .contains("guest_port")
        );

        let err = to_task(seed(), &alloc(&http_port(), "0-x")).unwrap_err();
        assert!(err.to_string().contains("cores"), "{err}");

        let err = to_task(seed(), &alloc(&[], "")).unwrap_err();
        assert!(
            err.to_string().contains("network: no port to forward"),
            "{err}"
        );
    }

    #[test]
    fn names_are_made_safe() {
        assert_eq!(task_name("web"), "web");
        assert_eq!(task_name("../x y"), "x-y");
        assert_eq!(task_name("..."), "task");
        assert_eq!(task_name(&"a".repeat(100)).len(), 64);
    }
}
