//! `RecoverTask`: a fresh plugin finds a VM again from the handle Nomad
//! kept, after Nomad restarted (and so killed the plugin that started it).
//! The launch pipeline takes it back by its shim's and qemu's pid plus
//! start time, so a reused pid is never taken for it; if it ended
//! meanwhile, its shim's exit record says how.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use nomad_proto::driver::TaskHandle;
use tonic::Status;

use super::Plugin;
use super::state::{self, DriverState};
use super::tasks::{self, NomadTask, TaskEnd};
use crate::launch::{Adoption, Found, LaunchError, Phase};
use crate::vm::Vm;

pub async fn recover(plugin: &Plugin, handle: TaskHandle) -> Result<(), Status> {
    let configured = plugin.configured()?;
    let config = handle
        .config
        .clone()
        .ok_or_else(|| Status::invalid_argument("The task handle has no task config"))?;
    if plugin.tasks.contains(&config.id) {
        return Ok(());
    }
    let state_dir = &configured.pipeline.state_dir;
    let from_handle = DriverState::decode(handle.version, &handle.driver_state, state_dir)
        .map_err(|e| Status::invalid_argument(crate::error_chain(&e)))?;
    if from_handle.task_id != config.id {
        return Err(Status::invalid_argument(format!(
            "The task handle's driver state is task {}'s, not {}'s",
            from_handle.task_id, config.id
        )));
    }
    let state = state::latest(state_dir, from_handle);
    let task = Arc::new(NomadTask::new(config, state.clone()));
    let found = Found {
        qemu: state.qemu,
        shim: state.shim,
        exit_record: state::exit_record(state_dir, &state.key()),
        dir: task.dir.clone(),
    };
    match configured
        .pipeline
        .adopt(&found, &state.task.checksum)
        .await
    {
        Adoption::Running(vm) => {
            tracing::info!(task = %task.subject.task_id, pid = state.qemu.pid, shim = state.shim.pid, "VM recovered");
            plugin.events.emit(
                &task.subject,
                "recovered",
                format!("VM found again (pid {}) by a new plugin", state.qemu.pid),
                &[("pid", state.qemu.pid.to_string())],
            );
            supervise(plugin, task.clone(), vm);
        }
        Adoption::EndedMeanwhile {
            status,
            ended_at_ms,
        } => {
            let end = TaskEnd {
                result: tasks::exit_result_of_status(status),
                err: String::new(),
                at: UNIX_EPOCH + Duration::from_millis(ended_at_ms),
            };
            task.finish(&configured, &plugin.events, end);
        }
        Adoption::Lost(e @ LaunchError::Watch(_)) => {
            return Err(Status::internal(crate::error_chain(&e)));
        }
        Adoption::Lost(e) => task.finish(&configured, &plugin.events, tasks::end_of(Err(e))),
    }
    plugin.tasks.insert(task);
    Ok(())
}

/// Carries on watching an adopted VM until it ends or is stopped.
fn supervise(plugin: &Plugin, task: Arc<NomadTask>, vm: Vm) {
    let Ok(configured) = plugin.configured() else {
        return;
    };
    let events = plugin.events.clone();
    tokio::spawn(async move {
        let state = task.state();
        let phase = Phase::booting(
            state.task.ready_timeout_s,
            state.started_at_ms,
            crate::qemu::shim::now_ms(),
        );
        let ending = configured
            .pipeline
            .resume(
                vm,
                &state.task,
                state.accelerator,
                phase,
                &task.stop,
                &mut |event| tasks::on_event(&configured, &events, &task, event),
            )
            .await;
        task.finish(&configured, &events, tasks::end_of(Ok(ending)));
    });
}
