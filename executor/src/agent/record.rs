//! What the agent keeps about a task, in the store and in `status`: its
//! state, what the policies decided, the VM's identity, its restarts and
//! how it ended. Plain data with serde, so the store's rows and the API's
//! JSON are the same shapes.

use std::path::PathBuf;

use policy_sdk::{Accelerator, Task};
use serde::{Deserialize, Serialize};

pub use crate::host::isolation::{IsolationReport, Mechanism};

use crate::qemu::process::ProcessIdentity;

/// A task's state. The order is the order of a task's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Accepted, waiting to be worked on (or for a restart's delay).
    Pending,
    /// The policy chain is deciding about it.
    Evaluating,
    /// Its image is being fetched into the cache.
    Fetching,
    /// qemu is being started.
    Starting,
    /// qemu runs; the guest is booting.
    Running,
    /// Every port answers.
    Ready,
    /// A stop was asked for and is under way.
    Stopping,
    /// Ended as it should: the guest shut down, or a stop was asked for.
    Exited,
    /// Rejected, failed to start, or out of restarts.
    Failed,
}

impl TaskState {
    pub const ALL: [TaskState; 9] = [
        TaskState::Pending,
        TaskState::Evaluating,
        TaskState::Fetching,
        TaskState::Starting,
        TaskState::Running,
        TaskState::Ready,
        TaskState::Stopping,
        TaskState::Exited,
        TaskState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Evaluating => "evaluating",
            TaskState::Fetching => "fetching",
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Ready => "ready",
            TaskState::Stopping => "stopping",
            TaskState::Exited => "exited",
            TaskState::Failed => "failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Exited | TaskState::Failed)
    }

    /// Whether a VM may exist in this state.
    pub fn has_vm(self) -> bool {
        matches!(
            self,
            TaskState::Starting | TaskState::Running | TaskState::Ready | TaskState::Stopping
        )
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The accelerator a task got, and why when it is not the one it asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceleratorChoice {
    pub requested: Accelerator,
    pub used: Accelerator,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The image a task boots from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub path: PathBuf,
    pub size: u64,
    pub cache_hit: bool,
    pub body_bytes: u64,
}

/// The running VM: qemu and its shim, recognised again by pid and start
/// time after an agent restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub qemu: ProcessIdentity,
    pub shim: ProcessIdentity,
    pub started_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at_ms: Option<u64>,
}

/// One restart and what caused it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartRecord {
    pub at_ms: u64,
    pub cause: String,
    /// The wait before the restart, in milliseconds.
    #[serde(default)]
    pub delay_ms: u64,
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub at_ms: u64,
    pub reason: String,
    /// The VM ended while no agent was watching; the shim's record says how.
    #[serde(default)]
    pub while_agent_down: bool,
}

/// Everything the agent knows about one task. Stored as JSON in the store,
/// one row per task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    pub name: String,
    pub state: TaskState,
    pub submitted_at_ms: u64,
    pub updated_at_ms: u64,
    /// The task directory: logs, sockets, overlay.
    pub dir: PathBuf,
    /// The task as submitted.
    pub submitted: Task,
    /// The task as the policies left it (absent until they ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
    /// Each policy's decision, reason and diff, in chain order.
    #[serde(default)]
    pub policies: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<AcceleratorChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmRecord>,
    #[serde(default)]
    pub restarts: Vec<RestartRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitRecord>,
    /// The stop asked for, with its kill timeout in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_requested: Option<u64>,
    #[serde(default)]
    pub isolation: IsolationReport,
    /// cgroup directories the VM runs in.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// The client's `Idempotency-Key` for its submit, if it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl TaskRecord {
    pub fn new(id: String, dir: PathBuf, submitted: Task, now_ms: u64) -> Self {
        TaskRecord {
            id,
            name: submitted.name.clone(),
            state: TaskState::Pending,
            submitted_at_ms: now_ms,
            updated_at_ms: now_ms,
            dir,
            submitted,
            task: None,
            policies: Vec::new(),
            accelerator: None,
            image: None,
            vm: None,
            restarts: Vec::new(),
            exit: None,
            stop_requested: None,
            isolation: IsolationReport::new(),
            cgroups: Vec::new(),
            idempotency_key: None,
        }
    }

    /// The task to launch: the policies' result once they ran.
    pub fn effective_task(&self) -> &Task {
        self.task.as_ref().unwrap_or(&self.submitted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_serialize_as_their_names() {
        for state in TaskState::ALL {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
            let back: TaskState = serde_json::from_str(&json).unwrap();
            assert_eq!(back, state);
        }
        assert!(TaskState::Exited.is_terminal() && TaskState::Failed.is_terminal());
        assert!(!TaskState::Stopping.is_terminal());
        assert!(TaskState::Stopping.has_vm() && !TaskState::Fetching.has_vm());
    }
}
