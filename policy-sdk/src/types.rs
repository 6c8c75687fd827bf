//! The wire types of the policy contract, shared by the executor (host) and
//! by policies (guests).
//!
//! They mirror `wit/policy.wit` one to one. Their serde form is the one users
//! see: task files, `qemu-executor policy check` output and
//! `qemu-executor fingerprint --json`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The contract version this crate speaks: the version of the WIT package.
pub const CONTRACT_VERSION: &str = "0.1.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl Accelerator {
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the executor decides that a forwarded port is served by the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadyCheck {
    /// An HTTP request to `http_path` gets an HTTP status line back.
    Http,
    /// The guest sends something first (an SSH or SMTP banner).
    Banner,
    /// The port is not checked.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub host: u16,
    pub guest: u16,
    pub protocol: Protocol,
    pub host_ip: String,
    pub check: ReadyCheck,
    pub http_path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChecksumAlgorithm {
    Md5,
    Sha256,
    Sha512,
}

impl ChecksumAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            ChecksumAlgorithm::Md5 => "md5",
            ChecksumAlgorithm::Sha256 => "sha256",
            ChecksumAlgorithm::Sha512 => "sha512",
        }
    }

    /// Length of the digest in hexadecimal digits.
    pub fn hex_len(self) -> usize {
        match self {
            ChecksumAlgorithm::Md5 => 32,
            ChecksumAlgorithm::Sha256 => 64,
            ChecksumAlgorithm::Sha512 => 128,
        }
    }
}

impl fmt::Display for ChecksumAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An expected image digest, written `md5:<hex>`, `sha256:<hex>`,
/// `sha512:<hex>`, or as a bare 32-digit hex value meaning MD5 (the original
/// driver's form).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Checksum {
    pub algorithm: ChecksumAlgorithm,
    /// Lower-case hexadecimal, of the length the algorithm implies.
    pub digest: String,
}

/// Why a checksum string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChecksumParseError {
    UnknownAlgorithm(String),
    WrongLength {
        algorithm: ChecksumAlgorithm,
        expected: usize,
        found: usize,
    },
    NotHex,
}

impl fmt::Display for ChecksumParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChecksumParseError::UnknownAlgorithm(a) => write!(
                f,
                "Unknown checksum algorithm {a:?}: expected md5, sha256 or sha512"
            ),
            ChecksumParseError::WrongLength {
                algorithm,
                expected,
                found,
            } => write!(
                f,
                "A {algorithm} digest has {expected} hex digits, this one has {found}"
            ),
            ChecksumParseError::NotHex => f.write_str("The digest is not hexadecimal"),
        }
    }
}

impl std::error::Error for ChecksumParseError {}

impl FromStr for Checksum {
    type Err = ChecksumParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (algorithm, digest) = match s.split_once(':') {
            Some((algo, digest)) => {
                let algorithm = match algo.to_ascii_lowercase().as_str() {
                    "md5" => ChecksumAlgorithm::Md5,
                    "sha256" => ChecksumAlgorithm::Sha256,
                    "sha512" => ChecksumAlgorithm::Sha512,
                    _ => return Err(ChecksumParseError::UnknownAlgorithm(algo.to_string())),
                };
                (algorithm, digest)
            }
            None => (ChecksumAlgorithm::Md5, s),
        };
        if !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ChecksumParseError::NotHex);
        }
        if digest.len() != algorithm.hex_len() {
            return Err(ChecksumParseError::WrongLength {
                algorithm,
                expected: algorithm.hex_len(),
                found: digest.len(),
            });
        }
        Ok(Checksum {
            algorithm,
            digest: digest.to_ascii_lowercase(),
        })
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.digest)
    }
}

impl Serialize for Checksum {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Checksum {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartMode {
    /// Give up once `attempts` restarts happened within `interval_s`.
    Fail,
    /// Wait until the interval is over, then try again.
    Delay,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    pub attempts: u32,
    pub interval_s: u32,
    pub delay_s: u32,
    pub mode: RestartMode,
}

impl Default for RestartPolicy {
    /// The cluster scheduler's defaults for service jobs.
    fn default() -> Self {
        RestartPolicy {
            attempts: 2,
            interval_s: 1800,
            delay_s: 15,
            mode: RestartMode::Fail,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriveInterface {
    Ide,
    Virtio,
}

impl DriveInterface {
    pub fn as_str(self) -> &'static str {
        match self {
            DriveInterface::Ide => "ide",
            DriveInterface::Virtio => "virtio",
        }
    }
}

/// A task as the executor would launch it: every field of the task file, with
/// defaults applied and the single `host_port`/`guest_port` pair folded into
/// `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub name: String,
    pub image_source: String,
    pub checksum: Checksum,
    pub accelerator: Accelerator,
    pub kvm_fallback: bool,
    pub ports: Vec<PortMapping>,
    pub memory_mb: u32,
    pub cpus: u32,
    pub kill_timeout_s: u32,
    pub ready_timeout_s: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_serial: Option<String>,
    pub machine_type: String,
    pub drive_interface: DriveInterface,
    pub graceful_shutdown: bool,
    #[serde(default)]
    pub args: Vec<String>,
    pub restart: RestartPolicy,
}

/// What the host knows of KVM.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KvmStatus {
    Usable,
    Absent,
    /// `/dev/kvm` is there but guests cannot run on it; the reason says why.
    Unusable(String),
}

impl KvmStatus {
    pub fn is_usable(&self) -> bool {
        matches!(self, KvmStatus::Usable)
    }
}

impl fmt::Display for KvmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmStatus::Usable => f.write_str("usable"),
            KvmStatus::Absent => f.write_str("absent"),
            KvmStatus::Unusable(reason) => write!(f, "unusable: {reason}"),
        }
    }
}

impl FromStr for KvmStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "usable" => Ok(KvmStatus::Usable),
            "absent" => Ok(KvmStatus::Absent),
            other => match other.strip_prefix("unusable") {
                Some(rest) => Ok(KvmStatus::Unusable(
                    rest.trim_start_matches(':').trim().to_string(),
                )),
                None => Err(format!(
                    "KVM status {other:?} is not \"usable\", \"absent\" or \"unusable: <reason>\""
                )),
            },
        }
    }
}

impl Serialize for KvmStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KvmStatus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The host a task would run on, as `qemu-executor fingerprint --json`
/// prints it; the keys are the cluster scheduler's attribute names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFacts {
    /// `"1"` when a qemu binary was found, `"0"` otherwise.
    #[serde(rename = "driver.qemu", with = "found_flag")]
    pub qemu_found: bool,
    #[serde(
        rename = "driver.qemu.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub qemu_version: Option<String>,
    #[serde(rename = "driver.qemu.accelerators", default)]
    pub accelerators: Vec<String>,
    #[serde(rename = "driver.qemu.kvm")]
    pub kvm: KvmStatus,
    #[serde(rename = "host.cpus")]
    pub host_cpus: u32,
    #[serde(rename = "host.memory_mb")]
    pub host_memory_mb: u64,
}

mod found_flag {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(found: &bool, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if *found { "1" } else { "0" })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
        match String::deserialize(deserializer)?.as_str() {
            "1" => Ok(true),
            "0" => Ok(false),
            other => Err(serde::de::Error::custom(format!(
                "driver.qemu is \"1\" or \"0\", not {other:?}"
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub name: String,
    pub version: String,
    pub rewrites: bool,
}

/// A policy's answer about one task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "lowercase")]
pub enum Decision {
    Accept,
    Reject { reason: String },
    Rewrite { task: Box<Task>, reason: String },
}

impl Decision {
    pub fn reject(reason: impl Into<String>) -> Self {
        Decision::Reject {
            reason: reason.into(),
        }
    }

    pub fn rewrite(task: Task, reason: impl Into<String>) -> Self {
        Decision::Rewrite {
            task: Box::new(task),
            reason: reason.into(),
        }
    }

    /// `"accept"`, `"reject"` or `"rewrite"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Decision::Accept => "accept",
            Decision::Reject { .. } => "reject",
            Decision::Rewrite { .. } => "rewrite",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_forms() {
        let bare: Checksum = "0123456789ABCDEF0123456789abcdef".parse().unwrap();
        assert_eq!(bare.algorithm, ChecksumAlgorithm::Md5);
        assert_eq!(bare.digest, "0123456789abcdef0123456789abcdef");
        assert_eq!(bare.to_string(), "md5:0123456789abcdef0123456789abcdef");

        let sha: Checksum = format!("SHA256:{}", "a".repeat(64)).parse().unwrap();
        assert_eq!(sha.algorithm, ChecksumAlgorithm::Sha256);
        let sha512: Checksum = format!("sha512:{}", "b".repeat(128)).parse().unwrap();
        assert_eq!(sha512.algorithm, ChecksumAlgorithm::Sha512);
    }

    #[test]
    fn checksum_errors() {
        assert_eq!(
            "crc32:abcd".parse::<Checksum>(),
            Err(ChecksumParseError::UnknownAlgorithm("crc32".into()))
        );
        assert_eq!(
            "md5:abc".parse::<Checksum>(),
            Err(ChecksumParseError::WrongLength {
                algorithm: ChecksumAlgorithm::Md5,
                expected: 32,
                found: 3
            })
        );
        assert_eq!(
            format!("sha256:{}", "a".repeat(32)).parse::<Checksum>(),
            Err(ChecksumParseError::WrongLength {
                algorithm: ChecksumAlgorithm::Sha256,
                expected: 64,
                found: 32
            })
        );
        assert_eq!(
            "zz23456789abcdef0123456789abcdef".parse::<Checksum>(),
            Err(ChecksumParseError::NotHex)
        );
        assert_eq!(
            "".parse::<Checksum>(),
            Err(ChecksumParseError::WrongLength {
                algorithm: ChecksumAlgorithm::Md5,
                expected: 32,
                found: 0
            })
        );
    }

    #[test]
    fn kvm_status_round_trips() {
        for status in [
            KvmStatus::Usable,
            KvmStatus::Absent,
            KvmStatus::Unusable("guest hit an emulation failure".into()),
        ] {
            assert_eq!(status.to_string().parse::<KvmStatus>().unwrap(), status);
        }
        assert!("maybe".parse::<KvmStatus>().is_err());
    }

    #[test]
    fn host_facts_use_attribute_names() {
        let facts = HostFacts {
            qemu_found: true,
            qemu_version: Some("7.2.22".into()),
            accelerators: vec!["kvm".into(), "tcg".into()],
            kvm: KvmStatus::Unusable("emulation failure".into()),
            host_cpus: 2,
            host_memory_mb: 24_000,
        };
        let json = serde_json::to_value(&facts).unwrap();
        assert_eq!(json["driver.qemu"], "1");
        assert_eq!(json["driver.qemu.version"], "7.2.22");
        assert_eq!(json["driver.qemu.kvm"], "unusable: emulation failure");
        let back: HostFacts = serde_json::from_value(json).unwrap();
        assert_eq!(back, facts);
    }
}
