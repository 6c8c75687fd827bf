//! One task's life in its own tokio task: the policy chain, the image, the
//! VM under its shim, its restarts, its end. Nothing here waits on another
//! task: a slow download, a stuck policy or a crashed guest stays within
//! its own worker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use policy_sdk::Accelerator;

use super::record::{AcceleratorChoice, ExitRecord, ImageRecord, TaskState, VmRecord};
use super::restart::{self, Decision};
use super::{Agent, TaskHandle, isolation, now_ms};
use crate::launcher::{self, HostSettings, LaunchError, LaunchEvent, Phase, Prepared};
use crate::policy::ChainOutcome;
use crate::supervisor::{Ending, ShimSettings, TaskDir, Vm};

/// The next step of a task's life.
pub(super) enum Next {
    /// Run the policy chain.
    Admit,
    /// Fetch the image and start the VM from the recorded task.
    Launch,
    /// Re-identify the VM after an agent restart.
    Recover,
    /// Carry on supervising an adopted VM.
    Adopted {
        vm: Box<Vm>,
        phase: Phase,
        accelerator: Accelerator,
    },
    /// The VM (or its launch) ended: finish, or restart per the policy.
    Ended {
        outcome: Result<Ending, String>,
        while_agent_down: bool,
    },
    /// Wait out a restart's delay.
    Wait(Duration),
    /// Finished: exited or failed.
    Done,
}

#[tracing::instrument(name = "task", skip_all, fields(task = %handle.id))]
pub(super) async fn drive(agent: Arc<Agent>, handle: Arc<TaskHandle>, mut next: Next) {
    loop {
        next = match next {
            Next::Admit => admit(&agent, &handle).await,
            Next::Launch => launch(&agent, &handle).await,
            Next::Recover => {
                let next = super::recover::recover(&agent, &handle).await;
                handle
                    .recovering
                    .store(false, std::sync::atomic::Ordering::Release);
                next
            }
            Next::Adopted {
                vm,
                phase,
                accelerator,
            } => {
                let record = handle.record();
                // Nothing is launched from here: qemu's binary and version
                // do not matter, the confinement is the agent's.
                let host = host_settings(&agent, &handle, None, Vec::new());
                let task = record.effective_task().clone();
                let ending = launcher::resume(
                    &host,
                    *vm,
                    &task,
                    accelerator,
                    phase,
                    &handle.stop,
                    |event| on_launch_event(&agent, &handle, event),
                )
                .await;
                Next::Ended {
                    outcome: Ok(ending),
                    while_agent_down: false,
                }
            }
            Next::Ended {
                outcome,
                while_agent_down,
            } => ended(&agent, &handle, outcome, while_agent_down),
            Next::Wait(delay) => {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => Next::Launch,
                    _ = handle.stop.requested() => {
                        finish(&agent, &handle, TaskState::Exited, "stopped while waiting to restart".into(), false)
                    }
                }
            }
            Next::Done => return,
        };
    }
}

async fn admit(agent: &Agent, handle: &TaskHandle) -> Next {
    agent.update(handle, |r| r.state = TaskState::Evaluating);
    let submitted = handle.record().submitted;
    let facts = agent.runner.probe.host_facts().await;
    let started = Instant::now();
    let outcome = agent.runner.chain.evaluate(submitted, &facts).await;
    let took = started.elapsed();
    let steps: Vec<serde_json::Value> = outcome
        .steps()
        .iter()
        .filter_map(|s| serde_json::to_value(s).ok())
        .collect();
    match outcome {
        ChainOutcome::Accepted { task, .. } => {
            agent.metrics.evaluated(took, false, false);
            agent.update(handle, |r| {
                r.policies = steps;
                r.task = Some(task);
            });
            if handle.stop.is_requested() {
                return finish(
                    agent,
                    handle,
                    TaskState::Exited,
                    "stopped before launch".into(),
                    false,
                );
            }
            Next::Launch
        }
        ChainOutcome::Rejected { fault, .. } => {
            agent.metrics.evaluated(took, true, fault);
            let reason = outcome.to_string();
            agent.update(handle, |r| r.policies = steps);
            finish(agent, handle, TaskState::Failed, reason, false)
        }
    }
}

async fn launch(agent: &Agent, handle: &TaskHandle) -> Next {
    if handle.stop.is_requested() {
        return finish(
            agent,
            handle,
            TaskState::Exited,
            "stopped before launch".into(),
            false,
        );
    }
    let record = handle.record();
    let task = record.effective_task().clone();
    let fail = |reason: String| finish(agent, handle, TaskState::Failed, reason, false);
    let runner = &agent.runner;
    let extra_args = match runner.config.args.check(&task.args) {
        Ok(a) => a,
        Err(e) => return fail(format!("Task refused: {}", crate::error_chain(&e))),
    };
    let facts = runner.probe.host_facts().await;
    let (accelerator, reason) = match launcher::choose_accelerator(&task, &facts) {
        Ok(c) => c,
        Err(e) => return fail(crate::error_chain(&e)),
    };
    let qemu = match runner.probe.qemu().await {
        Ok(q) => q,
        Err(e) => return fail(crate::error_chain(&e)),
    };
    agent.update(handle, |r| {
        r.state = TaskState::Fetching;
        r.accelerator = Some(AcceleratorChoice {
            requested: task.accelerator,
            used: accelerator,
            reason,
        });
    });

    let fetch = runner.fetcher.fetch_leased(
        &runner.cache,
        &task.image_source,
        &task.checksum,
        &handle.id,
        std::process::id(),
    );
    // A lease left on drop stays on disk; it is released when the task
    // ends.
    let fetched = tokio::select! {
        r = fetch => r,
        _ = handle.stop.requested() => {
            return finish(agent, handle, TaskState::Exited, "stopped before launch".into(), false);
        }
    };
    let fetched = match fetched {
        Ok((fetched, _lease)) => fetched,
        Err(e) => {
            return fail(format!(
                "Cannot fetch the image: {}",
                crate::error_chain(&e)
            ));
        }
    };
    agent.metrics.fetched(fetched.body_bytes, fetched.cache_hit);

    let dir = TaskDir {
        root: record.dir.clone(),
    };
    let mut cgroups = record.cgroups.clone();
    let mut report = agent.isolation.report();
    if cgroups.is_empty() {
        let made = agent
            .isolation
            .cgroups_for(&handle.id, task.memory_mb, task.cpus);
        cgroups = made.paths;
        if let Some(m) = made.report {
            report.insert("cgroup".into(), m);
        }
    } else if let Some(m) = record.isolation.get("cgroup") {
        report.insert("cgroup".into(), m.clone());
    }
    if let Err(e) = agent
        .isolation
        .hand_over(&dir.root, &[dir.serial_log(), dir.qemu_log()])
    {
        return fail(crate::error_chain(&e));
    }
    agent.update(handle, |r| {
        r.state = TaskState::Starting;
        r.image = Some(ImageRecord {
            path: fetched.path.clone(),
            size: fetched.size,
            cache_hit: fetched.cache_hit,
            body_bytes: fetched.body_bytes,
        });
        r.isolation = report;
        r.cgroups = cgroups.clone();
        r.vm = None;
    });

    let host = host_settings(agent, handle, Some(&qemu), cgroups);
    let prepared = Prepared {
        task: &task,
        accelerator,
        image: &fetched.path,
        extra_args: &extra_args,
        dir: &dir,
    };
    let outcome = launcher::launch(&host, prepared, &handle.stop, |event| {
        on_launch_event(agent, handle, event)
    })
    .await
    .map_err(|e: LaunchError| crate::error_chain(&e));
    Next::Ended {
        outcome,
        while_agent_down: false,
    }
}

/// The launcher's settings for this task's VM.
fn host_settings(
    agent: &Agent,
    handle: &TaskHandle,
    qemu: Option<&crate::fingerprint::QemuInfo>,
    cgroups: Vec<std::path::PathBuf>,
) -> HostSettings {
    HostSettings::shimmed(
        &agent.runner.config,
        &agent.state_dir,
        &agent.isolation,
        qemu,
        ShimSettings {
            exe: agent.exe.clone(),
            exit_record: agent.exit_record_path(&handle.id),
            cgroups,
            mount_namespace: agent.isolation.mount_namespace,
            // The agent keeps the logs in the task directory only.
            forwards: Vec::new(),
        },
    )
}

/// Records what the launcher reports, before the agent acts on it.
fn on_launch_event(agent: &Agent, handle: &TaskHandle, event: LaunchEvent<'_>) {
    match event {
        LaunchEvent::Started {
            accelerator,
            identity,
            shim,
            dir,
            ..
        } => {
            if let Err(e) = agent.isolation.hand_over_qmp_socket(dir) {
                tracing::warn!(task = %handle.id, error = %crate::error_chain(&e), "cannot hand the QMP socket to the VM's user");
            }
            agent.update(handle, |r| {
                r.state = TaskState::Running;
                r.vm = Some(VmRecord {
                    qemu: identity,
                    // Agent VMs always run under a shim.
                    shim: shim.unwrap_or(identity),
                    started_at_ms: now_ms(),
                    ready_at_ms: None,
                });
                if let Some(choice) = &mut r.accelerator {
                    choice.used = accelerator;
                }
            });
        }
        LaunchEvent::PortReady(port) => {
            tracing::info!(task = %handle.id, host = port.host, guest = port.guest, "port ready");
        }
        LaunchEvent::Ready { after } => {
            tracing::info!(task = %handle.id, secs = after.as_secs_f64(), "ready");
            agent.update(handle, |r| {
                r.state = TaskState::Ready;
                if let Some(vm) = &mut r.vm {
                    vm.ready_at_ms = Some(now_ms());
                }
            });
        }
        LaunchEvent::KvmFallback { reason } => {
            let reason = format!("kvm failed this guest ({reason}); relaunched under tcg");
            agent.update(handle, |r| {
                if let Some(choice) = &mut r.accelerator {
                    choice.used = Accelerator::Tcg;
                    choice.reason = Some(reason);
                }
            });
        }
        LaunchEvent::Stopping => agent.update(handle, |r| r.state = TaskState::Stopping),
    }
}

/// Decides what follows the end of a VM or of its launch.
fn ended(
    agent: &Agent,
    handle: &TaskHandle,
    outcome: Result<Ending, String>,
    while_agent_down: bool,
) -> Next {
    let down = if while_agent_down {
        " (while the agent was down)"
    } else {
        ""
    };
    let cause = match outcome {
        Ok(ending) if handle.stop.is_requested() || matches!(ending, Ending::Stopped(_)) => {
            return finish(
                agent,
                handle,
                TaskState::Exited,
                format!("{ending}{down}"),
                while_agent_down,
            );
        }
        Ok(Ending::GuestShutdown) => {
            return finish(
                agent,
                handle,
                TaskState::Exited,
                format!("the guest shut down{down}"),
                while_agent_down,
            );
        }
        Ok(ending @ Ending::KvmUnusable { .. }) => {
            return finish(
                agent,
                handle,
                TaskState::Failed,
                ending.to_string(),
                while_agent_down,
            );
        }
        Ok(ending) => format!("{ending}{down}"),
        Err(launch_error) => format!("launch failed: {launch_error}{down}"),
    };
    let record = handle.record();
    let policy = &record.effective_task().restart;
    let history: Vec<u64> = record.restarts.iter().map(|r| r.at_ms).collect();
    match restart::decide(policy, &history, now_ms()) {
        Decision::Restart { after } => {
            tracing::warn!(task = %handle.id, cause = %cause, delay_s = after.as_secs(), "VM ended on its own; restarting");
            agent.metrics.restarted();
            agent.update(handle, |r| {
                r.state = TaskState::Pending;
                r.restarts.push(super::record::RestartRecord {
                    at_ms: now_ms(),
                    cause,
                    delay_ms: u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
                });
            });
            Next::Wait(after)
        }
        Decision::Fail { reason } => finish(
            agent,
            handle,
            TaskState::Failed,
            format!("{reason}; last end: {cause}"),
            while_agent_down,
        ),
    }
}

/// Ends the task: records how, then cleans up what the VM left.
pub(super) fn finish(
    agent: &Agent,
    handle: &TaskHandle,
    state: TaskState,
    reason: String,
    while_agent_down: bool,
) -> Next {
    tracing::info!(task = %handle.id, %state, reason = %reason, "task ended");
    agent.update(handle, |r| {
        r.state = state;
        r.exit = Some(ExitRecord {
            at_ms: now_ms(),
            reason,
            while_agent_down,
        });
    });
    let record = handle.record();
    isolation::remove_cgroups(&record.cgroups);
    let dir = TaskDir { root: record.dir };
    for leftover in [
        dir.overlay(),
        dir.qmp_socket(),
        agent.exit_record_path(&handle.id),
    ] {
        let _ = std::fs::remove_file(leftover);
    }
    if let Err(e) = agent
        .runner
        .cache
        .release_lease(&record.submitted.checksum, &handle.id)
        .and_then(|_| match &record.task {
            Some(t) if t.checksum != record.submitted.checksum => {
                agent.runner.cache.release_lease(&t.checksum, &handle.id)
            }
            _ => Ok(false),
        })
    {
        tracing::warn!(task = %handle.id, error = %crate::error_chain(&e), "cannot release the image lease");
    }
    Next::Done
}
