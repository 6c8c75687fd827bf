//! `RecoverTask`: a fresh plugin finds a VM again from the handle Nomad
//! kept, after Nomad restarted (and so killed the plugin that started it).
//! The VM is re-identified by its shim's and qemu's pid plus start time, so
//! a reused pid is never taken for it; if it ended meanwhile, its shim's
//! exit record says how.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use nomad_proto::driver::TaskHandle;
use tonic::Status;

use super::Plugin;
use super::state::{self, DriverState};
use super::tasks::{self, NomadTask, TaskEnd};
use crate::launcher::{self, Phase};
use crate::qemu::process::VmProcess;
use crate::qemu::shim::{AdoptError, ExitRecord, ShimmedQemu};
use crate::supervisor::Vm;

/// The shortest boot watch an adopted, still booting VM gets.
const MIN_BOOT_LEFT: Duration = Duration::from_secs(5);

pub async fn recover(plugin: &Plugin, handle: TaskHandle) -> Result<(), Status> {
    let host = plugin.host()?;
    let config = handle
        .config
        .clone()
        .ok_or_else(|| Status::invalid_argument("The task handle has no task config"))?;
    if plugin.tasks.contains(&config.id) {
        return Ok(());
    }
    let state_dir = &host.runner.state_dir;
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
    let key = state.key();
    // The lease named the dead plugin: renew it, so gc leaves the image of
    // a VM that still runs from it.
    if let Err(e) = host
        .runner
        .cache
        .lease(&state.task.checksum, &key, std::process::id())
    {
        tracing::warn!(task = %task.subject.task_id, error = %crate::error_chain(&e), "cannot renew the image lease");
    }
    let exit_path = state::exit_record(state_dir, &key);
    match ShimmedQemu::adopt(state.qemu, state.shim, exit_path.clone()) {
        Ok(shimmed) => match Vm::adopt(VmProcess::Shimmed(shimmed), task.dir.clone()).await {
            Ok(vm) => {
                tracing::info!(task = %task.subject.task_id, pid = state.qemu.pid, shim = state.shim.pid, "VM recovered");
                plugin.events.emit(
                    &task.subject,
                    "recovered",
                    format!("VM found again (pid {}) by a new plugin", state.qemu.pid),
                    &[("pid", state.qemu.pid.to_string())],
                );
                supervise(plugin, task.clone(), vm);
            }
            Err(e) => {
                // Alive but deaf: it can be neither watched nor stopped
                // gracefully, so it goes.
                let reason = crate::error_chain(&e);
                tracing::error!(task = %task.subject.task_id, pid = state.qemu.pid, error = %reason, "cannot reconnect to the VM; killing it");
                if let Ok(mut p) = ShimmedQemu::adopt(state.qemu, state.shim, exit_path) {
                    p.signal_group(Signal::SIGKILL);
                    let _ = tokio::time::timeout(Duration::from_secs(10), p.wait()).await;
                }
                task.finish(
                    &host,
                    &plugin.events,
                    tasks::end_of(Err(format!("cannot reconnect to the VM: {reason}"))),
                );
            }
        },
        Err(AdoptError::ShimGone(_)) => {
            let end = ended_meanwhile(&state, &exit_path);
            task.finish(&host, &plugin.events, end);
        }
        Err(e @ AdoptError::Watch { .. }) => {
            return Err(Status::internal(crate::error_chain(&e)));
        }
    }
    plugin.tasks.insert(task);
    Ok(())
}

/// Carries on watching an adopted VM until it ends or is stopped.
fn supervise(plugin: &Plugin, task: Arc<NomadTask>, vm: Vm) {
    let Ok(host) = plugin.host() else { return };
    let events = plugin.events.clone();
    tokio::spawn(async move {
        let state = task.state();
        let settings = tasks::host_settings(&host, &task.config, &state, None);
        let timeout = Duration::from_secs(state.task.ready_timeout_s.into());
        let spent = SystemTime::now()
            .duration_since(task.started_at())
            .unwrap_or_default();
        let phase = Phase::Booting {
            left: timeout.saturating_sub(spent).max(MIN_BOOT_LEFT),
        };
        let ending = launcher::resume(
            &settings,
            vm,
            &state.task,
            state.accelerator,
            phase,
            &task.stop,
            |event| tasks::on_launch_event(&host, &events, &task, event),
        )
        .await;
        task.finish(&host, &events, tasks::end_of(Ok(ending)));
    });
}

/// The VM ended while no plugin watched: its shim's record says how.
fn ended_meanwhile(state: &DriverState, exit_path: &std::path::Path) -> TaskEnd {
    match ExitRecord::read(exit_path) {
        Some(rec) if rec.qemu_pid == state.qemu.pid => TaskEnd {
            result: tasks::exit_result_of_status(rec.status()),
            err: String::new(),
            at: UNIX_EPOCH + Duration::from_millis(rec.ended_at_ms),
        },
        _ => {
            if state.qemu.is_alive() {
                // Should never be: pdeathsig ties qemu to its shim.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(state.qemu.pid as i32),
                    Signal::SIGKILL,
                );
            }
            tasks::end_of(Err(
                "the VM's shim was killed while no plugin ran, and qemu with it".into(),
            ))
        }
    }
}
