//! From a verified image and a final task to a VM that ran and ended: the
//! task directory, the boot medium, the accelerator with its fallback, and
//! the supervision until the VM ends or is stopped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use policy_sdk::{Accelerator, HostFacts, KvmStatus, PortMapping, Task};

use crate::qemu::cmdline::{BootMedium, Confinement};
use crate::qemu::image::{self, ImageError, ImageKind};
use crate::qemu::process::ProcessIdentity;
use crate::supervisor::{
    Boot, BootWatch, Ending, Launch, SpawnMode, StopSignal, SuperviseError, TaskDir, Vm,
};
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
        /// qemu's identity, and its shim's when it runs under one.
        identity: ProcessIdentity,
        shim: Option<ProcessIdentity>,
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
    pub spawn: SpawnMode,
    /// `-chroot` qemu into the task directory once it has opened its files.
    pub chroot: bool,
    /// `-runas`: the user qemu drops to once it has opened its files.
    pub runas: Option<String>,
    /// Owner (uid, gid) given to the files qemu keeps using, such as the
    /// overlay, when qemu runs as another user.
    pub owner: Option<(u32, u32)>,
}

impl HostSettings {
    /// Settings for VMs under shims that outlive whoever launched them
    /// (the agent, the Nomad plugin), confined as `isolation` says.
    pub fn shimmed(
        config: &crate::config::Config,
        state_dir: &Path,
        isolation: &crate::agent::Isolation,
        qemu: Option<&crate::fingerprint::QemuInfo>,
        shim: crate::supervisor::ShimSettings,
    ) -> HostSettings {
        HostSettings {
            qemu: qemu.map_or_else(
                || crate::fingerprint::QEMU_BINARY.into(),
                |q| q.binary.clone(),
            ),
            qemu_version: qemu.map(|q| q.version.clone()),
            state_dir: state_dir.to_path_buf(),
            sandbox: config.qemu.sandbox,
            kvm_stall: (config.qemu.kvm_stall_s > 0)
                .then(|| Duration::from_secs(config.qemu.kvm_stall_s.into())),
            spawn: SpawnMode::Shim(shim),
            chroot: isolation.chroot,
            runas: isolation.user.as_ref().map(|u| u.name.clone()),
            owner: isolation.user.as_ref().map(|u| (u.uid, u.gid)),
        }
    }
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
/// allows it), waits until it ends or `stop` fires, and stops it.
pub async fn launch(
    host: &HostSettings,
    prepared: Prepared<'_>,
    stop: &StopSignal,
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
        let medium = boot_medium(kind, image, task, dir, host.owner).await?;
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
                chroot: host.chroot.then(|| dir.root.clone()),
                runas: host.runas.clone(),
            },
            spawn: &host.spawn,
        }
        .start()
        .await?;
        on_event(LaunchEvent::Started {
            pid: vm.pid(),
            accelerator,
            dir: &dir.root,
            identity: vm.process.identity(),
            shim: vm.process.shim(),
        });
        let ready_timeout = Duration::from_secs(task.ready_timeout_s.into());
        let watch = Watch {
            accelerator,
            ready_timeout,
            started,
        };
        match supervise(host, &mut vm, task, watch, stop, &mut on_event).await {
            Supervised::Ended(ending) => return Ok(ending),
            Supervised::KvmFailed(reason) => {
                if !task.kvm_fallback {
                    return Ok(Ending::KvmUnusable { reason });
                }
                on_event(LaunchEvent::KvmFallback { reason: &reason });
                accelerator = Accelerator::Tcg;
            }
        }
    }
}

/// Where an adopted VM was in its life when its agent went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Still booting: watch its ports for what is left of the timeout.
    Booting { left: Duration },
    /// Ready: only its end is left to wait for.
    Ready,
    /// Being stopped: stop it again (the request died with the agent).
    Stopping,
}

/// Carries on supervising a VM adopted after an agent restart, from the
/// phase it was in, until it ends or `stop` fires. A KVM failure seen now
/// ends it (the relaunch under tcg is the restart policy's business).
pub async fn resume(
    host: &HostSettings,
    mut vm: Vm,
    task: &Task,
    accelerator: Accelerator,
    phase: Phase,
    stop: &StopSignal,
    mut on_event: impl FnMut(LaunchEvent<'_>),
) -> Ending {
    match phase {
        Phase::Stopping => {
            on_event(LaunchEvent::Stopping);
            stop_vm(&mut vm, task, stop).await
        }
        Phase::Ready => run_until_end(&mut vm, task, stop, &mut on_event).await,
        Phase::Booting { left } => {
            let watch = Watch {
                accelerator,
                ready_timeout: left,
                started: Instant::now(),
            };
            match supervise(host, &mut vm, task, watch, stop, &mut on_event).await {
                Supervised::Ended(ending) => ending,
                Supervised::KvmFailed(reason) => Ending::KvmUnusable { reason },
            }
        }
    }
}

struct Watch {
    accelerator: Accelerator,
    ready_timeout: Duration,
    /// When this launch began, for the time to ready.
    started: Instant,
}

enum Supervised {
    Ended(Ending),
    /// KVM failed this guest; qemu is stopped and the verdict recorded.
    KvmFailed(String),
}

/// Watches the boot, then waits for the end or a stop.
async fn supervise(
    host: &HostSettings,
    vm: &mut Vm,
    task: &Task,
    watch: Watch,
    stop: &StopSignal,
    on_event: &mut impl FnMut(LaunchEvent<'_>),
) -> Supervised {
    let Watch {
        accelerator,
        ready_timeout,
        started,
    } = watch;
    let watch = BootWatch {
        ports: &task.ports,
        ready_serial: task.ready_serial.as_deref(),
        ready_timeout,
        under_kvm: accelerator == Accelerator::Kvm,
        kvm_stall: host.kvm_stall.filter(|_| accelerator == Accelerator::Kvm),
    };
    let boot = vm
        .boot(&watch, stop.token(), |port| {
            on_event(LaunchEvent::PortReady(port))
        })
        .await;
    match boot {
        Boot::Ready => {
            on_event(LaunchEvent::Ready {
                after: started.elapsed(),
            });
            Supervised::Ended(run_until_end(vm, task, stop, on_event).await)
        }
        Boot::KvmFailed(reason) => {
            tracing::warn!(task = %task.name, %reason, "KVM failed this guest");
            vm.stop(false, Duration::ZERO).await;
            if let Err(e) = verdict::record(&host.state_dir, &reason, host.qemu_version.as_deref())
            {
                tracing::warn!(error = %e, "cannot remember the KVM verdict");
            }
            Supervised::KvmFailed(reason)
        }
        Boot::Ended(ending) => Supervised::Ended(ending),
        Boot::NotReady => {
            on_event(LaunchEvent::Stopping);
            vm.stop(false, Duration::ZERO).await;
            Supervised::Ended(Ending::NotReady {
                after: ready_timeout,
            })
        }
        Boot::Cancelled => {
            on_event(LaunchEvent::Stopping);
            Supervised::Ended(stop_vm(vm, task, stop).await)
        }
    }
}

async fn run_until_end(
    vm: &mut Vm,
    task: &Task,
    stop: &StopSignal,
    on_event: &mut impl FnMut(LaunchEvent<'_>),
) -> Ending {
    match vm.wait(stop.token()).await {
        Some(ending) => ending,
        None => {
            on_event(LaunchEvent::Stopping);
            stop_vm(vm, task, stop).await
        }
    }
}

async fn stop_vm(vm: &mut Vm, task: &Task, stop: &StopSignal) -> Ending {
    let timeout = stop.kill_timeout(Duration::from_secs(task.kill_timeout_s.into()));
    vm.stop(task.graceful_shutdown, timeout).await
}

/// The medium for one boot: the cached ISO read-only, or a fresh overlay
/// over the cached disk (recreated for a relaunch, so a failed boot leaves
/// nothing behind in it).
async fn boot_medium(
    kind: ImageKind,
    image: &Path,
    task: &Task,
    dir: &TaskDir,
    owner: Option<(u32, u32)>,
) -> Result<BootMedium, LaunchError> {
    match kind {
        ImageKind::Iso => Ok(BootMedium::Cdrom {
            path: image.to_path_buf(),
        }),
        ImageKind::Disk(format) => {
            let overlay = dir.overlay();
            // The task directory may belong to qemu's unprivileged user, who
            // could plant a symlink where the overlay goes. So the overlay is
            // made and given away in a directory only we can write, and then
            // renamed into place: rename replaces whatever was planted and
            // follows no link.
            let task_dir_error = |path: &Path| {
                let path = path.to_path_buf();
                move |source| LaunchError::TaskDir { path, source }
            };
            let parent = dir.root.parent().unwrap_or(&dir.root);
            let private = tempfile::Builder::new()
                .prefix(".overlay-")
                .tempdir_in(parent)
                .map_err(task_dir_error(parent))?;
            let fresh = private.path().join("disk.qcow2");
            image::create_overlay(image, format, &fresh).await?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::lchown(&fresh, Some(uid), Some(gid))
                    .map_err(task_dir_error(&fresh))?;
            }
            std::fs::rename(&fresh, &overlay).map_err(task_dir_error(&overlay))?;
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

    #[tokio::test]
    async fn overlay_replaces_a_planted_symlink_and_leaves_its_target_alone() {
        let state = tempfile::tempdir().unwrap();
        let base = state.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let victim = state.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let dir = create_task_dir(state.path(), "disk").unwrap();
        std::os::unix::fs::symlink(&victim, dir.overlay()).unwrap();

        let task = task(Accelerator::Tcg, true);
        let medium = boot_medium(
            ImageKind::Disk(crate::qemu::cmdline::DiskFormat::Raw),
            &base,
            &task,
            &dir,
            None,
        )
        .await
        .unwrap();
        assert!(matches!(medium, BootMedium::Disk { ref path, .. } if *path == dir.overlay()));
        let meta = std::fs::symlink_metadata(dir.overlay()).unwrap();
        assert!(meta.file_type().is_file(), "the overlay is a real file now");
        assert_eq!(
            image::detect(&dir.overlay()).unwrap(),
            ImageKind::Disk(crate::qemu::cmdline::DiskFormat::Qcow2)
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        // No private scratch directory is left next to the task directories.
        let leftovers: Vec<_> = std::fs::read_dir(state.path().join("tasks"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".overlay-"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
