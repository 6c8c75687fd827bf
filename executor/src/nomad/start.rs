//! `StartTask`: from Nomad's task config to a VM under its shim. The steps
//! are `run`'s (policies, args allowlist, accelerator, fetch, launch), with
//! each one's outcome as a task event, and every failure as the gRPC status
//! Nomad's restart logic expects. It returns once qemu runs; the
//! supervision carries on in a task of its own.

use std::sync::Arc;

use nomad_proto::driver::{TaskConfig, TaskHandle, TaskState};
use tonic::Status;

use super::Plugin;
use super::events::{Events, Subject};
use super::plugin_config::Host;
use super::state::{self, DriverState, HANDLE_VERSION};
use super::status;
use super::task_config::{self, AllocatedPort, Allocation, NomadTaskConfig};
use super::tasks::{self, NomadTask};
use crate::fetch::FetchError;
use crate::launcher::{self, Prepared};
use crate::policy::ChainOutcome;

pub async fn start(plugin: &Plugin, config: TaskConfig) -> Result<TaskHandle, Status> {
    let host = plugin.host()?;
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
    let ports = allocated_ports(&config);
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
    let task = task_config::to_task(nomad, &alloc).map_err(|e| invalid(&e))?;

    let runner = &host.runner;
    let facts = runner.probe.host_facts().await;
    let outcome = runner.chain.evaluate(task, &facts).await;
    plugin.events.policies(&subject, &outcome);
    let task = match outcome {
        ChainOutcome::Accepted { task, .. } => task,
        rejected @ ChainOutcome::Rejected { .. } => {
            return Err(Status::permission_denied(rejected.to_string()));
        }
    };
    let extra_args = runner
        .config
        .args
        .check(&task.args)
        .map_err(|e| invalid(&e))?;
    let (accelerator, why) = launcher::choose_accelerator(&task, &facts)
        .map_err(|e| Status::failed_precondition(crate::error_chain(&e)))?;
    plugin.events.emit(
        &subject,
        "accelerator",
        match &why {
            Some(why) => format!("Accelerator {accelerator}: {why}"),
            None => format!("Accelerator {accelerator}, as asked"),
        },
        &[
            ("requested", task.accelerator.to_string()),
            ("used", accelerator.to_string()),
        ],
    );
    let qemu = runner
        .probe
        .qemu()
        .await
        .map_err(|e| Status::failed_precondition(crate::error_chain(&e)))?;

    let dir = launcher::create_task_dir(&runner.state_dir, &task.name)
        .map_err(|e| Status::internal(crate::error_chain(&e)))?;
    let key = state::key_of(&dir.root);
    // From here on a failure removes the directory: nothing is left
    // behind for a task that never ran.
    let fail = |status: Status| {
        let _ = std::fs::remove_dir_all(&dir.root);
        state::forget(&runner.state_dir, &key);
        status
    };
    if let Err(e) = std::fs::write(
        dir.root.join("task.json"),
        serde_json::to_string_pretty(&task).expect("a task serializes"),
    ) {
        return Err(fail(Status::internal(format!(
            "Cannot write task.json: {e}"
        ))));
    }

    let fetched = tokio::select! {
        fetched = fetch(&host, &plugin.events, &subject, &task, &key, &task_dir) => fetched,
        // Nomad is stopping its plugins: it will start the task again on
        // the next one.
        _ = plugin.shutdown.cancelled() => Err(shutting_down()),
    };
    let fetched = match fetched {
        Ok(f) => f,
        Err(status) => return Err(fail(status)),
    };

    let cgroups = host
        .isolation
        .cgroups_for(&key, task.memory_mb, task.cpus)
        .paths;
    let state = tasks::initial_state(&config.id, &dir, &task, accelerator, cgroups);
    let nomad_task = Arc::new(NomadTask::new(config.clone(), state));
    // What a task that never ran leaves: nothing.
    let abandon = |status: Status| {
        nomad_task.release(&host);
        fail(status)
    };
    if let Err(e) = host
        .isolation
        .hand_over(&dir.root, &[dir.serial_log(), dir.qemu_log()])
    {
        return Err(abandon(Status::internal(crate::error_chain(&e))));
    }

    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let supervision = {
        let host = host.clone();
        let events = plugin.events.clone();
        let nomad_task = nomad_task.clone();
        let image = fetched.path.clone();
        tokio::spawn(async move {
            let settings =
                tasks::host_settings(&host, &nomad_task.config, &nomad_task.state(), Some(&qemu));
            let prepared = Prepared {
                task: &task,
                accelerator,
                image: &image,
                extra_args: &extra_args,
                dir: &nomad_task.dir,
            };
            let mut started = Some(started_tx);
            let outcome = launcher::launch(&settings, prepared, &nomad_task.stop, |event| {
                let is_start = matches!(event, crate::launcher::LaunchEvent::Started { .. });
                tasks::on_launch_event(&host, &events, &nomad_task, event);
                if is_start && let Some(tx) = started.take() {
                    let _ = tx.send(());
                }
            })
            .await
            .map_err(|e| crate::error_chain(&e));
            if started.is_some() {
                // Never started: StartTask reports it.
                return outcome.err();
            }
            nomad_task.finish(&host, &events, tasks::end_of(outcome));
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
        return Err(abandon(shutting_down()));
    }
    if !started {
        // The launch failed before qemu ran: say why, leave nothing.
        let why = match supervision.await {
            Ok(Some(why)) => why,
            Ok(None) => "the launch ended before qemu started".into(),
            Err(e) => e.to_string(),
        };
        return Err(abandon(status::recoverable(format!(
            "Cannot launch qemu: {why}"
        ))));
    }
    let state = nomad_task.state();
    plugin.tasks.insert(nomad_task);
    Ok(handle(&config, &state))
}

fn shutting_down() -> Status {
    Status::unavailable("The plugin is shutting down; start the task on the next one")
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

/// Fetches the task's image into the cache, leased to the task, with its
/// progress as events.
async fn fetch(
    host: &Host,
    events: &Events,
    subject: &Subject,
    task: &policy_sdk::Task,
    key: &str,
    task_dir: &std::path::Path,
) -> Result<crate::fetch::Fetched, Status> {
    let runner = &host.runner;
    let observer: crate::fetch::ProgressObserver = {
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
    };
    let fetched = runner
        .fetcher
        .granting(task_dir) // the task's own directory, where its artifacts land
        .observed(observer)
        .fetch_leased(
            &runner.cache,
            &task.image_source,
            &task.checksum,
            key,
            std::process::id(),
        )
        .await;
    match fetched {
        Ok((fetched, _lease)) => {
            // The lease stays on disk until the task ends (`finish`).
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
            Ok(fetched)
        }
        Err(e) => {
            let message = format!("Cannot fetch the image: {}", crate::error_chain(&e));
            events.emit(subject, "fetch", message.clone(), &[]);
            Err(fetch_status(&e, message))
        }
    }
}

/// What a retry may fix is recoverable; a wrong checksum or a refused
/// source is not.
fn fetch_status(e: &FetchError, message: String) -> Status {
    let retryable = match e {
        FetchError::Exhausted { source, .. } => source.is_retryable(),
        other => other.is_retryable(),
    };
    if retryable {
        status::recoverable(message)
    } else {
        Status::invalid_argument(message)
    }
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
