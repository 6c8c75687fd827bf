//! What a restarted agent does with a task it reads back from the store:
//! takes its VM back through the launch pipeline (by the shim's and qemu's
//! pid plus start time, so a reused pid is never taken for the VM) and
//! carries on, or, if the VM ended while no agent watched, reports how
//! from the shim's exit record.

use std::time::Duration;

use nix::sys::signal::Signal;

use super::record::TaskState;
use super::worker::Next;
use super::{Agent, TaskHandle, now_ms};
use crate::launch::{Adoption, Found, LaunchError, Phase};
use crate::vm::{Ending, StopHow, TaskDir, describe_status};

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
    let task = record.effective_task();
    let found = Found {
        qemu: vm.qemu,
        shim: vm.shim,
        exit_record: agent.exit_record_path(&handle.id),
        dir: TaskDir {
            root: record.dir.clone(),
        },
    };
    match agent.pipeline.adopt(&found, &task.checksum).await {
        Adoption::Running(adopted) => {
            let phase = match state {
                TaskState::Stopping => Phase::Stopping,
                TaskState::Ready => Phase::Ready,
                _ => Phase::booting(task.ready_timeout_s, vm.started_at_ms, now_ms()),
            };
            tracing::info!(task = %handle.id, pid = vm.qemu.pid, shim = vm.shim.pid, ?phase, "VM adopted");
            let accelerator = record
                .accelerator
                .as_ref()
                .map_or(task.accelerator, |a| a.used);
            Next::Adopted {
                vm: Box::new(adopted),
                phase,
                accelerator,
            }
        }
        Adoption::EndedMeanwhile { status, .. } => {
            tracing::info!(task = %handle.id, pid = vm.qemu.pid, "the VM ended while the agent was down");
            Next::Ended {
                outcome: Ok(ending_while_down(status, state)),
                while_agent_down: true,
            }
        }
        Adoption::Lost(e) => Next::Ended {
            while_agent_down: matches!(e, LaunchError::ShimKilled),
            outcome: Err(e),
        },
    }
}

/// How a VM that ended while no agent watched ended, from the status its
/// shim recorded.
fn ending_while_down(status: std::process::ExitStatus, state: TaskState) -> Ending {
    if state == TaskState::Stopping && status.success() {
        // The stop had pressed the power button, and it was heard.
        Ending::Stopped(StopHow::Powerdown)
    } else if status.success() {
        // qemu exits 0 on a guest power-off, and nobody sent `quit`: the
        // guest shut down.
        Ending::GuestShutdown
    } else {
        Ending::QemuExited {
            status: describe_status(Ok(status)),
            log_tail: String::new(),
        }
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
