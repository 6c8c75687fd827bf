//! Task files: their raw form as users write them, the defaults, and the
//! validation that every task passes, whether it comes from a file or out of
//! a policy chain.
//!
//! This lives in the SDK so that the executor, `qemu-executor policy test` and
//! a policy's own native `cargo test` read task fields with the very same
//! defaults and checks. The raw form keeps integers wide so that a value out
//! of range is reported with the field's name instead of a deserializer's
//! type error.

mod validate;

use std::fmt;

use serde::Deserialize;

use crate::{
    Accelerator, Checksum, DriveInterface, PortMapping, Protocol, ReadyCheck, RestartMode,
    RestartPolicy, Task,
};

pub use validate::{check_name, validate};

pub const DEFAULT_MEMORY_MB: u32 = 512;
pub const DEFAULT_CPUS: u32 = 1;
pub const DEFAULT_KILL_TIMEOUT_S: u32 = 30;
pub const DEFAULT_READY_TIMEOUT_S: u32 = 300;
pub const DEFAULT_MACHINE_TYPE: &str = "pc";
pub const DEFAULT_HOST_IP: &str = "127.0.0.1";

pub const MIN_MEMORY_MB: i64 = 16;
pub const MAX_MEMORY_MB: i64 = 1 << 20;
pub const MAX_CPUS: i64 = 255;
pub const MAX_TIMEOUT_S: i64 = 86_400;
pub const MAX_NAME_LEN: usize = 64;
pub const MAX_RESTART_ATTEMPTS: i64 = 1_000;

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

/// Collects field problems while converting the raw form.
#[derive(Default)]
pub(crate) struct Problems(Vec<FieldError>);

impl Problems {
    pub(crate) fn push(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            problem: problem.into(),
        });
    }

    pub(crate) fn int_in<T: TryFrom<i64> + Default>(
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
                algorithm: crate::ChecksumAlgorithm::Md5,
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

#[cfg(test)]
mod tests;
