//! What a restarted agent does with a task it reads back from the store:
//! re-identify its VM by the shim's and qemu's pid plus start time (a
//! reused pid is never taken for the VM), reconnect QMP and carry on, or,
//! if the VM ended while no agent watched, report how from the shim's
//! exit record.

use std::time::Duration;

use nix::sys::signal::Signal;

use super::record::TaskState;
use super::worker::Next;
use super::{Agent, TaskHandle, now_ms};
use crate::launcher::Phase;
use crate::qemu::process::VmProcess;
use crate::qemu::shim::{AdoptError, ExitRecord, ShimmedQemu};
use crate::supervisor::{Ending, TaskDir, Vm, describe_status};

/// The shortest boot watch an adopted, still booting VM gets.
const MIN_BOOT_LEFT: Duration = Duration::from_secs(5);

pub(super) async fn recover(agent: &Agent, handle: &TaskHandle) -> Next {
    let record = handle.record();
    let state = record.state;
    if state.is_terminal() {
        return Next::Done;
    }
    if state == TaskState::Stopping {
        // The stop request died with the old agent: it stands.
        handle
            .stop
            .request(record.stop_requested.map(Duration::from_secs));
    }
    let Some(vm) = record.vm.clone().filter(|_| state.has_vm()) else {
        // Nothing was launched, or the agent died between starting a shim
        // and recording it: such a shim is nobody's, so it goes.
        kill_stray_shims(&agent.exit_record_path(&handle.id).display().to_string()).await;
        tracing::info!(task = %handle.id, %state, "resuming a task that had no VM yet");
        if state == TaskState::Pending
            && let Some(last) = record.restarts.last()
        {
            // Waiting out a restart's delay: wait for what is left of it.
            let due = last.at_ms.saturating_add(last.delay_ms);
            return Next::Wait(Duration::from_millis(due.saturating_sub(now_ms())));
        }
        return if record.task.is_some() {
            Next::Launch
        } else {
            Next::Admit
        };
    };
    if let Some(image) = &record.image {
        // The lease named the dead agent; gc must not take the image from
        // a VM that may be restarted from it.
        let checksum = record.effective_task().checksum.clone();
        if image.path.exists()
            && let Err(e) = agent
                .runner
                .cache
                .lease(&checksum, &handle.id, std::process::id())
        {
            tracing::warn!(task = %handle.id, error = %crate::error_chain(&e), "cannot renew the image lease");
        }
    }
    let exit_path = agent.exit_record_path(&handle.id);
    let dir = TaskDir {
        root: record.dir.clone(),
    };
    match ShimmedQemu::adopt(vm.qemu, vm.shim, exit_path.clone()) {
        Ok(shimmed) => {
            let process = VmProcess::Shimmed(shimmed);
            match Vm::adopt(process, dir).await {
                Ok(adopted) => {
                    let phase = match state {
                        TaskState::Stopping => Phase::Stopping,
                        TaskState::Ready => Phase::Ready,
                        _ => {
                            let timeout =
                                Duration::from_secs(record.effective_task().ready_timeout_s.into());
                            let spent =
                                Duration::from_millis(now_ms().saturating_sub(vm.started_at_ms));
                            Phase::Booting {
                                left: timeout.saturating_sub(spent).max(MIN_BOOT_LEFT),
                            }
                        }
                    };
                    tracing::info!(task = %handle.id, pid = vm.qemu.pid, shim = vm.shim.pid, ?phase, "VM adopted");
                    let accelerator = record
                        .accelerator
                        .as_ref()
                        .map_or(record.effective_task().accelerator, |a| a.used);
                    Next::Adopted {
                        vm: Box::new(adopted),
                        phase,
                        accelerator,
                    }
                }
                Err(e) => {
                    // Alive but deaf: it cannot be stopped gracefully or
                    // watched, so it is killed and counts as a failure.
                    let reason = crate::error_chain(&e);
                    tracing::error!(task = %handle.id, pid = vm.qemu.pid, error = %reason, "cannot reconnect to the VM; killing it");
                    let mut process = ShimmedQemu::adopt(vm.qemu, vm.shim, exit_path)
                        .map(VmProcess::Shimmed)
                        .ok();
                    if let Some(p) = &mut process {
                        p.signal_group(Signal::SIGKILL);
                        let _ = tokio::time::timeout(Duration::from_secs(10), p.wait()).await;
                    }
                    Next::Ended {
                        outcome: Err(format!(
                            "cannot reconnect to the VM after a restart of the agent: {reason}"
                        )),
                        while_agent_down: false,
                    }
                }
            }
        }
        Err(AdoptError::ShimGone(_)) => ended_while_down(handle, &vm.qemu, &exit_path, state),
        Err(e @ AdoptError::Watch { .. }) => Next::Ended {
            outcome: Err(crate::error_chain(&e)),
            while_agent_down: false,
        },
    }
}

/// The VM ended while no agent watched: its shim's record says how.
fn ended_while_down(
    handle: &TaskHandle,
    qemu: &crate::qemu::process::ProcessIdentity,
    exit_path: &std::path::Path,
    state: TaskState,
) -> Next {
    let outcome = match ExitRecord::read(exit_path) {
        Some(rec) if rec.qemu_pid == qemu.pid => {
            let status = rec.status();
            if state == TaskState::Stopping && status.success() {
                // The stop had pressed the power button, and it was heard.
                Ok(Ending::Stopped(crate::supervisor::StopHow::Powerdown))
            } else if status.success() {
                // qemu exits 0 on a guest power-off, and nobody sent
                // `quit`: the guest shut down.
                Ok(Ending::GuestShutdown)
            } else {
                Ok(Ending::QemuExited {
                    status: describe_status(Ok(status)),
                    log_tail: String::new(),
                })
            }
        }
        _ => {
            if qemu.is_alive() {
                // Should never be: pdeathsig ties qemu to its shim.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(qemu.pid as i32),
                    Signal::SIGKILL,
                );
            }
            Err("the VM's shim was killed, and qemu with it".to_string())
        }
    };
    tracing::info!(task = %handle.id, pid = qemu.pid, "the VM ended while the agent was down");
    Next::Ended {
        outcome,
        while_agent_down: true,
    }
}

/// Kills shims started for a task that never recorded them. They are
/// found by the exit record path on their command line (unique per task).
async fn kill_stray_shims(exit_record: &str) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
        let is_shim = args.get(1) == Some(&&b"shim"[..])
            && args
                .windows(2)
                .any(|w| w[0] == b"--exit-record" && w[1] == exit_record.as_bytes());
        if is_shim {
            tracing::warn!(pid, "killing a shim no agent recorded");
            let identity = crate::qemu::process::ProcessIdentity::of(pid as u32);
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            // Its qemu goes with it (pdeathsig); give it a moment, so that
            // the relaunch does not find its ports still taken.
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            while identity.is_some_and(|i| i.is_alive()) && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
