//! `StartTask`: from Nomad's task config to a VM under its shim, through
//! the launch pipeline, with each step's outcome as a task event and every
//! failure as the gRPC status Nomad's restart logic expects. It returns
//! once qemu runs; the supervision carries on in a task of its own.

use std::sync::Arc;

use nomad_proto::driver::{TaskConfig, TaskHandle, TaskState};
use tonic::Status;

use super::Plugin;
use super::events::{Events, Subject};
use super::plugin_config::Configured;
use super::state::{self, DriverState, HANDLE_VERSION};
use super::status;
use super::task_config::{self, AllocatedPort, Allocation, NomadTaskConfig};
use super::tasks::{self, NomadTask};
use crate::launch::{Event, Kind, Placement, Prepared};
use crate::vm::{StopSignal, TaskDir};

pub async fn start(plugin: &Plugin, config: TaskConfig) -> Result<TaskHandle, Status> {
    let configured = plugin.configured()?;
    if config.id.is_empty() {
        return Err(Status::invalid_argument("The task has no id"));
    }
    if plugin.tasks.contains(&config.id) {
        return Err(Status::already_exists(format!(
            "Task {} is already running",
            config.id
        )));
    }
    let subject = Subject {
        task_id: config.id.clone(),
        alloc_id: config.alloc_id.clone(),
        task_name: config.name.clone(),
    };
    let task = task_of(&config).await?;
    let pipeline = &configured.pipeline;
    let mut on_event = |event: Event<'_>| early_event(&plugin.events, &subject, event);
    let admitted = pipeline
        .admit(task, &mut on_event)
        .await
        .map_err(|e| status::of_launch(&e))?;
    let plan = pipeline
        .plan(&admitted, &mut on_event)
        .await
        .map_err(|e| status::of_launch(&e))?;
    let dir = crate::launch::task_dir(&pipeline.state_dir, &admitted.task.name)
        .map_err(|e| status::of_launch(&e))?;
    let placement = tasks::placement(&configured, &config, &dir);
    // Nomad stopping its plugins stops a download: it will start the task
    // again on the next one.
    let shutdown = StopSignal::from_token(plugin.shutdown.child_token());
    let progress = fetch_progress(&plugin.events, &subject);
    let prepared = pipeline
        .prepare(
            admitted,
            plan,
            &placement,
            &shutdown,
            Some(progress),
            &mut on_event,
        )
        .await;
    let prepared = match prepared {
        Ok(prepared) => prepared,
        Err(e) => {
            if matches!(e.kind(), Kind::Fetch { .. }) {
                plugin
                    .events
                    .emit(&subject, "fetch", crate::error_chain(&e), &[]);
            }
            return Err(forget(&configured, &dir, status::of_launch(&e)));
        }
    };
    let state = tasks::initial_state(&config.id, &dir, &prepared);
    let task = Arc::new(NomadTask::new(config.clone(), state));
    if let Err(status) = launch(plugin, &configured, &task, prepared, placement).await {
        // What a task that never ran leaves: nothing.
        task.release(&configured);
        return Err(forget(&configured, &dir, status));
    }
    let state = task.state();
    plugin.tasks.insert(task);
    Ok(handle(&config, &state))
}

/// Removes the directory of a task that never ran, and what the plugin
/// kept for it.
fn forget(configured: &Configured, dir: &TaskDir, status: Status) -> Status {
    let _ = std::fs::remove_dir_all(&dir.root);
    state::forget(&configured.pipeline.state_dir, &dir.key());
    status
}

/// Nomad's task config, checked, as our task.
async fn task_of(config: &TaskConfig) -> Result<policy_sdk::Task, Status> {
    let invalid = |e: &dyn std::error::Error| Status::invalid_argument(crate::error_chain(e));
    let mut nomad =
        NomadTaskConfig::decode(&config.msgpack_driver_config).map_err(|e| invalid(&e))?;
    let task_dir = std::path::Path::new(&config.alloc_dir).join(&config.name);
    if let (Some(path), None) = (&nomad.image_path, &nomad.checksum) {
        // The job's artifact block verified it, if it could; the cache
        // still needs a name for it.
        let path = task_config::resolve_image_path(&task_dir, path).map_err(|e| invalid(&e))?;
        let digest = tokio::task::spawn_blocking(move || md5_of(&path))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| {
                Status::invalid_argument(format!("Invalid task config: image_path: {e}"))
            })?;
        nomad.checksum = Some(format!("md5:{digest}"));
    }
    let ports = allocated_ports(config);
    let resources = config.resources.as_ref();
    let linux = resources.and_then(|r| r.linux_resources.as_ref());
    let memory_mb = resources
        .and_then(|r| r.allocated_resources.as_ref())
        .and_then(|a| a.memory.as_ref())
        .map_or(0, |m| m.memory_mb);
    let alloc = Allocation {
        task_name: &config.name,
        task_dir: &task_dir,
        memory_mb,
        cpuset_cpus: linux.map_or("", |l| l.cpuset_cpus.as_str()),
        ports: &ports,
    };
    task_config::to_task(nomad, &alloc).map_err(|e| invalid(&e))
}

/// Starts the prepared VM; the supervision carries on in a task of its own
/// once qemu runs. An error says why it never ran.
async fn launch(
    plugin: &Plugin,
    configured: &Arc<Configured>,
    nomad_task: &Arc<NomadTask>,
    prepared: Prepared,
    placement: Placement,
) -> Result<(), Status> {
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let supervision = {
        let configured = configured.clone();
        let events = plugin.events.clone();
        let nomad_task = nomad_task.clone();
        tokio::spawn(async move {
            let mut started = Some(started_tx);
            let outcome = configured
                .pipeline
                .launch(&prepared, &placement, &nomad_task.stop, &mut |event| {
                    let is_start = matches!(event, Event::Started { .. });
                    tasks::on_event(&configured, &events, &nomad_task, event);
                    if is_start && let Some(tx) = started.take() {
                        let _ = tx.send(());
                    }
                })
                .await;
            if started.is_some() {
                // Never started: StartTask reports it.
                return outcome.err();
            }
            nomad_task.finish(&configured, &events, tasks::end_of(outcome));
            None
        })
    };
    let started = tokio::select! {
        started = started_rx => started.is_ok(),
        _ = plugin.shutdown.cancelled() => false,
    };
    if plugin.shutdown.is_cancelled() {
        // Nomad would never get this VM's handle: it must not outlive us,
        // and Nomad kills us 2 s from now, so no graceful stop.
        nomad_task.stop.request(Some(std::time::Duration::ZERO));
        let qemu = nomad_task.state().qemu;
        if qemu.pid != 0 && qemu.is_alive() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(qemu.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = supervision.await;
        return Err(shutting_down());
    }
    if started {
        return Ok(());
    }
    Err(match supervision.await {
        Ok(Some(e)) => status::of_launch(&e),
        Ok(None) => status::recoverable("The launch ended before qemu started"),
        Err(e) => Status::internal(e.to_string()),
    })
}

/// The events of the steps before the VM runs: each policy's decision and
/// the accelerator, and the image once it is in the cache.
fn early_event(events: &Events, subject: &Subject, event: Event<'_>) {
    match event {
        Event::Policies(outcome) => events.policies(subject, outcome),
        Event::Accelerator {
            requested,
            chosen,
            reason,
        } => events.emit(
            subject,
            "accelerator",
            match reason {
                Some(why) => format!("Accelerator {chosen}: {why}"),
                None => format!("Accelerator {chosen}, as asked"),
            },
            &[
                ("requested", requested.to_string()),
                ("used", chosen.to_string()),
            ],
        ),
        Event::Image(fetched) => {
            let message = if fetched.cache_hit {
                format!(
                    "Image found in the cache ({})",
                    crate::units::format_size(fetched.size)
                )
            } else {
                format!(
                    "Image downloaded and verified ({})",
                    crate::units::format_size(fetched.size)
                )
            };
            events.emit(
                subject,
                "fetch",
                message,
                &[
                    ("bytes", fetched.size.to_string()),
                    ("cache_hit", fetched.cache_hit.to_string()),
                ],
            );
        }
        _ => {}
    }
}

fn shutting_down() -> Status {
    status::of_launch(&crate::launch::LaunchError::Interrupted)
}

/// The handle Nomad keeps and hands back on `RecoverTask`.
pub fn handle(config: &TaskConfig, state: &DriverState) -> TaskHandle {
    TaskHandle {
        version: HANDLE_VERSION,
        config: Some(config.clone()),
        state: TaskState::Running as i32,
        driver_state: state.encode(),
    }
}

/// The download's progress as task events.
fn fetch_progress(events: &Events, subject: &Subject) -> crate::fetch::ProgressObserver {
    let events = events.clone();
    let subject = subject.clone();
    Arc::new(move |bytes: u64, total: Option<u64>| {
        let message = match total {
            Some(t) if t > 0 => format!(
                "Downloading the image: {} of {} ({}%)",
                crate::units::format_size(bytes),
                crate::units::format_size(t),
                bytes * 100 / t
            ),
            _ => format!(
                "Downloading the image: {}",
                crate::units::format_size(bytes)
            ),
        };
        let mut annotations = vec![("bytes", bytes.to_string())];
        if let Some(t) = total {
            annotations.push(("total", t.to_string()));
        }
        events.emit(&subject, "fetch", message, &annotations);
    })
}

/// The group network's ports as Nomad allocated them.
fn allocated_ports(config: &TaskConfig) -> Vec<AllocatedPort> {
    config
        .resources
        .as_ref()
        .map(|r| {
            r.ports
                .iter()
                .map(|p| AllocatedPort {
                    label: p.label.clone(),
                    value: i64::from(p.value),
                    to: i64::from(p.to),
                    host_ip: p.host_ip.clone(),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn md5_of(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))
    })?;
    let mut hasher = crate::digest::Hasher::new(policy_sdk::ChecksumAlgorithm::Md5);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize_hex())
}
