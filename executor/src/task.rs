//! Task files: their raw form as users write them, the defaults, and the
//! validation that every task passes, whether it comes from a file or out of
//! a policy chain.
//!
//! The raw form keeps integers wide so that a value out of range is reported
//! with the field's name instead of a deserializer's type error.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use policy_sdk::{
    Accelerator, Checksum, DriveInterface, PortMapping, Protocol, ReadyCheck, RestartMode,
    RestartPolicy, Task,
};
use serde::Deserialize;

pub const DEFAULT_MEMORY_MB: u32 = 512;
pub const DEFAULT_CPUS: u32 = 1;
pub const DEFAULT_KILL_TIMEOUT_S: u32 = 30;
pub const DEFAULT_READY_TIMEOUT_S: u32 = 300;
pub const DEFAULT_MACHINE_TYPE: &str = "pc";
pub const DEFAULT_HOST_IP: &str = "127.0.0.1";

const MIN_MEMORY_MB: i64 = 16;
const MAX_MEMORY_MB: i64 = 1 << 20;
const MAX_CPUS: i64 = 255;
const MAX_TIMEOUT_S: i64 = 86_400;
const MAX_NAME_LEN: usize = 64;
const MAX_RESTART_ATTEMPTS: i64 = 1_000;

/// A problem with one field of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// Every problem found in a task, so that one pass fixes them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldErrors(pub Vec<FieldError>);

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("Cannot read task file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Task file {} is neither .toml nor .json", path.display())]
    UnknownFormat { path: PathBuf },
    #[error("Task file {} is not valid TOML for a task", path.display())]
    Toml {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("Task file {} is not valid JSON for a task", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("Invalid task: {0}")]
    Invalid(FieldErrors),
}

/// A `[[ports]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortFile {
    pub host: i64,
    pub guest: i64,
    #[serde(default)]
    pub protocol: Option<Protocol>,
    #[serde(default)]
    pub host_ip: Option<String>,
    #[serde(default)]
    pub check: Option<ReadyCheck>,
    #[serde(default)]
    pub http_path: Option<String>,
}

/// The `[restart]` table as written; missing fields take the defaults of
/// [`RestartPolicy`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartFile {
    pub attempts: Option<i64>,
    pub interval_s: Option<i64>,
    pub delay_s: Option<i64>,
    pub mode: Option<RestartMode>,
}

/// A task file as users write it, in TOML or JSON.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskFile {
    pub name: String,
    pub image_source: String,
    pub checksum: String,
    /// Default: tcg, as in the original driver.
    #[serde(default)]
    pub accelerator: Option<Accelerator>,
    /// Default: true.
    #[serde(default)]
    pub kvm_fallback: Option<bool>,
    #[serde(default)]
    pub host_port: Option<i64>,
    #[serde(default)]
    pub guest_port: Option<i64>,
    #[serde(default)]
    pub ports: Vec<PortFile>,
    #[serde(default)]
    pub memory_mb: Option<i64>,
    #[serde(default)]
    pub cpus: Option<i64>,
    #[serde(default)]
    pub kill_timeout_s: Option<i64>,
    #[serde(default)]
    pub ready_timeout_s: Option<i64>,
    #[serde(default)]
    pub ready_serial: Option<String>,
    #[serde(default)]
    pub machine_type: Option<String>,
    #[serde(default)]
    pub drive_interface: Option<DriveInterface>,
    /// Default: true; false skips the ACPI power button and stops with `quit`.
    #[serde(default)]
    pub graceful_shutdown: Option<bool>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub restart: Option<RestartFile>,
}

/// Reads a task file, TOML or JSON by extension, and returns the validated task.
pub fn load(path: &Path) -> Result<Task, TaskError> {
    let text = std::fs::read_to_string(path).map_err(|source| TaskError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file = match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => parse_toml(&text).map_err(|source| TaskError::Toml {
            path: path.to_path_buf(),
            source,
        })?,
        Some("json") => parse_json(&text).map_err(|source| TaskError::Json {
            path: path.to_path_buf(),
            source,
        })?,
        _ => {
            return Err(TaskError::UnknownFormat {
                path: path.to_path_buf(),
            });
        }
    };
    file.into_task().map_err(TaskError::Invalid)
}

pub fn parse_toml(text: &str) -> Result<TaskFile, toml::de::Error> {
    toml::from_str(text)
}

pub fn parse_json(text: &str) -> Result<TaskFile, serde_json::Error> {
    serde_json::from_str(text)
}

/// Collects field problems while converting the raw form.
#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn push(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            problem: problem.into(),
        });
    }

    fn int_in<T: TryFrom<i64> + Default>(
        &mut self,
        field: &str,
        value: Option<i64>,
        default: T,
        min: i64,
        max: i64,
    ) -> T {
        let Some(v) = value else { return default };
        if v < min || v > max {
            self.push(field, format!("{v} is out of range ({min} to {max})"));
            return default;
        }
        T::try_from(v).unwrap_or_default()
    }
}

impl TaskFile {
    /// Applies defaults, folds `host_port`/`guest_port` into `ports` and
    /// validates the result.
    pub fn into_task(self) -> Result<Task, FieldErrors> {
        let mut p = Problems::default();

        let checksum = match self.checksum.parse::<Checksum>() {
            Ok(c) => Some(c),
            Err(e) => {
                p.push("checksum", e.to_string());
                None
            }
        };

        let mut ports = Vec::new();
        match (self.host_port, self.guest_port) {
            (Some(host), Some(guest)) => {
                let host = p.int_in("host_port", Some(host), 0u16, 1, 65_535);
                let guest = p.int_in("guest_port", Some(guest), 0u16, 1, 65_535);
                ports.push(default_port(host, guest));
            }
            (Some(_), None) => p.push("guest_port", "is required when host_port is given"),
            (None, Some(_)) => p.push("host_port", "is required when guest_port is given"),
            (None, None) if self.ports.is_empty() => p.push(
                "host_port",
                "is required unless [[ports]] is given (with guest_port)",
            ),
            (None, None) => {}
        }
        for (i, port) in self.ports.into_iter().enumerate() {
            let host = p.int_in(
                &format!("ports[{i}].host"),
                Some(port.host),
                0u16,
                1,
                65_535,
            );
            let guest = p.int_in(
                &format!("ports[{i}].guest"),
                Some(port.guest),
                0u16,
                1,
                65_535,
            );
            let mut mapping = default_port(host, guest);
            if let Some(protocol) = port.protocol {
                mapping.protocol = protocol;
                if protocol == Protocol::Udp {
                    mapping.check = ReadyCheck::None;
                }
            }
            if let Some(ip) = port.host_ip {
                mapping.host_ip = ip;
            }
            if let Some(check) = port.check {
                mapping.check = check;
            }
            if let Some(path) = port.http_path {
                mapping.http_path = path;
            }
            ports.push(mapping);
        }

        let defaults = RestartPolicy::default();
        let restart = match self.restart {
            None => defaults,
            Some(r) => RestartPolicy {
                attempts: p.int_in(
                    "restart.attempts",
                    r.attempts,
                    defaults.attempts,
                    0,
                    MAX_RESTART_ATTEMPTS,
                ),
                interval_s: p.int_in(
                    "restart.interval_s",
                    r.interval_s,
                    defaults.interval_s,
                    1,
                    i64::from(u32::MAX),
                ),
                delay_s: p.int_in(
                    "restart.delay_s",
                    r.delay_s,
                    defaults.delay_s,
                    0,
                    MAX_TIMEOUT_S,
                ),
                mode: r.mode.unwrap_or(defaults.mode),
            },
        };

        let task = Task {
            name: self.name,
            image_source: self.image_source,
            checksum: checksum.unwrap_or(Checksum {
                algorithm: policy_sdk::ChecksumAlgorithm::Md5,
                digest: String::new(),
            }),
            accelerator: self.accelerator.unwrap_or(Accelerator::Tcg),
            kvm_fallback: self.kvm_fallback.unwrap_or(true),
            ports,
            memory_mb: p.int_in(
                "memory_mb",
                self.memory_mb,
                DEFAULT_MEMORY_MB,
                MIN_MEMORY_MB,
                MAX_MEMORY_MB,
            ),
            cpus: p.int_in("cpus", self.cpus, DEFAULT_CPUS, 1, MAX_CPUS),
            kill_timeout_s: p.int_in(
                "kill_timeout_s",
                self.kill_timeout_s,
                DEFAULT_KILL_TIMEOUT_S,
                0,
                MAX_TIMEOUT_S,
            ),
            ready_timeout_s: p.int_in(
                "ready_timeout_s",
                self.ready_timeout_s,
                DEFAULT_READY_TIMEOUT_S,
                1,
                MAX_TIMEOUT_S,
            ),
            ready_serial: self.ready_serial,
            machine_type: self
                .machine_type
                .unwrap_or_else(|| DEFAULT_MACHINE_TYPE.to_string()),
            drive_interface: self.drive_interface.unwrap_or(DriveInterface::Ide),
            graceful_shutdown: self.graceful_shutdown.unwrap_or(true),
            args: self.args,
            restart,
        };

        // Conversion problems first; range checks that passed conversion are
        // then repeated by `validate`, which must hold for any task.
        let mut problems = p.0;
        if let Err(FieldErrors(more)) = validate(&task) {
            for e in more {
                if !problems.iter().any(|known| covers(&known.field, &e.field)) {
                    problems.push(e);
                }
            }
        }
        if problems.is_empty() {
            Ok(task)
        } else {
            Err(FieldErrors(problems))
        }
    }
}

/// Whether a problem found while converting `known` already explains the
/// validation problem on `later` (a port left at 0 after a bad `host_port`).
fn covers(known: &str, later: &str) -> bool {
    let is_port_field = |f: &str| f == "host_port" || f == "guest_port" || f.starts_with("ports");
    known == later || (is_port_field(known) && is_port_field(later))
}

fn default_port(host: u16, guest: u16) -> PortMapping {
    PortMapping {
        host,
        guest,
        protocol: Protocol::Tcp,
        host_ip: DEFAULT_HOST_IP.to_string(),
        check: ReadyCheck::Http,
        http_path: "/".to_string(),
    }
}

/// A task name becomes a directory name and a qemu `-name`: keep it to a
/// charset that needs no escaping anywhere and cannot climb out of a
/// directory.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("is longer than {MAX_NAME_LEN} characters"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "contains {bad:?}; use letters, digits, '-', '_' and '.' only"
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err("must not start with '.' or '-'".into());
    }
    Ok(())
}

/// Checks everything a task must satisfy to be launched. Pure: the same
/// checks apply to a task file and to the output of a policy chain.
pub fn validate(task: &Task) -> Result<(), FieldErrors> {
    let mut p = Problems::default();

    if let Err(e) = check_name(&task.name) {
        p.push("name", e);
    }
    if let Err(e) = check_image_source(&task.image_source) {
        p.push("image_source", e);
    }
    let c = &task.checksum;
    if c.digest.len() != c.algorithm.hex_len()
        || !c
            .digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        p.push(
            "checksum",
            format!(
                "a {} digest is {} lower-case hex digits",
                c.algorithm,
                c.algorithm.hex_len()
            ),
        );
    }

    if task.ports.is_empty() {
        p.push("ports", "at least one port forward is required");
    }
    for (i, port) in task.ports.iter().enumerate() {
        let field = |name: &str| format!("ports[{i}].{name}");
        if port.host == 0 {
            p.push(field("host"), "0 is not a port (1 to 65535)");
        }
        if port.guest == 0 {
            p.push(field("guest"), "0 is not a port (1 to 65535)");
        }
        if port.host_ip.parse::<Ipv4Addr>().is_err() {
            p.push(
                field("host_ip"),
                format!("{:?} is not an IPv4 address", port.host_ip),
            );
        }
        if !port.http_path.starts_with('/')
            || port
                .http_path
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            p.push(
                field("http_path"),
                "must start with '/' and hold no spaces or control characters",
            );
        }
        if port.protocol == Protocol::Udp && port.check != ReadyCheck::None {
            p.push(
                field("check"),
                "a udp port cannot be checked; use check = \"none\"",
            );
        }
        let clash = task.ports[..i].iter().position(|q| {
            q.host == port.host && q.protocol == port.protocol && q.host_ip == port.host_ip
        });
        if let Some(j) = clash {
            p.push(
                field("host"),
                format!(
                    "{} {}:{} is already forwarded by ports[{j}]",
                    port.protocol, port.host_ip, port.host
                ),
            );
        }
    }

    let ranges: [(&str, u32, i64, i64); 4] = [
        ("memory_mb", task.memory_mb, MIN_MEMORY_MB, MAX_MEMORY_MB),
        ("cpus", task.cpus, 1, MAX_CPUS),
        ("kill_timeout_s", task.kill_timeout_s, 0, MAX_TIMEOUT_S),
        ("ready_timeout_s", task.ready_timeout_s, 1, MAX_TIMEOUT_S),
    ];
    for (field, value, min, max) in ranges {
        let v = i64::from(value);
        if v < min || v > max {
            p.push(field, format!("{v} is out of range ({min} to {max})"));
        }
    }
    if task.restart.attempts > MAX_RESTART_ATTEMPTS as u32 {
        p.push(
            "restart.attempts",
            format!("is at most {MAX_RESTART_ATTEMPTS}"),
        );
    }
    if task.restart.interval_s == 0 {
        p.push("restart.interval_s", "must be at least 1");
    }

    if let Some(pattern) = &task.ready_serial
        && (pattern.is_empty() || pattern.contains(['\n', '\r']))
    {
        p.push("ready_serial", "must be one non-empty line");
    }
    if task.machine_type.is_empty()
        || !task
            .machine_type
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        p.push(
            "machine_type",
            format!(
                "{:?} is not a qemu machine name (letters, digits, '-', '_', '.')",
                task.machine_type
            ),
        );
    }
    for (i, arg) in task.args.iter().enumerate() {
        if arg.contains(['\n', '\r', '\0']) {
            p.push(format!("args[{i}]"), "must not contain newlines or NUL");
        }
    }

    if p.0.is_empty() {
        Ok(())
    } else {
        Err(FieldErrors(p.0))
    }
}

fn check_image_source(source: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(source).map_err(|e| format!("{source:?} is not a URL: {e}"))?;
    match url.scheme() {
        "http" | "https" => {
            if url.host_str().is_none_or(str::is_empty) {
                return Err(format!("{source:?} has no host"));
            }
            Ok(())
        }
        "file" => {
            if url.path().is_empty() || url.path() == "/" {
                return Err(format!("{source:?} names no file"));
            }
            Ok(())
        }
        other => Err(format!(
            "scheme {other:?} is not supported; use http, https or file"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MD5: &str = "0123456789abcdef0123456789abcdef";

    fn toml_task(extra: &str) -> Result<Task, FieldErrors> {
        let text = format!(
            "name = \"web\"\nimage_source = \"http://127.0.0.1:8000/guest.iso\"\nchecksum = \"md5:{MD5}\"\n{extra}"
        );
        parse_toml(&text).expect("parses").into_task()
    }

    fn fields(result: Result<Task, FieldErrors>) -> Vec<String> {
        result
            .expect_err("must be refused")
            .0
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn issue_example_with_defaults() {
        let task = toml_task("host_port = 18080\nguest_port = 8080\n").unwrap();
        assert_eq!(task.accelerator, Accelerator::Tcg);
        assert_eq!(task.memory_mb, 512);
        assert_eq!(task.cpus, 1);
        assert_eq!(task.kill_timeout_s, 30);
        assert!(task.kvm_fallback);
        assert!(task.graceful_shutdown);
        assert_eq!(task.machine_type, "pc");
        assert_eq!(task.ports, vec![default_port(18080, 8080)]);
        assert_eq!(task.checksum.to_string(), format!("md5:{MD5}"));
    }

    #[test]
    fn full_example_from_the_docs() {
        let task = toml_task(
            "accelerator = \"kvm\"\nhost_port = 18080\nguest_port = 8080\nmemory_mb = 256\ncpus = 1\nkill_timeout_s = 30\n",
        )
        .unwrap();
        assert_eq!(task.accelerator, Accelerator::Kvm);
        assert_eq!(task.memory_mb, 256);
    }

    #[test]
    fn ports_list_and_pair_combine() {
        let task = toml_task(
            "host_port = 18080\nguest_port = 8080\n[[ports]]\nhost = 5353\nguest = 53\nprotocol = \"udp\"\nhost_ip = \"0.0.0.0\"\n",
        )
        .unwrap();
        assert_eq!(task.ports.len(), 2);
        assert_eq!(task.ports[1].protocol, Protocol::Udp);
        assert_eq!(task.ports[1].check, ReadyCheck::None);
        assert_eq!(task.ports[1].host_ip, "0.0.0.0");
    }

    #[test]
    fn json_has_the_same_fields() {
        let text = format!(
            r#"{{"name":"web","image_source":"http://h/guest.iso","checksum":"{MD5}","host_port":18080,"guest_port":8080}}"#
        );
        let task = parse_json(&text).unwrap().into_task().unwrap();
        assert_eq!(task.ports[0].host, 18080);
    }

    #[test]
    fn unknown_field_is_named() {
        let err = parse_toml(&format!(
            "name = \"web\"\nimage_source = \"http://h/x\"\nchecksum = \"{MD5}\"\nhost_prot = 1\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("host_prot"), "{err}");
        let err = parse_json(&format!(
            r#"{{"name":"web","image_source":"http://h/x","checksum":"{MD5}","memory":1}}"#
        ))
        .unwrap_err();
        assert!(err.to_string().contains("memory"), "{err}");
    }

    #[test]
    fn missing_required_fields_are_named() {
        let err = parse_toml("name = \"web\"\nchecksum = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("image_source"), "{err}");
        let err = parse_toml("name = \"web\"\nimage_source = \"http://h/x\"\n").unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        let err = parse_json(r#"{"image_source":"http://h/x","checksum":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("name"), "{err}");
        assert_eq!(fields(toml_task("")), ["host_port"]);
        assert_eq!(fields(toml_task("host_port = 1\n")), ["guest_port"]);
        assert_eq!(fields(toml_task("guest_port = 1\n")), ["host_port"]);
    }

    #[test]
    fn out_of_range_values_are_named() {
        let pair = "host_port = 18080\nguest_port = 8080\n";
        let cases = [
            ("memory_mb = 4\n", "memory_mb"),
            ("memory_mb = 99999999\n", "memory_mb"),
            ("cpus = 0\n", "cpus"),
            ("cpus = 1000\n", "cpus"),
            ("kill_timeout_s = -1\n", "kill_timeout_s"),
            ("ready_timeout_s = 0\n", "ready_timeout_s"),
            ("[restart]\nattempts = -3\n", "restart.attempts"),
            ("[restart]\ninterval_s = 0\n", "restart.interval_s"),
        ];
        for (extra, field) in cases {
            assert_eq!(
                fields(toml_task(&format!("{pair}{extra}"))),
                [field],
                "{extra}"
            );
        }
        assert_eq!(
            fields(toml_task("host_port = 70000\nguest_port = 8080\n")),
            ["host_port"]
        );
        assert_eq!(
            fields(toml_task("host_port = 1\nguest_port = 0\n")),
            ["guest_port"]
        );
        assert_eq!(
            fields(toml_task("[[ports]]\nhost = 1\nguest = 65536\n")),
            ["ports[0].guest"]
        );
    }

    #[test]
    fn bad_values_are_named() {
        let pair = "host_port = 18080\nguest_port = 8080\n";
        let err = parse_toml(&format!(
            "name = \"web\"\nimage_source = \"http://h/x\"\nchecksum = \"{MD5}\"\naccelerator = \"hvf\"\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("accelerator"), "{err}");

        let bad_checksum = parse_toml(&format!(
            "name = \"web\"\nimage_source = \"http://h/x\"\nchecksum = \"crc:1\"\n{pair}"
        ))
        .unwrap()
        .into_task();
        assert_eq!(fields(bad_checksum), ["checksum"]);

        for (source, ok) in [
            ("ftp://h/x.iso", false),
            ("not a url", false),
            ("file:///var/images/x.iso", true),
            ("https://example.com/x.qcow2", true),
            ("file:///", false),
        ] {
            let text = format!(
                "name = \"web\"\nimage_source = \"{source}\"\nchecksum = \"{MD5}\"\n{pair}"
            );
            let result = parse_toml(&text).unwrap().into_task();
            assert_eq!(result.is_ok(), ok, "{source}");
            if !ok {
                assert_eq!(fields(result), ["image_source"]);
            }
        }
    }

    #[test]
    fn names_cannot_escape_or_inject() {
        for bad in [
            "",
            "../etc",
            "a/b",
            "/abs",
            ".hidden",
            "-rf",
            "web,file=/etc/passwd",
            "a=b",
            "new\nline",
            "nul\0",
            "$(reboot)",
            "semi;colon",
            &"x".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?} must be refused");
        }
        for good in ["web", "web-1", "a.b_c", "X9"] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn port_problems() {
        assert_eq!(
            fields(toml_task(
                "[[ports]]\nhost = 1\nguest = 2\nhost_ip = \"::1\"\n"
            )),
            ["ports[0].host_ip"]
        );
        assert_eq!(
            fields(toml_task(
                "host_port = 8080\nguest_port = 80\n[[ports]]\nhost = 8080\nguest = 81\n"
            )),
            ["ports[1].host"]
        );
        assert_eq!(
            fields(toml_task(
                "[[ports]]\nhost = 1\nguest = 2\nhttp_path = \"/x HTTP/1.1\\r\\nHost: y\"\n"
            )),
            ["ports[0].http_path"]
        );
        assert_eq!(
            fields(toml_task(
                "[[ports]]\nhost = 1\nguest = 2\nprotocol = \"udp\"\ncheck = \"http\"\n"
            )),
            ["ports[0].check"]
        );
        let err = parse_toml(&format!(
            "name = \"web\"\nimage_source = \"http://h/x\"\nchecksum = \"{MD5}\"\n[[ports]]\nhost = 1\nguest = 2\nproto = \"tcp\"\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("proto"), "{err}");
    }

    #[test]
    fn machine_type_cannot_carry_options() {
        assert_eq!(
            fields(toml_task(
                "host_port = 1\nguest_port = 2\nmachine_type = \"pc,accel=kvm\"\n"
            )),
            ["machine_type"]
        );
    }

    #[test]
    fn several_problems_are_reported_together() {
        let got = fields(toml_task(
            "host_port = 1\nguest_port = 2\nmemory_mb = 1\ncpus = 0\n",
        ));
        assert_eq!(got, ["memory_mb", "cpus"]);
    }

    #[test]
    fn validate_rejects_what_a_policy_could_produce() {
        let mut task = toml_task("host_port = 18080\nguest_port = 8080\n").unwrap();
        assert!(validate(&task).is_ok());
        task.ports.clear();
        task.memory_mb = 0;
        task.checksum.digest = "XYZ".into();
        let got: Vec<_> = validate(&task)
            .unwrap_err()
            .0
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(got, ["checksum", "ports", "memory_mb"]);
    }

    #[test]
    fn load_by_extension() {
        let dir = tempfile::tempdir().unwrap();
        let toml_path = dir.path().join("t.toml");
        std::fs::write(
            &toml_path,
            format!("name = \"web\"\nimage_source = \"http://h/x\"\nchecksum = \"{MD5}\"\nhost_port = 1\nguest_port = 2\n"),
        )
        .unwrap();
        assert_eq!(load(&toml_path).unwrap().name, "web");
        let yaml = dir.path().join("t.yaml");
        std::fs::write(&yaml, "name: web").unwrap();
        assert!(matches!(load(&yaml), Err(TaskError::UnknownFormat { .. })));
        assert!(matches!(
            load(&dir.path().join("missing.toml")),
            Err(TaskError::Read { .. })
        ));
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{").unwrap();
        assert!(matches!(load(&bad), Err(TaskError::Json { .. })));
    }
}
