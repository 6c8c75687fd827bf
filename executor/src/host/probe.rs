//! What this host offers: the qemu binary, its version and accelerators, the
//! state of KVM, cpus and memory. The result is what `fingerprint --json`
//! prints and what policies receive as host facts.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use policy_sdk::{HostFacts, KvmStatus};
use serde::{Deserialize, Serialize};
use tokio::process::Command;

use super::{kvm, verdict};

pub const QEMU_BINARY: &str = "qemu-system-x86_64";
const CACHE_FILE: &str = "qemu-fingerprint.json";

#[derive(Debug, thiserror::Error)]
pub enum FingerprintError {
    #[error("{QEMU_BINARY} was not found on PATH; install qemu-system-x86")]
    QemuNotFound,
    #[error("Cannot run {}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot read a version from `{} -version`: {output:?}", binary.display())]
    NoVersion { binary: PathBuf, output: String },
}

/// The qemu binary and what it can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuInfo {
    pub binary: PathBuf,
    pub version: String,
    pub accelerators: Vec<String>,
}

/// Where to look and what to consult.
#[derive(Debug, Clone)]
pub struct Probe {
    /// An explicit qemu binary; otherwise `qemu-system-x86_64` on PATH.
    pub qemu_binary: Option<PathBuf>,
    /// Holds the KVM verdict and a cache of the qemu fingerprint.
    pub state_dir: PathBuf,
    pub kvm_device: PathBuf,
}

impl Probe {
    pub fn new(state_dir: PathBuf) -> Self {
        Probe {
            qemu_binary: std::env::var_os("QEMU_EXECUTOR_QEMU").map(PathBuf::from),
            state_dir,
            kvm_device: PathBuf::from("/dev/kvm"),
        }
    }

    /// The host facts, as policies see them. A missing qemu is a fact, not
    /// an error.
    pub async fn host_facts(&self) -> HostFacts {
        let qemu = self.qemu().await;
        let device = self.kvm_device.clone();
        let probed = tokio::task::spawn_blocking(move || kvm::probe(&device))
            .await
            .unwrap_or_else(|e| KvmStatus::Unusable(format!("probe panicked: {e}")));
        let version = qemu.as_ref().ok().map(|q| q.version.as_str());
        let kvm = combine_kvm(probed, verdict::load(&self.state_dir, version));
        HostFacts {
            qemu_found: qemu.is_ok(),
            qemu_version: qemu.as_ref().ok().map(|q| q.version.clone()),
            accelerators: qemu.map(|q| q.accelerators).unwrap_or_default(),
            kvm,
            host_cpus: host_cpus(),
            host_memory_mb: host_memory_mb(),
        }
    }

    /// Finds qemu and reads its version and accelerators. The answer is
    /// cached under the state dir, keyed by the binary's identity, so that
    /// launching a task does not pay for two extra qemu processes.
    pub async fn qemu(&self) -> Result<QemuInfo, FingerprintError> {
        let binary = match &self.qemu_binary {
            Some(b) => b.clone(),
            None => find_on_path(QEMU_BINARY).ok_or(FingerprintError::QemuNotFound)?,
        };
        let identity = binary_identity(&binary).ok_or(FingerprintError::QemuNotFound)?;
        let cache_path = self.state_dir.join(CACHE_FILE);
        if let Some(cached) = read_cache(&cache_path, &identity) {
            return Ok(cached);
        }
        let info = probe_qemu(&binary).await?;
        write_cache(&cache_path, &identity, &info);
        Ok(info)
    }
}

/// A probe that passes is overruled by what a real guest showed.
fn combine_kvm(probed: KvmStatus, seen: Option<verdict::KvmVerdict>) -> KvmStatus {
    match (probed, seen) {
        (KvmStatus::Usable, Some(v)) => KvmStatus::Unusable(v.reason),
        (probed, _) => probed,
    }
}

async fn probe_qemu(binary: &Path) -> Result<QemuInfo, FingerprintError> {
    let run = |arg: &'static [&'static str]| {
        let binary = binary.to_path_buf();
        async move {
            Command::new(&binary)
                .args(arg)
                .kill_on_drop(true)
                .output()
                .await
                .map_err(|source| FingerprintError::Spawn { binary, source })
        }
    };
    let (version_out, accel_out) = tokio::join!(run(&["-version"]), run(&["-accel", "help"]));
    let version_text = String::from_utf8_lossy(&version_out?.stdout).into_owned();
    let version = parse_version(&version_text).ok_or_else(|| FingerprintError::NoVersion {
        binary: binary.to_path_buf(),
        output: version_text.clone(),
    })?;
    let accelerators = parse_accelerators(&String::from_utf8_lossy(&accel_out?.stdout));
    Ok(QemuInfo {
        binary: binary.to_path_buf(),
        version,
        accelerators,
    })
}

/// The version the way the original driver read it: the first
/// `version X.Y.Z` in `qemu -version`.
pub fn parse_version(output: &str) -> Option<String> {
    let rest = &output[output.find("version ")? + "version ".len()..];
    let version: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let version = version.trim_end_matches('.');
    (!version.is_empty() && version.starts_with(|c: char| c.is_ascii_digit()))
        .then(|| version.to_string())
}

/// The accelerator names listed by `qemu -accel help`.
pub fn parse_accelerators(output: &str) -> Vec<String> {
    output
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains(' ') && !l.ends_with(':'))
        .map(str::to_string)
        .collect()
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
}

/// Identifies one build of a binary: a replaced or upgraded qemu changes it.
fn binary_identity(binary: &Path) -> Option<String> {
    let m = std::fs::metadata(binary).ok()?;
    Some(format!(
        "{}:{}:{}:{}:{}",
        binary.display(),
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime_nsec() + m.mtime() * 1_000_000_000
    ))
}

#[derive(Serialize, Deserialize)]
struct CachedInfo {
    identity: String,
    info: QemuInfo,
}

fn read_cache(path: &Path, identity: &str) -> Option<QemuInfo> {
    let cached: CachedInfo = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    (cached.identity == identity).then_some(cached.info)
}

fn write_cache(path: &Path, identity: &str, info: &QemuInfo) {
    let cached = CachedInfo {
        identity: identity.to_string(),
        info: info.clone(),
    };
    // A cache that cannot be written only costs time on the next run.
    let Some(dir) = path.parent() else { return };
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        serde_json::to_writer(&tmp, &cached)?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    };
    if let Err(e) = write() {
        tracing::debug!(path = %path.display(), error = %e, "cannot cache the qemu fingerprint");
    }
}

pub fn host_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

pub fn host_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_meminfo_total_kb(&text))
        .map_or(0, |kb| kb / 1024)
}

fn parse_meminfo_total_kb(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_as_the_original_driver_reads_it() {
        let debian = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(parse_version(debian).as_deref(), Some("7.2.22"));
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2\n").as_deref(),
            Some("10.0.2")
        );
        assert_eq!(
            parse_version("QEMU emulator version 2.11.1(Debian 1:2.11+dfsg-1ubuntu7)").as_deref(),
            Some("2.11.1")
        );
        assert_eq!(parse_version("no numbers here"), None);
        assert_eq!(parse_version("version x"), None);
    }

    #[test]
    fn accelerators_from_help() {
        let out = "Accelerators supported in QEMU binary:\ntcg\nkvm\n";
        assert_eq!(parse_accelerators(out), ["tcg", "kvm"]);
        assert!(parse_accelerators("").is_empty());
    }

    #[test]
    fn meminfo_total() {
        let text = "MemTotal:       24591236 kB\nMemFree:        23000000 kB\n";
        assert_eq!(parse_meminfo_total_kb(text), Some(24_591_236));
        assert_eq!(parse_meminfo_total_kb("MemFree: 1 kB"), None);
    }

    #[test]
    fn a_seen_failure_overrules_the_probe() {
        let seen = verdict::KvmVerdict {
            reason: "KVM internal error".into(),
            kernel: String::new(),
            qemu_version: None,
            recorded_at: 0,
        };
        assert_eq!(
            combine_kvm(KvmStatus::Usable, Some(seen.clone())),
            KvmStatus::Unusable("KVM internal error".into())
        );
        assert_eq!(
            combine_kvm(KvmStatus::Absent, Some(seen)),
            KvmStatus::Absent
        );
        assert_eq!(combine_kvm(KvmStatus::Usable, None), KvmStatus::Usable);
    }

    #[tokio::test]
    async fn fingerprint_is_cached_by_binary_identity() {
        let dir = tempfile::tempdir().unwrap();
        // A stand-in qemu that answers like the real one and counts calls.
        let fake = dir.path().join("qemu-system-x86_64");
        let counter = dir.path().join("calls");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho x >> {}\ncase \"$1\" in -version) echo 'QEMU emulator version 9.1.0';; *) printf 'Accelerators supported in QEMU binary:\\ntcg\\n';; esac\n",
                counter.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let probe = Probe {
            qemu_binary: Some(fake.clone()),
            state_dir: dir.path().join("state"),
            kvm_device: PathBuf::from("/nonexistent"),
        };
        let first = probe.qemu().await.unwrap();
        assert_eq!(first.version, "9.1.0");
        assert_eq!(first.accelerators, ["tcg"]);
        let calls = || std::fs::read_to_string(&counter).unwrap().lines().count();
        assert_eq!(calls(), 2);
        assert_eq!(probe.qemu().await.unwrap(), first);
        assert_eq!(calls(), 2, "the second fingerprint comes from the cache");

        let facts = probe.host_facts().await;
        assert!(facts.qemu_found);
        assert_eq!(facts.kvm, KvmStatus::Absent);
        assert!(facts.host_cpus >= 1);
        assert!(facts.host_memory_mb > 0);
    }
}
