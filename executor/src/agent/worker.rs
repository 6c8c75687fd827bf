//! One task's life in its own tokio task: the launch pipeline's steps, the
//! VM's restarts, its end. Nothing here waits on another task: a slow
//! download, a stuck policy or a crashed guest stays within its own
//! worker. What the pipeline reports becomes the task's record.

use std::sync::Arc;
use std::time::{Duration, Instant};

use policy_sdk::Accelerator;

use super::record::{AcceleratorChoice, ExitRecord, ImageRecord, TaskState, VmRecord};
use super::restart::{self, Decision};
use super::{Agent, TaskHandle, now_ms};
use crate::launch::{Admitted, Event, Holdings, Kind, LaunchError, Phase, Placement};
use crate::vm::{Ending, TaskDir, Vm};

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
        outcome: Result<Ending, LaunchError>,
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
                let task = handle.record().effective_task().clone();
                let ending = agent
                    .pipeline
                    .resume(*vm, &task, accelerator, phase, &handle.stop, &mut |event| {
                        record_event(&agent, &handle, event)
                    })
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

/// The policy chain, once: restarts reuse its verdict.
async fn admit(agent: &Agent, handle: &TaskHandle) -> Next {
    agent.update(handle, |r| r.state = TaskState::Evaluating);
    let submitted = handle.record().submitted;
    let mut evaluating = Instant::now();
    let mut took = Duration::ZERO;
    let mut steps = Vec::new();
    let admitted = agent
        .pipeline
        .admit(submitted, &mut |event| match event {
            Event::Facts(_) => evaluating = Instant::now(),
            Event::Policies(outcome) => {
                took = evaluating.elapsed();
                steps = outcome
                    .steps()
                    .iter()
                    .filter_map(|s| serde_json::to_value(s).ok())
                    .collect();
            }
            _ => {}
        })
        .await;
    match admitted {
        Ok(Admitted { task, .. }) => {
            agent.metrics.evaluated(took, false, false);
            agent.update(handle, |r| {
                r.policies = steps;
                r.task = Some(task);
            });
            if handle.stop.is_requested() {
                return stopped_before_launch(agent, handle);
            }
            Next::Launch
        }
        Err(e) => {
            let fault = matches!(e, LaunchError::Rejected { fault: true, .. });
            let rejected = matches!(e, LaunchError::Rejected { .. });
            agent.metrics.evaluated(took, rejected, fault);
            agent.update(handle, |r| r.policies = steps);
            finish(
                agent,
                handle,
                TaskState::Failed,
                crate::error_chain(&e),
                false,
            )
        }
    }
}

fn stopped_before_launch(agent: &Agent, handle: &TaskHandle) -> Next {
    finish(
        agent,
        handle,
        TaskState::Exited,
        "stopped before launch".into(),
        false,
    )
}

/// One launch of the admitted task: plan, prepare, boot, supervise.
async fn launch(agent: &Agent, handle: &TaskHandle) -> Next {
    if handle.stop.is_requested() {
        return stopped_before_launch(agent, handle);
    }
    let record = handle.record();
    let pipeline = &agent.pipeline;
    // A stop that came first is an end, not a failure.
    let fail = |e: LaunchError| match e.kind() {
        Kind::Interrupted => stopped_before_launch(agent, handle),
        _ => finish(
            agent,
            handle,
            TaskState::Failed,
            crate::error_chain(&e),
            false,
        ),
    };
    let placement = Placement {
        dir: TaskDir {
            root: record.dir.clone(),
        },
        exit_record: Some(agent.exit_record_path(&handle.id)),
        // The agent keeps the logs in the task directory only.
        forwards: Vec::new(),
        // Only the operator's `[fetch] file_dirs`.
        file_dir: None,
    };
    let mut on_event = |event: Event<'_>| record_event(agent, handle, event);
    let admitted = match Admitted::of(record.effective_task().clone(), &pipeline.config) {
        Ok(admitted) => admitted,
        Err(e) => return fail(e),
    };
    let plan = match pipeline.plan(&admitted, &mut on_event).await {
        Ok(plan) => plan,
        Err(e) => return fail(e),
    };
    let prepared = pipeline
        .prepare(
            admitted,
            plan,
            &placement,
            &handle.stop,
            None,
            &mut on_event,
        )
        .await;
    let prepared = match prepared {
        Ok(prepared) => prepared,
        Err(e) => return fail(e),
    };
    agent.update(handle, |r| {
        r.state = TaskState::Starting;
        r.cgroups = prepared.cgroups.clone();
        r.vm = None;
    });
    let outcome = pipeline
        .launch(&prepared, &placement, &handle.stop, &mut on_event)
        .await;
    Next::Ended {
        outcome,
        while_agent_down: false,
    }
}

/// Records what the pipeline reports, before the agent acts on it.
fn record_event(agent: &Agent, handle: &TaskHandle, event: Event<'_>) {
    match event {
        Event::Facts(_) | Event::Policies(_) => {}
        Event::Accelerator {
            requested,
            chosen,
            reason,
        } => agent.update(handle, |r| {
            r.state = TaskState::Fetching;
            r.accelerator = Some(AcceleratorChoice {
                requested,
                used: chosen,
                reason: reason.map(str::to_string),
            });
        }),
        Event::Image(fetched) => {
            agent.metrics.fetched(fetched.body_bytes, fetched.cache_hit);
            agent.update(handle, |r| {
                r.image = Some(ImageRecord {
                    path: fetched.path.clone(),
                    size: fetched.size,
                    cache_hit: fetched.cache_hit,
                    body_bytes: fetched.body_bytes,
                });
            });
        }
        Event::Confined { report, .. } => agent.update(handle, |r| r.isolation = report.clone()),
        Event::Started {
            accelerator,
            identity,
            shim,
            ..
        } => agent.update(handle, |r| {
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
        }),
        Event::PortReady(port) => {
            tracing::info!(task = %handle.id, host = port.host, guest = port.guest, "port ready");
        }
        Event::Ready { after } => {
            tracing::info!(task = %handle.id, secs = after.as_secs_f64(), "ready");
            agent.update(handle, |r| {
                r.state = TaskState::Ready;
                if let Some(vm) = &mut r.vm {
                    vm.ready_at_ms = Some(now_ms());
                }
            });
        }
        Event::KvmFallback { reason } => {
            let reason = format!("kvm failed this guest ({reason}); relaunched under tcg");
            agent.update(handle, |r| {
                if let Some(choice) = &mut r.accelerator {
                    choice.used = Accelerator::Tcg;
                    choice.reason = Some(reason);
                }
            });
        }
        Event::Stopping => agent.update(handle, |r| r.state = TaskState::Stopping),
    }
}

/// Decides what follows the end of a VM or of its launch.
fn ended(
    agent: &Agent,
    handle: &TaskHandle,
    outcome: Result<Ending, LaunchError>,
    while_agent_down: bool,
) -> Next {
    let down = if while_agent_down {
        " (while the agent was down)"
    } else {
        ""
    };
    let (state, reason) = match outcome {
        Ok(ending) if handle.stop.is_requested() || matches!(ending, Ending::Stopped(_)) => {
            (TaskState::Exited, format!("{ending}{down}"))
        }
        Ok(Ending::GuestShutdown) => (TaskState::Exited, format!("the guest shut down{down}")),
        Ok(ending @ Ending::KvmUnusable { .. }) => (TaskState::Failed, ending.to_string()),
        Ok(ending) => {
            return restart_or_fail(agent, handle, format!("{ending}{down}"), while_agent_down);
        }
        Err(e) => {
            let cause = format!("launch failed: {}{down}", crate::error_chain(&e));
            return restart_or_fail(agent, handle, cause, while_agent_down);
        }
    };
    finish(agent, handle, state, reason, while_agent_down)
}

/// The VM ended on its own: its restart policy decides.
fn restart_or_fail(
    agent: &Agent,
    handle: &TaskHandle,
    cause: String,
    while_agent_down: bool,
) -> Next {
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

/// Ends the task: records how, then gives back what the VM held.
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
    let mut checksums = vec![record.submitted.checksum.clone()];
    if let Some(task) = &record.task {
        checksums.push(task.checksum.clone());
    }
    agent.pipeline.release(&Holdings {
        dir: TaskDir { root: record.dir },
        checksums,
        cgroups: record.cgroups,
        exit_record: Some(agent.exit_record_path(&handle.id)),
    });
    Next::Done
}
