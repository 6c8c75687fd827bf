//! From a verified image and a final task to a VM that ran and ended: the
//! task directory, the boot medium, the accelerator with its fallback, and
//! the supervision until the VM ends or is stopped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use policy_sdk::{Accelerator, HostFacts, KvmStatus, PortMapping, Task};
use tokio_util::sync::CancellationToken;

use crate::qemu::cmdline::{BootMedium, Confinement};
use crate::qemu::image::{self, ImageError, ImageKind};
use crate::supervisor::{Boot, BootWatch, Ending, Launch, SuperviseError, TaskDir, Vm};
use crate::verdict;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("qemu was not found on this host")]
    NoQemu,
    #[error("This qemu does not offer the {0} accelerator (it offers: {1})")]
    AcceleratorMissing(Accelerator, String),
    #[error("Task asks for kvm without fallback, but KVM is {0}")]
    KvmUnavailable(KvmStatus),
    #[error("Cannot create the task directory {}", path.display())]
    TaskDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot prepare the boot image")]
    Image(#[from] ImageError),
    #[error("Cannot launch qemu")]
    Supervise(#[from] SuperviseError),
}

/// Which accelerator a task gets on this host, and why when it is not the
/// one it asked for.
pub fn choose_accelerator(
    task: &Task,
    facts: &HostFacts,
) -> Result<(Accelerator, Option<String>), LaunchError> {
    if !facts.qemu_found {
        return Err(LaunchError::NoQemu);
    }
    let offered = |a: Accelerator| facts.accelerators.iter().any(|x| x == a.as_str());
    let choice = match task.accelerator {
        Accelerator::Kvm if facts.kvm.is_usable() && offered(Accelerator::Kvm) => {
            (Accelerator::Kvm, None)
        }
        Accelerator::Kvm if task.kvm_fallback => {
            let why = if offered(Accelerator::Kvm) {
                format!("KVM is {}", facts.kvm)
            } else {
                "this qemu has no kvm accelerator".to_string()
            };
            (
                Accelerator::Tcg,
                Some(format!("kvm requested, {why}; using tcg")),
            )
        }
        Accelerator::Kvm => return Err(LaunchError::KvmUnavailable(facts.kvm.clone())),
        Accelerator::Tcg => (Accelerator::Tcg, None),
    };
    if !offered(choice.0) {
        return Err(LaunchError::AcceleratorMissing(
            choice.0,
            facts.accelerators.join(", "),
        ));
    }
    Ok(choice)
}

/// Creates a fresh task directory `<state>/tasks/<name>-<suffix>`.
pub fn create_task_dir(state_dir: &Path, name: &str) -> Result<TaskDir, LaunchError> {
    let parent = state_dir.join("tasks");
    let make = || -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&parent)?;
        // A fresh directory, never one planted in advance: overlays and
        // sockets are only ever created inside it.
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .rand_bytes(6)
            .tempdir_in(&parent)?;
        Ok(dir.keep())
    };
    make()
        .map(|root| TaskDir { root })
        .map_err(|source| LaunchError::TaskDir {
            path: parent.clone(),
            source,
        })
}

/// What happens while the VM runs, for the caller to print or record.
#[derive(Debug)]
pub enum LaunchEvent<'a> {
    Started {
        pid: u32,
        accelerator: Accelerator,
        dir: &'a Path,
    },
    PortReady(&'a PortMapping),
    Ready {
        after: Duration,
    },
    KvmFallback {
        reason: &'a str,
    },
    Stopping,
}

/// Settings of the host that shape every launch.
#[derive(Debug, Clone)]
pub struct HostSettings {
    pub qemu: PathBuf,
    pub qemu_version: Option<String>,
    pub state_dir: PathBuf,
    pub sandbox: bool,
    /// Serial silence under kvm that counts as a hang; `None` disables it.
    pub kvm_stall: Option<Duration>,
    pub die_with_parent: bool,
}

/// A task ready to launch.
pub struct Prepared<'a> {
    pub task: &'a Task,
    pub accelerator: Accelerator,
    pub image: &'a Path,
    pub extra_args: &'a [String],
    pub dir: &'a TaskDir,
}

/// Boots the task (falling back from a lying KVM to tcg once, if the task
/// allows it), waits until it ends or `cancel` fires, and stops it.
pub async fn launch(
    host: &HostSettings,
    prepared: Prepared<'_>,
    cancel: &CancellationToken,
    mut on_event: impl FnMut(LaunchEvent<'_>),
) -> Result<Ending, LaunchError> {
    let Prepared {
        task,
        mut accelerator,
        image,
        extra_args,
        dir,
    } = prepared;
    let kind = image::detect(image)?;
    loop {
        let medium = boot_medium(kind, image, task, dir).await?;
        let started = Instant::now();
        let mut vm = Launch {
            qemu: &host.qemu,
            task,
            accelerator,
            medium,
            dir,
            extra_args,
            confinement: Confinement {
                sandbox: host.sandbox,
                ..Confinement::default()
            },
            die_with_parent: host.die_with_parent,
        }
        .start()
        .await?;
        on_event(LaunchEvent::Started {
            pid: vm.pid(),
            accelerator,
            dir: &dir.root,
        });
        let watch = BootWatch {
            ports: &task.ports,
            ready_serial: task.ready_serial.as_deref(),
            ready_timeout: Duration::from_secs(task.ready_timeout_s.into()),
            under_kvm: accelerator == Accelerator::Kvm,
            kvm_stall: host.kvm_stall.filter(|_| accelerator == Accelerator::Kvm),
        };
        let boot = vm
            .boot(&watch, cancel, |port| {
                on_event(LaunchEvent::PortReady(port))
            })
            .await;
        match boot {
            Boot::Ready => {
                on_event(LaunchEvent::Ready {
                    after: started.elapsed(),
                });
                return Ok(run_until_end(&mut vm, task, cancel, &mut on_event).await);
            }
            Boot::KvmFailed(reason) => {
                tracing::warn!(task = %task.name, %reason, "KVM failed this guest");
                vm.stop(false, Duration::ZERO).await;
                if let Err(e) =
                    verdict::record(&host.state_dir, &reason, host.qemu_version.as_deref())
                {
                    tracing::warn!(error = %e, "cannot remember the KVM verdict");
                }
                if !task.kvm_fallback {
                    return Ok(Ending::KvmUnusable { reason });
                }
                on_event(LaunchEvent::KvmFallback { reason: &reason });
                accelerator = Accelerator::Tcg;
            }
            Boot::Ended(ending) => return Ok(ending),
            Boot::NotReady => {
                on_event(LaunchEvent::Stopping);
                vm.stop(false, Duration::ZERO).await;
                return Ok(Ending::NotReady {
                    after: Duration::from_secs(task.ready_timeout_s.into()),
                });
            }
            Boot::Cancelled => {
                on_event(LaunchEvent::Stopping);
                return Ok(stop(&mut vm, task).await);
            }
        }
    }
}

async fn run_until_end(
    vm: &mut Vm,
    task: &Task,
    cancel: &CancellationToken,
    on_event: &mut impl FnMut(LaunchEvent<'_>),
) -> Ending {
    match vm.wait(cancel).await {
        Some(ending) => ending,
        None => {
            on_event(LaunchEvent::Stopping);
            stop(vm, task).await
        }
    }
}

async fn stop(vm: &mut Vm, task: &Task) -> Ending {
    vm.stop(
        task.graceful_shutdown,
        Duration::from_secs(task.kill_timeout_s.into()),
    )
    .await
}

/// The medium for one boot: the cached ISO read-only, or a fresh overlay
/// over the cached disk (recreated for a relaunch, so a failed boot leaves
/// nothing behind in it).
async fn boot_medium(
    kind: ImageKind,
    image: &Path,
    task: &Task,
    dir: &TaskDir,
) -> Result<BootMedium, LaunchError> {
    match kind {
        ImageKind::Iso => Ok(BootMedium::Cdrom {
            path: image.to_path_buf(),
        }),
        ImageKind::Disk(format) => {
            let overlay = dir.overlay();
            match std::fs::remove_file(&overlay) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(LaunchError::TaskDir {
                        path: overlay,
                        source,
                    });
                }
            }
            image::create_overlay(image, format, &overlay).await?;
            Ok(BootMedium::Disk {
                path: overlay,
                format: crate::qemu::cmdline::DiskFormat::Qcow2,
                interface: task.drive_interface,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(kvm: KvmStatus, accels: &[&str]) -> HostFacts {
        HostFacts {
            qemu_found: true,
            qemu_version: Some("7.2.22".into()),
            accelerators: accels.iter().map(|s| s.to_string()).collect(),
            kvm,
            host_cpus: 2,
            host_memory_mb: 1024,
        }
    }

    fn task(accelerator: Accelerator, kvm_fallback: bool) -> Task {
        let text = format!(
            "name = \"t\"\nimage_source = \"http://h/x\"\nchecksum = \"{}\"\nhost_port = 1\nguest_port = 2\naccelerator = \"{accelerator}\"\nkvm_fallback = {kvm_fallback}\n",
            "0".repeat(32)
        );
        crate::task::parse_toml(&text).unwrap().into_task().unwrap()
    }

    #[test]
    fn accelerator_choice() {
        let both = ["tcg", "kvm"];
        assert_eq!(
            choose_accelerator(
                &task(Accelerator::Kvm, true),
                &facts(KvmStatus::Usable, &both)
            )
            .unwrap(),
            (Accelerator::Kvm, None)
        );
        let (accel, why) = choose_accelerator(
            &task(Accelerator::Kvm, true),
            &facts(KvmStatus::Unusable("emulation failure".into()), &both),
        )
        .unwrap();
        assert_eq!(accel, Accelerator::Tcg);
        assert_eq!(
            why.unwrap(),
            "kvm requested, KVM is unusable: emulation failure; using tcg"
        );
        assert!(matches!(
            choose_accelerator(
                &task(Accelerator::Kvm, false),
                &facts(KvmStatus::Absent, &both)
            ),
            Err(LaunchError::KvmUnavailable(KvmStatus::Absent))
        ));
        let (accel, why) = choose_accelerator(
            &task(Accelerator::Kvm, true),
            &facts(KvmStatus::Usable, &["tcg"]),
        )
        .unwrap();
        assert_eq!(accel, Accelerator::Tcg);
        assert!(why.unwrap().contains("no kvm accelerator"));
        assert!(matches!(
            choose_accelerator(
                &task(Accelerator::Tcg, true),
                &facts(KvmStatus::Usable, &["kvm"])
            ),
            Err(LaunchError::AcceleratorMissing(Accelerator::Tcg, _))
        ));
        let mut no_qemu = facts(KvmStatus::Usable, &both);
        no_qemu.qemu_found = false;
        assert!(matches!(
            choose_accelerator(&task(Accelerator::Tcg, true), &no_qemu),
            Err(LaunchError::NoQemu)
        ));
    }

    #[test]
    fn task_dirs_are_fresh_and_named() {
        let state = tempfile::tempdir().unwrap();
        let a = create_task_dir(state.path(), "web").unwrap();
        let b = create_task_dir(state.path(), "web").unwrap();
        assert_ne!(a.root, b.root);
        assert!(
            a.root
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("web-")
        );
        assert!(a.root.starts_with(state.path().join("tasks")));
    }
}
