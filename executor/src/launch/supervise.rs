//! Step 4: from a prepared task to a VM that ran and ended, or from an
//! adopted VM to its end. The boot medium, the accelerator's fallback and
//! the stop are decided here; the VM itself is a [`Machine`].

use std::path::Path;
use std::time::{Duration, Instant};

use policy_sdk::{Accelerator, Task};

use super::{Event, LaunchError, Pipeline, Placement, Prepared, Seam};
use crate::qemu::cmdline::{BootMedium, Confinement, DiskFormat};
use crate::qemu::image::{self, ImageKind};
use crate::vm::{
    Boot, BootWatch, Ending, Launch, Machine, ShimSettings, SpawnMode, StopSignal, TaskDir,
};

/// The shortest boot watch an adopted, still booting VM gets.
const MIN_BOOT_LEFT: Duration = Duration::from_secs(5);

/// Where an adopted VM was in its life when its supervisor went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Still booting: watch its ports for what is left of the timeout.
    Booting { left: Duration },
    /// Ready: only its end is left to wait for.
    Ready,
    /// Being stopped: stop it again (the request died with its requester).
    Stopping,
}

impl Phase {
    /// A booting VM started at `started_at_ms`: what is left of its ready
    /// timeout, and never less than a few seconds.
    pub fn booting(ready_timeout_s: u32, started_at_ms: u64, now_ms: u64) -> Phase {
        let timeout = Duration::from_secs(ready_timeout_s.into());
        let spent = Duration::from_millis(now_ms.saturating_sub(started_at_ms));
        Phase::Booting {
            left: timeout.saturating_sub(spent).max(MIN_BOOT_LEFT),
        }
    }
}

impl<S: Seam> Pipeline<S> {
    /// Boots the prepared task (relaunching it once under tcg if KVM fails
    /// the guest and the task allows it), then waits until it ends or `stop`
    /// fires, and stops it.
    pub async fn launch(
        &self,
        prepared: &Prepared,
        placement: &Placement,
        stop: &StopSignal,
        on_event: &mut (impl FnMut(Event<'_>) + Send),
    ) -> Result<Ending, LaunchError> {
        let task = &prepared.admitted.task;
        let dir = &placement.dir;
        let mut accelerator = prepared.plan.accelerator;
        let kind = image::detect(&prepared.image.path)?;
        let spawn = spawn_mode(self, prepared, placement);
        loop {
            let medium = boot_medium(self, kind, &prepared.image.path, task, dir).await?;
            let started = Instant::now();
            let vm = self
                .seam
                .start(Launch {
                    qemu: &prepared.plan.qemu.binary,
                    task,
                    accelerator,
                    medium,
                    dir,
                    extra_args: &prepared.admitted.extra_args,
                    confinement: confinement(self, dir),
                    spawn: &spawn,
                })
                .await?;
            announce_start(self, &vm, accelerator, dir, on_event);
            let watch = Watch {
                accelerator,
                ready_timeout: Duration::from_secs(task.ready_timeout_s.into()),
                started,
                qemu_version: Some(prepared.plan.qemu.version.as_str()),
            };
            match supervise(self, vm, task, watch, stop, on_event).await {
                Ending::KvmUnusable { reason } if task.kvm_fallback => {
                    on_event(Event::KvmFallback { reason: &reason });
                    accelerator = Accelerator::Tcg;
                }
                ending => return Ok(ending),
            }
        }
    }
}

fn announce_start<S: Seam>(
    pipeline: &Pipeline<S>,
    vm: &S::Vm,
    accelerator: Accelerator,
    dir: &TaskDir,
    on_event: &mut (impl FnMut(Event<'_>) + Send),
) {
    if let Some(detached) = &pipeline.detached
        && let Err(e) = detached.isolation.hand_over_qmp_socket(&dir.root)
    {
        tracing::warn!(task = %dir.key(), error = %crate::error_chain(&e), "cannot hand the QMP socket to the VM's user");
    }
    let identity = vm.identity();
    on_event(Event::Started {
        pid: identity.pid,
        accelerator,
        dir: &dir.root,
        identity,
        shim: vm.shim(),
    });
}

fn spawn_mode<S: Seam>(
    pipeline: &Pipeline<S>,
    prepared: &Prepared,
    placement: &Placement,
) -> SpawnMode {
    match (&pipeline.detached, &placement.exit_record) {
        (Some(detached), Some(exit_record)) => SpawnMode::Shim(ShimSettings {
            exe: detached.exe.clone(),
            exit_record: exit_record.clone(),
            cgroups: prepared.cgroups.clone(),
            mount_namespace: detached.isolation.mount_namespace,
            forwards: placement.forwards.clone(),
        }),
        _ => SpawnMode::Direct,
    }
}

fn confinement<S: Seam>(pipeline: &Pipeline<S>, dir: &TaskDir) -> Confinement {
    let isolation = pipeline.detached.as_ref().map(|d| &d.isolation);
    Confinement {
        sandbox: pipeline.config.qemu.sandbox,
        chroot: isolation.filter(|i| i.chroot).map(|_| dir.root.clone()),
        runas: isolation
            .and_then(|i| i.user.as_ref())
            .map(|u| u.name.clone()),
    }
}

impl<S: Seam> Pipeline<S> {
    /// Carries on supervising an adopted VM from the phase it was in. A KVM
    /// failure seen now ends it: a relaunch is the restart policy's.
    pub async fn resume(
        &self,
        mut vm: S::Vm,
        task: &Task,
        accelerator: Accelerator,
        phase: Phase,
        stop: &StopSignal,
        on_event: &mut (impl FnMut(Event<'_>) + Send),
    ) -> Ending {
        match phase {
            Phase::Stopping => {
                on_event(Event::Stopping);
                stop_vm(&mut vm, task, stop).await
            }
            Phase::Ready => run_until_end(&mut vm, task, stop, on_event).await,
            Phase::Booting { left } => {
                let watch = Watch {
                    accelerator,
                    ready_timeout: left,
                    started: Instant::now(),
                    qemu_version: None,
                };
                supervise(self, vm, task, watch, stop, on_event).await
            }
        }
    }
}

struct Watch<'a> {
    accelerator: Accelerator,
    ready_timeout: Duration,
    /// When this launch began, for the time to ready.
    started: Instant,
    /// For the KVM verdict, which is kept per qemu version.
    qemu_version: Option<&'a str>,
}

/// Watches the boot, then waits for the end or a stop. A KVM failure
/// ends it as [`Ending::KvmUnusable`], with qemu stopped and the verdict
/// recorded: a relaunch under tcg is the caller's to decide.
async fn supervise<S: Seam>(
    pipeline: &Pipeline<S>,
    mut vm: S::Vm,
    task: &Task,
    watch: Watch<'_>,
    stop: &StopSignal,
    on_event: &mut (impl FnMut(Event<'_>) + Send),
) -> Ending {
    let under_kvm = watch.accelerator == Accelerator::Kvm;
    let boot_watch = BootWatch {
        ports: &task.ports,
        ready_serial: task.ready_serial.as_deref(),
        ready_timeout: watch.ready_timeout,
        under_kvm,
        kvm_stall: pipeline.kvm_stall().filter(|_| under_kvm),
    };
    let mut on_port = |port: &policy_sdk::PortMapping| on_event(Event::PortReady(port));
    let boot = vm.boot(&boot_watch, stop.token(), &mut on_port).await;
    match boot {
        Boot::Ready => {
            on_event(Event::Ready {
                after: watch.started.elapsed(),
            });
            run_until_end(&mut vm, task, stop, on_event).await
        }
        Boot::KvmFailed(reason) => {
            tracing::warn!(task = %task.name, %reason, "KVM failed this guest");
            vm.stop(false, Duration::ZERO).await;
            pipeline
                .seam
                .record_kvm_failure(&reason, watch.qemu_version);
            Ending::KvmUnusable { reason }
        }
        Boot::Ended(ending) => ending,
        Boot::NotReady => {
            on_event(Event::Stopping);
            vm.stop(false, Duration::ZERO).await;
            Ending::NotReady {
                after: watch.ready_timeout,
            }
        }
        Boot::Cancelled => {
            on_event(Event::Stopping);
            stop_vm(&mut vm, task, stop).await
        }
    }
}

async fn run_until_end(
    vm: &mut impl Machine,
    task: &Task,
    stop: &StopSignal,
    on_event: &mut (impl FnMut(Event<'_>) + Send),
) -> Ending {
    match vm.wait(stop.token()).await {
        Some(ending) => ending,
        None => {
            on_event(Event::Stopping);
            stop_vm(vm, task, stop).await
        }
    }
}

async fn stop_vm(vm: &mut impl Machine, task: &Task, stop: &StopSignal) -> Ending {
    let timeout = stop.kill_timeout(Duration::from_secs(task.kill_timeout_s.into()));
    vm.stop(task.graceful_shutdown, timeout).await
}

/// The medium for one boot: the cached ISO read-only, or a fresh overlay
/// over the cached disk (recreated for a relaunch, so a failed boot leaves
/// nothing behind in it).
pub(super) async fn boot_medium<S: Seam>(
    pipeline: &Pipeline<S>,
    kind: ImageKind,
    image: &Path,
    task: &Task,
    dir: &TaskDir,
) -> Result<BootMedium, LaunchError> {
    let format = match kind {
        ImageKind::Iso => {
            return Ok(BootMedium::Cdrom {
                path: image.to_path_buf(),
            });
        }
        ImageKind::Disk(format) => format,
    };
    let overlay = dir.overlay();
    // The task directory may belong to qemu's unprivileged user, who could
    // plant a symlink where the overlay goes. So the overlay is made and
    // given away in a directory only we can write, and then renamed into
    // place: rename replaces whatever was planted and follows no link.
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
    pipeline.seam.create_overlay(image, format, &fresh).await?;
    let owner = pipeline
        .detached
        .as_ref()
        .and_then(|d| d.isolation.user.as_ref())
        .map(|u| (u.uid, u.gid));
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(&fresh, Some(uid), Some(gid)).map_err(task_dir_error(&fresh))?;
    }
    std::fs::rename(&fresh, &overlay).map_err(task_dir_error(&overlay))?;
    Ok(BootMedium::Disk {
        path: overlay,
        format: DiskFormat::Qcow2,
        interface: task.drive_interface,
    })
}
