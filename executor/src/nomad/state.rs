//! The driver state in a task's handle: everything a fresh plugin needs to
//! find the VM again after Nomad restarted it with only the handle. Nomad
//! keeps it as opaque bytes; here it is versioned JSON.
//!
//! A relaunch under tcg after KVM failed the guest changes qemu's pid
//! after the handle went to Nomad, so the latest state is also kept in a
//! root-only file beside the exit record: a recovery prefers it when it is
//! the same task's, and newer.

use std::path::{Path, PathBuf};

use policy_sdk::{Accelerator, Task};
use serde::{Deserialize, Serialize};

use crate::qemu::process::ProcessIdentity;

/// `TaskHandle.version`; 0 is reserved by Nomad.
pub const HANDLE_VERSION: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("The task handle's driver state is not ours (version {0})")]
    Version(i32),
    #[error("The task handle's driver state cannot be read")]
    Decode(#[source] serde_json::Error),
    #[error("The task handle names a task directory outside {}", .0.display())]
    Outside(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverState {
    /// Nomad's task id, so a stray state file is never taken for another
    /// task's.
    pub task_id: String,
    /// `<state_dir>/tasks/<name>-<random>`.
    pub task_dir: PathBuf,
    /// The task as the policies left it.
    pub task: Task,
    /// What it runs under now.
    pub accelerator: Accelerator,
    pub qemu: ProcessIdentity,
    pub shim: ProcessIdentity,
    pub started_at_ms: u64,
    pub cgroups: Vec<PathBuf>,
}

impl DriverState {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a driver state serializes")
    }

    /// Reads a handle's state, refusing a task directory outside ours (the
    /// handle comes back from Nomad's state store).
    pub fn decode(version: i32, bytes: &[u8], state_dir: &Path) -> Result<DriverState, StateError> {
        if version != HANDLE_VERSION {
            return Err(StateError::Version(version));
        }
        let state: DriverState = serde_json::from_slice(bytes).map_err(StateError::Decode)?;
        let tasks = state_dir.join("tasks");
        let inside = state.task_dir.parent() == Some(tasks.as_path())
            && state.task_dir.file_name().is_some_and(|n| n != "..");
        if !inside {
            return Err(StateError::Outside(tasks));
        }
        Ok(state)
    }

    /// The task directory's name: unique, and safe as a file name.
    pub fn key(&self) -> String {
        key_of(&self.task_dir)
    }
}

pub fn key_of(task_dir: &Path) -> String {
    task_dir
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

/// Where the plugin keeps what must not be in the VM's own directory
/// (which qemu's user may own): the latest state and the exit record.
pub fn private_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("nomad")
}

pub fn state_file(state_dir: &Path, key: &str) -> PathBuf {
    private_dir(state_dir).join(format!("{key}.json"))
}

pub fn exit_record(state_dir: &Path, key: &str) -> PathBuf {
    private_dir(state_dir).join(format!("{key}.exit.json"))
}

/// Writes the latest state atomically.
pub fn save(state_dir: &Path, state: &DriverState) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = private_dir(state_dir);
    std::fs::create_dir_all(&dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
    tmp.write_all(&state.encode())?;
    tmp.as_file().sync_all()?;
    tmp.persist(state_file(state_dir, &state.key()))
        .map_err(|e| e.error)?;
    Ok(())
}

/// The state to recover from: the saved one when it is this task's and
/// newer than the handle's.
pub fn latest(state_dir: &Path, from_handle: DriverState) -> DriverState {
    let saved = std::fs::read(state_file(state_dir, &from_handle.key()))
        .ok()
        .and_then(|b| serde_json::from_slice::<DriverState>(&b).ok());
    match saved {
        Some(s)
            if s.task_id == from_handle.task_id
                && s.task_dir == from_handle.task_dir
                && s.started_at_ms >= from_handle.started_at_ms =>
        {
            s
        }
        _ => from_handle,
    }
}

/// Removes what the plugin kept for a task that is gone.
pub fn forget(state_dir: &Path, key: &str) {
    for path in [state_file(state_dir, key), exit_record(state_dir, key)] {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(state_dir: &Path) -> DriverState {
        let task: Task = serde_json::from_value(serde_json::json!({
            "name": "web", "image_source": "http://h/x.iso", "checksum": "md5:0123456789abcdef0123456789abcdef",
            "host_port": 18080, "guest_port": 8080,
        }))
        .map(|f: crate::task::TaskFile| f.into_task().unwrap())
        .unwrap();
        DriverState {
            task_id: "a1/web/0badcafe".into(),
            task_dir: state_dir.join("tasks/web-abc123"),
            task,
            accelerator: Accelerator::Tcg,
            qemu: ProcessIdentity {
                pid: 10,
                start_time: 100,
            },
            shim: ProcessIdentity {
                pid: 9,
                start_time: 99,
            },
            started_at_ms: 1000,
            cgroups: Vec::new(),
        }
    }

    #[test]
    fn round_trips_and_refuses_foreign_directories() {
        let dir = tempfile::tempdir().unwrap();
        let s = sample(dir.path());
        assert_eq!(DriverState::decode(1, &s.encode(), dir.path()).unwrap(), s);
        assert!(matches!(
            DriverState::decode(2, &s.encode(), dir.path()),
            Err(StateError::Version(2))
        ));
        let mut outside = s.clone();
        outside.task_dir = PathBuf::from("/etc");
        assert!(matches!(
            DriverState::decode(1, &outside.encode(), dir.path()),
            Err(StateError::Outside(_))
        ));
        assert!(DriverState::decode(1, b"{", dir.path()).is_err());
    }

    #[test]
    fn a_newer_saved_state_wins() {
        let dir = tempfile::tempdir().unwrap();
        let handle = sample(dir.path());
        assert_eq!(latest(dir.path(), handle.clone()), handle);
        let mut relaunched = handle.clone();
        relaunched.qemu.pid = 11;
        relaunched.started_at_ms = 2000;
        save(dir.path(), &relaunched).unwrap();
        assert_eq!(latest(dir.path(), handle.clone()), relaunched);
        // Another task's file is never taken.
        let mut other = handle.clone();
        other.task_id = "a2/web/12345678".into();
        assert_eq!(latest(dir.path(), other.clone()), other);
        forget(dir.path(), &handle.key());
        assert_eq!(latest(dir.path(), handle.clone()), handle);
    }
}
