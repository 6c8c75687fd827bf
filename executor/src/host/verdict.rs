//! The remembered verdict on KVM: once a real guest showed that KVM does not
//! work on this host, later tasks skip it without paying for a failed boot.
//!
//! A verdict holds only for the kernel and the qemu it was seen with; an
//! upgrade of either makes it stale, and the next kvm task tries again.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE_NAME: &str = "kvm-verdict.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmVerdict {
    /// What the guest showed, e.g. "KVM internal error (emulation failure)".
    pub reason: String,
    /// `uname -r` when it was seen.
    pub kernel: String,
    pub qemu_version: Option<String>,
    /// Seconds since the epoch.
    pub recorded_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VerdictError {
    #[error("Cannot write the KVM verdict to {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// The verdict recorded for this kernel and qemu version, if any.
pub fn load(state_dir: &Path, qemu_version: Option<&str>) -> Option<KvmVerdict> {
    let text = std::fs::read_to_string(path(state_dir)).ok()?;
    let verdict: KvmVerdict = serde_json::from_str(&text).ok()?;
    (verdict.kernel == kernel_release() && verdict.qemu_version.as_deref() == qemu_version)
        .then_some(verdict)
}

/// Records that KVM failed a real guest on this host.
pub fn record(
    state_dir: &Path,
    reason: &str,
    qemu_version: Option<&str>,
) -> Result<KvmVerdict, VerdictError> {
    let verdict = KvmVerdict {
        reason: reason.to_string(),
        kernel: kernel_release(),
        qemu_version: qemu_version.map(str::to_string),
        recorded_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let target = path(state_dir);
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(state_dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(state_dir)?;
        tmp.write_all(serde_json::to_string_pretty(&verdict)?.as_bytes())?;
        tmp.as_file().sync_all()?;
        tmp.persist(&target).map_err(|e| e.error)?;
        Ok(())
    };
    write().map_err(|source| VerdictError::Write {
        path: target.clone(),
        source,
    })?;
    Ok(verdict)
}

/// Forgets the verdict (after the operator fixed KVM). Returns whether there
/// was one.
pub fn forget(state_dir: &Path) -> std::io::Result<bool> {
    match std::fs::remove_file(path(state_dir)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_verdict_applies_to_same_qemu_only() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), Some("7.2.22")), None);
        let v = record(dir.path(), "emulation failure", Some("7.2.22")).unwrap();
        assert_eq!(load(dir.path(), Some("7.2.22")), Some(v));
        assert_eq!(load(dir.path(), Some("8.0.0")), None);
        assert!(forget(dir.path()).unwrap());
        assert!(!forget(dir.path()).unwrap());
        assert_eq!(load(dir.path(), Some("7.2.22")), None);
    }

    #[test]
    fn stale_kernel_makes_it_void() {
        let dir = tempfile::tempdir().unwrap();
        let stale = KvmVerdict {
            reason: "x".into(),
            kernel: "0.0.0-other".into(),
            qemu_version: None,
            recorded_at: 0,
        };
        std::fs::write(
            dir.path().join(FILE_NAME),
            serde_json::to_string(&stale).unwrap(),
        )
        .unwrap();
        assert_eq!(load(dir.path(), None), None);
    }
}
