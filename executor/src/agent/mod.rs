//! Agent mode: many VMs under one long-running executor that keeps their
//! state in a store and gets them back after its own restart.
//!
//! - [`Agent`]: the tasks, the store, and the launch pipeline they share
//!   (fetcher, cache, policy chain, and the isolation this host allows).
//! - `worker`: one tokio task per task, through the pipeline to the VM's
//!   end, with restarts; `recover`: what a restarted agent does with each
//!   task.
//! - `api` / `server`: HTTP/1.1 + JSON over a Unix socket; [`client`]: the
//!   CLI's side of it.
//! - [`store`]: redb, one row per task, written before a change takes
//!   effect.

pub mod client;
pub mod metrics;
pub mod record;
pub mod restart;
pub mod server;
pub mod store;

mod api;
mod logs;
mod recover;
mod submit;
mod worker;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use policy_sdk::{PortMapping, Task};
use serde::Serialize;
use tokio::sync::watch;

use crate::host::usage;
use crate::launch::Pipeline;
use crate::vm::StopSignal;

pub use metrics::Metrics;
pub use record::{TaskRecord, TaskState};
pub use store::Store;
pub use submit::Submitted;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("Cannot open the agent's state")]
    Store(#[from] store::StoreError),
    #[error("Cannot create {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Its own message names the directory.
    #[error(transparent)]
    TaskDir(#[from] crate::launch::LaunchError),
    #[error("The agent is shutting down and accepts no new tasks")]
    ShuttingDown,
    #[error("Host port {protocol} {host_ip}:{port} is held by task {holder}")]
    PortTaken {
        protocol: String,
        host_ip: String,
        port: u16,
        holder: String,
    },
    #[error("Idempotency-Key {key:?} was used for task {id}, with another task")]
    KeyReused { key: String, id: String },
    #[error("Invalid Idempotency-Key: {0}")]
    InvalidKey(&'static str),
}

/// What stopping a task can run into.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StopError {
    #[error("No task {0}")]
    NotFound(String),
    #[error("Task {id} already ended ({state})")]
    Ended { id: String, state: TaskState },
}

/// The agent: its tasks and what they share.
pub struct Agent {
    store: Store,
    /// Every task's launch: fetcher, cache, policy chain, host probe,
    /// configuration, and the VMs' shim and isolation.
    pipeline: Pipeline,
    exits_dir: PathBuf,
    tasks: RwLock<BTreeMap<String, Arc<TaskHandle>>>,
    pub metrics: Metrics,
    accepting: AtomicBool,
    /// Held while a submit checks ports and keys and records its task, so
    /// two submits cannot both pass the checks.
    submitting: Mutex<()>,
}

/// One task as the agent holds it: its record (as last written to the
/// store), its stop request and a channel that follows its state.
pub struct TaskHandle {
    pub id: String,
    record: Mutex<TaskRecord>,
    stop: StopSignal,
    state: watch::Sender<TaskState>,
    /// Still being re-identified after an agent restart.
    recovering: AtomicBool,
}

impl TaskHandle {
    fn new(record: TaskRecord, recovering: bool) -> Self {
        let (state, _) = watch::channel(record.state);
        TaskHandle {
            id: record.id.clone(),
            record: Mutex::new(record),
            stop: StopSignal::default(),
            state,
            recovering: AtomicBool::new(recovering),
        }
    }

    pub fn record(&self) -> TaskRecord {
        self.record.lock().expect("task record poisoned").clone()
    }

    pub fn state(&self) -> TaskState {
        *self.state.borrow()
    }

    pub fn watch(&self) -> watch::Receiver<TaskState> {
        self.state.subscribe()
    }

    pub fn is_recovering(&self) -> bool {
        self.recovering.load(Ordering::Acquire)
    }
}

/// One line of `ls`.
#[derive(Debug, Clone, Serialize)]
pub struct TaskSummary {
    pub id: String,
    pub name: String,
    pub state: TaskState,
    pub pid: Option<u32>,
    pub ports: Vec<PortMapping>,
    pub restarts: usize,
}

/// What `status` shows: the record, plus what only the live process tells.
#[derive(Debug, Clone, Serialize)]
pub struct TaskStatus {
    #[serde(flatten)]
    pub record: TaskRecord,
    /// qemu's pid while a VM exists.
    pub pid: Option<u32>,
    pub ports: Vec<PortMapping>,
    pub restart_count: usize,
    /// Still being re-identified after an agent restart.
    pub recovering: bool,
    /// qemu's resident memory and CPU time, while it runs.
    pub usage: Option<usage::Usage>,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub status: &'static str,
    pub version: &'static str,
    pub pid: u32,
    pub accepting: bool,
    pub tasks: usize,
    pub recovering: usize,
    pub isolation: record::IsolationReport,
}

pub(crate) fn now_ms() -> u64 {
    crate::qemu::shim::now_ms()
}

impl Agent {
    /// Opens the store under `<state>/agent` (refusing a second agent on
    /// the same state directory) and says which isolation applies. The
    /// pipeline's VMs must be detached: they outlive the agent.
    pub fn open(pipeline: Pipeline) -> Result<Arc<Agent>, AgentError> {
        let agent_dir = pipeline.state_dir.join("agent");
        let store = Store::open(&agent_dir)?;
        let exits_dir = agent_dir.join("exits");
        create_private_dir(&exits_dir)?;
        for (name, m) in isolation_report(&pipeline) {
            if m.active {
                tracing::info!(mechanism = %name, detail = %m.detail, "isolation active");
            } else {
                tracing::warn!(mechanism = %name, why = %m.detail, "isolation unavailable");
            }
        }
        Ok(Arc::new(Agent {
            store,
            pipeline,
            exits_dir,
            tasks: RwLock::new(BTreeMap::new()),
            metrics: Metrics::default(),
            accepting: AtomicBool::new(true),
            submitting: Mutex::new(()),
        }))
    }

    /// Reads every task from the store and hands each live one to a worker
    /// that re-identifies its VM. Returns how many tasks were read.
    pub fn recover(self: &Arc<Self>) -> Result<usize, AgentError> {
        let rows = self.store.all()?;
        let count = rows.len();
        for row in rows {
            let record = match row {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "skipping an unreadable task");
                    continue;
                }
            };
            let live = !record.state.is_terminal();
            let handle = Arc::new(TaskHandle::new(record, live));
            self.tasks
                .write()
                .expect("task map poisoned")
                .insert(handle.id.clone(), handle.clone());
            if live {
                tokio::spawn(worker::drive(self.clone(), handle, worker::Next::Recover));
            }
        }
        Ok(count)
    }

    /// Accepts a validated task: a task directory, a row in the store,
    /// then a worker. With `key`, a repeat of an earlier submit with the
    /// same key and task answers with that task instead.
    pub fn submit(
        self: &Arc<Self>,
        task: Task,
        key: Option<String>,
    ) -> Result<Submitted, AgentError> {
        if !self.accepting.load(Ordering::Acquire) {
            return Err(AgentError::ShuttingDown);
        }
        let _submitting = self.submitting.lock().expect("submit lock poisoned");
        let records: Vec<TaskRecord> = self.handles().iter().map(|h| h.record()).collect();
        if let Some(key) = &key {
            submit::check_key(key).map_err(AgentError::InvalidKey)?;
            if let Some(earlier) = records
                .iter()
                .find(|r| r.idempotency_key.as_ref() == Some(key))
            {
                if earlier.submitted != task {
                    return Err(AgentError::KeyReused {
                        key: key.clone(),
                        id: earlier.id.clone(),
                    });
                }
                return Ok(Submitted::Replayed(earlier.clone()));
            }
        }
        if let Some((port, holder)) = submit::port_holder(&task, &records) {
            return Err(AgentError::PortTaken {
                protocol: port.protocol.to_string(),
                host_ip: port.host_ip.clone(),
                port: port.host,
                holder: holder.id.clone(),
            });
        }
        let dir = crate::launch::task_dir(&self.pipeline.state_dir, &task.name)?;
        // Logs and the serial console are the tenant's business only.
        std::fs::set_permissions(
            &dir.root,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(|source| AgentError::Dir {
            path: dir.root.clone(),
            source,
        })?;
        let id = dir
            .root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| task.name.clone());
        let mut record = TaskRecord::new(id, dir.root, task, now_ms());
        record.idempotency_key = key;
        self.store.put(&record)?;
        tracing::info!(task = %record.id, name = %record.name, "task accepted");
        let handle = Arc::new(TaskHandle::new(record.clone(), false));
        self.tasks
            .write()
            .expect("task map poisoned")
            .insert(handle.id.clone(), handle.clone());
        tokio::spawn(worker::drive(self.clone(), handle, worker::Next::Admit));
        Ok(Submitted::Created(record))
    }

    pub fn task(&self, id: &str) -> Option<Arc<TaskHandle>> {
        self.tasks
            .read()
            .expect("task map poisoned")
            .get(id)
            .cloned()
    }

    fn handles(&self) -> Vec<Arc<TaskHandle>> {
        self.tasks
            .read()
            .expect("task map poisoned")
            .values()
            .cloned()
            .collect()
    }

    pub fn list(&self) -> Vec<TaskSummary> {
        self.handles()
            .iter()
            .map(|h| {
                let r = h.record();
                TaskSummary {
                    pid: vm_pid(&r),
                    ports: r.effective_task().ports.clone(),
                    restarts: r.restarts.len(),
                    id: r.id,
                    name: r.name,
                    state: r.state,
                }
            })
            .collect()
    }

    pub fn status(&self, id: &str) -> Option<TaskStatus> {
        let handle = self.task(id)?;
        let record = handle.record();
        let pid = vm_pid(&record);
        Some(TaskStatus {
            pid,
            ports: record.effective_task().ports.clone(),
            restart_count: record.restarts.len(),
            recovering: handle.is_recovering(),
            usage: pid.and_then(usage::of),
            record,
        })
    }

    /// Asks task `id` to stop gracefully; `timeout` overrides its kill
    /// timeout. The stop is recorded before it is acted on.
    pub fn stop(&self, id: &str, timeout: Option<Duration>) -> Result<Arc<TaskHandle>, StopError> {
        let handle = self
            .task(id)
            .ok_or_else(|| StopError::NotFound(id.to_string()))?;
        let state = handle.state();
        if state.is_terminal() {
            return Err(StopError::Ended {
                id: id.to_string(),
                state,
            });
        }
        let kill_timeout = timeout.map_or_else(
            || u64::from(handle.record().effective_task().kill_timeout_s),
            |t| t.as_secs(),
        );
        self.update(&handle, |r| r.stop_requested = Some(kill_timeout));
        handle.stop.request(timeout);
        Ok(handle)
    }

    /// Stops taking new tasks (SIGTERM).
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Release);
    }

    /// Stops every live task gracefully and waits until they ended.
    pub async fn stop_all(&self) {
        let mut waits = Vec::new();
        for handle in self.handles() {
            if self.stop(&handle.id, None).is_ok() {
                let mut rx = handle.watch();
                waits.push(async move {
                    let _ = rx.wait_for(|s| s.is_terminal()).await;
                });
            }
        }
        futures_util::future::join_all(waits).await;
    }

    pub fn health(&self) -> Health {
        let handles = self.handles();
        Health {
            status: "ok",
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            accepting: self.accepting.load(Ordering::Acquire),
            tasks: handles.len(),
            recovering: handles.iter().filter(|h| h.is_recovering()).count(),
            isolation: isolation_report(&self.pipeline),
        }
    }

    /// `GET /metrics`.
    pub fn metrics_text(&self) -> String {
        let mut states: BTreeMap<TaskState, u64> = BTreeMap::new();
        for h in self.handles() {
            *states.entry(h.state()).or_default() += 1;
        }
        let states: Vec<(TaskState, u64)> = states.into_iter().collect();
        self.metrics.render(&states)
    }

    /// Applies `change` to the task's record, writes it to the store, and
    /// only then lets it take effect (in memory, and for state watchers).
    fn update(&self, handle: &TaskHandle, change: impl FnOnce(&mut TaskRecord)) {
        let mut current = handle.record.lock().expect("task record poisoned");
        let mut next = current.clone();
        change(&mut next);
        next.updated_at_ms = now_ms();
        if next.state != current.state {
            tracing::info!(task = %next.id, from = %current.state, to = %next.state, "state");
        }
        if let Err(e) = self.store.put(&next) {
            // Supervising the VM matters more than the record of it: carry
            // on, loudly.
            tracing::error!(task = %next.id, error = %crate::error_chain(&e), "cannot write the task to the store");
        }
        let state = next.state;
        *current = next;
        drop(current);
        handle.state.send_replace(state);
    }

    fn exit_record_path(&self, id: &str) -> PathBuf {
        self.exits_dir.join(format!("{id}.json"))
    }
}

fn isolation_report(pipeline: &Pipeline) -> record::IsolationReport {
    pipeline
        .detached
        .as_ref()
        .map(|d| d.isolation.report())
        .unwrap_or_default()
}

fn vm_pid(record: &TaskRecord) -> Option<u32> {
    record
        .vm
        .as_ref()
        .filter(|_| record.state.has_vm())
        .map(|vm| vm.qemu.pid)
}

fn create_private_dir(path: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| AgentError::Dir {
            path: path.to_path_buf(),
            source,
        })
}
