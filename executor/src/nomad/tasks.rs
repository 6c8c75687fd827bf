//! The plugin's tasks: each is a VM under its shim, started for Nomad or
//! recovered from the handle Nomad kept. A task's end is published once
//! (`WaitTask` may ask many times); what it left behind is cleaned up when
//! it ends, and its directory when Nomad destroys it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nomad_proto::driver::{ExitResult, TaskConfig};
use tokio::sync::watch;
use tonic::Status;

use super::events::{Events, Subject};
use super::plugin_config::Configured;
use super::state::{self, DriverState};
use crate::launch::{Event, Holdings, LaunchError, Placement, Prepared};
use crate::qemu::forward::Forward;
use crate::vm::{Ending, StopHow, StopSignal, TaskDir};

/// How long a forced destroy waits for the VM to go.
const DESTROY_WAIT: Duration = Duration::from_secs(30);

/// How a task ended, as `WaitTask` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEnd {
    pub result: ExitResult,
    /// Set when the end was a failure of ours rather than the guest's.
    pub err: String,
    pub at: SystemTime,
}

/// One task of this plugin.
pub struct NomadTask {
    pub subject: Subject,
    pub dir: TaskDir,
    pub stop: StopSignal,
    state: Mutex<DriverState>,
    end: watch::Sender<Option<TaskEnd>>,
}

impl NomadTask {
    pub fn new(config: TaskConfig, state: DriverState) -> NomadTask {
        NomadTask {
            subject: Subject {
                task_id: config.id.clone(),
                alloc_id: config.alloc_id.clone(),
                task_name: config.name.clone(),
            },
            dir: TaskDir {
                root: state.task_dir.clone(),
            },
            stop: StopSignal::default(),
            state: Mutex::new(state),
            end: watch::channel(None).0,
        }
    }

    /// When qemu started, from the driver state: the same for a recovered
    /// task as for the plugin that started it.
    pub fn started_at(&self) -> SystemTime {
        std::time::UNIX_EPOCH + Duration::from_millis(self.state().started_at_ms)
    }

    pub fn state(&self) -> DriverState {
        self.state.lock().expect("task state poisoned").clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut DriverState)) -> DriverState {
        let mut guard = self.state.lock().expect("task state poisoned");
        f(&mut guard);
        guard.clone()
    }

    pub fn end(&self) -> Option<TaskEnd> {
        self.end.borrow().clone()
    }

    /// Waits for the end (at once if it came already).
    pub async fn ended(&self) -> TaskEnd {
        let mut rx = self.end.subscribe();
        loop {
            if let Some(end) = rx.borrow_and_update().clone() {
                return end;
            }
            if rx.changed().await.is_err() {
                // The sender lives in this task: never reached.
                return TaskEnd {
                    result: ExitResult::default(),
                    err: "the task was dropped".into(),
                    at: SystemTime::now(),
                };
            }
        }
    }

    /// Publishes the end once, and cleans up what the VM left (not its
    /// directory, which holds its logs until Nomad destroys the task).
    pub fn finish(&self, configured: &Configured, events: &Events, end: TaskEnd) {
        if self.end.borrow().is_some() {
            return;
        }
        let message = if end.err.is_empty() {
            format!(
                "VM ended: exit code {}, signal {}",
                end.result.exit_code, end.result.signal
            )
        } else {
            format!("VM ended: {}", end.err)
        };
        events.emit(
            &self.subject,
            "exited",
            message,
            &[
                ("exit_code", end.result.exit_code.to_string()),
                ("signal", end.result.signal.to_string()),
            ],
        );
        self.release(configured);
        self.end.send_replace(Some(end));
    }

    /// Gives back what the VM held: its cgroups, overlay and socket, and
    /// its lease on the image.
    pub fn release(&self, configured: &Configured) {
        let state = self.state();
        configured.pipeline.release(&Holdings {
            dir: self.dir.clone(),
            checksums: vec![state.task.checksum],
            cgroups: state.cgroups,
            // Kept until Nomad destroys the task (`remove_files`).
            exit_record: None,
        });
    }

    /// Forgets the task: its directory and what the plugin kept for it.
    pub fn remove_files(&self, configured: &Configured) {
        let key = self.state().key();
        state::forget(&configured.pipeline.state_dir, &key);
        if let Err(e) = std::fs::remove_dir_all(&self.dir.root)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(task = %self.subject.task_id, error = %e, "cannot remove the task directory");
        }
    }

    /// Asks for a stop and waits for the end.
    pub async fn stop_and_wait(&self, timeout: Duration) -> TaskEnd {
        self.stop.request(Some(timeout));
        self.ended().await
    }

    /// A forced end: kills at once, waits a bounded time.
    pub async fn kill(&self) -> Result<(), Status> {
        self.stop.request(Some(Duration::ZERO));
        tokio::time::timeout(DESTROY_WAIT, self.ended())
            .await
            .map(|_| ())
            .map_err(|_| Status::internal("the VM did not end after SIGKILL"))
    }
}

/// The exit result Nomad gets for a VM's end. Codes follow `run`'s: 0 for
/// a guest power-off or a graceful stop, 6 with signal 9 when it was killed
/// at the stop timeout, 5 when qemu failed, 7 when it never got ready.
pub fn exit_result(ending: &Ending) -> (ExitResult, String) {
    let code = i32::from(ending.exit());
    let signal = match ending {
        Ending::Stopped(StopHow::Killed) => libc::SIGKILL,
        _ => 0,
    };
    let err = match ending {
        Ending::GuestShutdown | Ending::Stopped(_) => String::new(),
        other => other.to_string(),
    };
    (
        ExitResult {
            exit_code: code,
            signal,
            oom_killed: false,
        },
        err,
    )
}

/// The exit result of a qemu that ended while no plugin watched, from the
/// status its shim recorded.
pub fn exit_result_of_status(status: std::process::ExitStatus) -> ExitResult {
    use std::os::unix::process::ExitStatusExt as _;
    ExitResult {
        exit_code: status.code().unwrap_or(0),
        signal: status.signal().unwrap_or(0),
        oom_killed: false,
    }
}

/// Where a plugin task's VM lives: under a shim that outlives the plugin,
/// copying the console and qemu's log to Nomad's FIFOs.
pub fn placement(configured: &Configured, config: &TaskConfig, dir: &TaskDir) -> Placement {
    let mut forwards = Vec::new();
    for (from, to) in [
        (dir.serial_log(), &config.stdout_path),
        (dir.qemu_log(), &config.stderr_path),
    ] {
        if !to.is_empty() {
            forwards.push(Forward {
                from,
                to: to.into(),
            });
        }
    }
    Placement {
        dir: dir.clone(),
        exit_record: Some(state::exit_record(
            &configured.pipeline.state_dir,
            &dir.key(),
        )),
        forwards,
        // The task's own directory, where its artifacts land; nothing of
        // other allocations.
        file_dir: Some(PathBuf::from(&config.alloc_dir).join(&config.name)),
    }
}

/// Records and reports what the pipeline says while the VM runs.
pub fn on_event(configured: &Configured, events: &Events, task: &NomadTask, event: Event<'_>) {
    match event {
        Event::Started {
            accelerator,
            identity,
            shim,
            ..
        } => {
            let state = task.update(|s| {
                s.qemu = identity;
                s.shim = shim.unwrap_or(identity);
                s.accelerator = accelerator;
                s.started_at_ms = crate::qemu::shim::now_ms();
            });
            if let Err(e) = state::save(&configured.pipeline.state_dir, &state) {
                tracing::warn!(task = %task.subject.task_id, error = %e, "cannot save the driver state");
            }
            events.emit(
                &task.subject,
                "started",
                format!("qemu started (pid {}) under {accelerator}", identity.pid),
                &[
                    ("pid", identity.pid.to_string()),
                    ("accelerator", accelerator.to_string()),
                ],
            );
        }
        Event::PortReady(port) => {
            tracing::info!(task = %task.subject.task_id, host = port.host, guest = port.guest, "port ready");
        }
        Event::Ready { after } => {
            // With nothing to check, "ready" would only mean qemu started:
            // Nomad's own service checks speak for the guest then.
            let task_def = task.state().task;
            if crate::readiness::guest_is_checked(&task_def.ports, task_def.ready_serial.as_deref())
            {
                events.emit(
                    &task.subject,
                    "ready",
                    format!("The guest is ready after {:.1}s", after.as_secs_f64()),
                    &[("after_ms", after.as_millis().to_string())],
                );
            }
        }
        Event::KvmFallback { reason } => events.emit(
            &task.subject,
            "kvm-fallback",
            format!("KVM failed this guest ({reason}); relaunching it under tcg"),
            &[("reason", reason.to_string())],
        ),
        Event::Stopping => {
            tracing::info!(task = %task.subject.task_id, "stopping the VM");
        }
        // Before the VM: StartTask reports these.
        Event::Facts(_)
        | Event::Policies(_)
        | Event::Accelerator { .. }
        | Event::Image(_)
        | Event::Confined { .. } => {}
    }
}

/// The end of a launch or a resumed supervision, for `finish`.
pub fn end_of(outcome: Result<Ending, LaunchError>) -> TaskEnd {
    match outcome {
        Ok(ending) => {
            let (result, err) = exit_result(&ending);
            TaskEnd {
                result,
                err,
                at: SystemTime::now(),
            }
        }
        Err(e) => TaskEnd {
            result: ExitResult {
                exit_code: i32::from(e.exit()),
                signal: 0,
                oom_killed: false,
            },
            err: crate::error_chain(&e),
            at: SystemTime::now(),
        },
    }
}

/// The state of a task about to launch: no qemu yet.
pub fn initial_state(task_id: &str, dir: &TaskDir, prepared: &Prepared) -> DriverState {
    let nobody = crate::qemu::process::ProcessIdentity {
        pid: 0,
        start_time: 0,
    };
    DriverState {
        task_id: task_id.to_string(),
        task_dir: dir.root.clone(),
        task: prepared.admitted.task.clone(),
        accelerator: prepared.plan.accelerator,
        qemu: nobody,
        shim: nobody,
        started_at_ms: 0,
        cgroups: prepared.cgroups.clone(),
    }
}

/// Every task this plugin knows, by Nomad's task id.
#[derive(Default)]
pub struct Tasks {
    map: Mutex<std::collections::HashMap<String, Arc<NomadTask>>>,
}

impl Tasks {
    pub fn get(&self, id: &str) -> Result<Arc<NomadTask>, Status> {
        self.map
            .lock()
            .expect("tasks poisoned")
            .get(id)
            .cloned()
            .ok_or_else(super::status::not_found)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.map.lock().expect("tasks poisoned").contains_key(id)
    }

    pub fn insert(&self, task: Arc<NomadTask>) {
        self.map
            .lock()
            .expect("tasks poisoned")
            .insert(task.subject.task_id.clone(), task);
    }

    pub fn remove(&self, id: &str) -> Option<Arc<NomadTask>> {
        self.map.lock().expect("tasks poisoned").remove(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_results_follow_runs_exit_codes() {
        let (r, err) = exit_result(&Ending::Stopped(StopHow::Powerdown));
        assert_eq!((r.exit_code, r.signal, err.as_str()), (0, 0, ""));
        let (r, err) = exit_result(&Ending::GuestShutdown);
        assert_eq!((r.exit_code, r.signal, err.as_str()), (0, 0, ""));
        let (r, _) = exit_result(&Ending::Stopped(StopHow::Killed));
        assert_eq!((r.exit_code, r.signal), (6, 9));
        let (r, err) = exit_result(&Ending::QemuExited {
            status: "exit status 1".into(),
            log_tail: "boom".into(),
        });
        assert_eq!(r.exit_code, 5);
        assert!(err.contains("boom"), "{err}");
    }

    #[test]
    fn a_recorded_status_keeps_code_and_signal() {
        use std::os::unix::process::ExitStatusExt as _;
        let killed = exit_result_of_status(std::process::ExitStatus::from_raw(9));
        assert_eq!((killed.exit_code, killed.signal), (0, 9));
        let failed = exit_result_of_status(std::process::ExitStatus::from_raw(1 << 8));
        assert_eq!((failed.exit_code, failed.signal), (1, 0));
    }
}
