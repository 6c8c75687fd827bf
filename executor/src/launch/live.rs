//! The real seam: this host's probe, the operator's policy chain, the
//! image cache, and qemu processes.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use policy_sdk::{Checksum, HostFacts, Task};

use super::LaunchError;
use super::seam::{Adoption, Found, Seam};
use crate::cache::{Cache, CacheError};
use crate::fetch::{FetchError, Fetched, Fetcher, ProgressObserver};
use crate::host::probe::{FingerprintError, Probe, QemuInfo};
use crate::host::verdict;
use crate::policy::{Chain, ChainOutcome};
use crate::qemu::cmdline::DiskFormat;
use crate::qemu::image::{self, ImageError};
use crate::qemu::process::VmProcess;
use crate::qemu::shim::{AdoptError, ExitRecord, ShimmedQemu};
use crate::vm::{Launch, SuperviseError, Vm};

/// How long a VM killed because it could not be taken back gets to go.
const KILL_WAIT: Duration = Duration::from_secs(10);

pub struct LiveSeam {
    pub probe: Probe,
    pub chain: Chain,
    pub fetcher: Fetcher,
    pub cache: Cache,
}

impl Seam for LiveSeam {
    type Vm = Vm;

    async fn facts(&self) -> HostFacts {
        self.probe.host_facts().await
    }

    async fn evaluate(&self, task: Task, facts: &HostFacts) -> ChainOutcome {
        self.chain.evaluate(task, facts).await
    }

    async fn qemu(&self) -> Result<QemuInfo, FingerprintError> {
        self.probe.qemu().await
    }

    async fn fetch(
        &self,
        source: &str,
        checksum: &Checksum,
        holder: &str,
        file_dir: Option<&Path>,
        progress: Option<ProgressObserver>,
    ) -> Result<Fetched, FetchError> {
        let mut fetcher = match progress {
            Some(observer) => self.fetcher.observed(observer),
            None => self.fetcher.clone(),
        };
        if let Some(dir) = file_dir {
            fetcher = fetcher.granting(dir);
        }
        // The lease stays on disk when its handle drops, until
        // `release_lease`: a VM outlives the call that fetched its image.
        let (fetched, _lease) = fetcher
            .fetch_leased(&self.cache, source, checksum, holder, std::process::id())
            .await?;
        Ok(fetched)
    }

    fn renew_lease(&self, checksum: &Checksum, holder: &str) -> Result<(), CacheError> {
        if self.cache.lookup(checksum)?.is_some() {
            self.cache.lease(checksum, holder, std::process::id())?;
        }
        Ok(())
    }

    fn release_lease(&self, checksum: &Checksum, holder: &str) -> Result<(), CacheError> {
        self.cache.release_lease(checksum, holder).map(|_| ())
    }

    async fn create_overlay(
        &self,
        image: &Path,
        format: DiskFormat,
        overlay: &Path,
    ) -> Result<(), ImageError> {
        image::create_overlay(image, format, overlay).await
    }

    async fn start(&self, launch: Launch<'_>) -> Result<Vm, SuperviseError> {
        launch.start().await
    }

    async fn adopt(&self, found: &Found) -> Adoption<Vm> {
        let shimmed = match ShimmedQemu::adopt(found.qemu, found.shim, found.exit_record.clone()) {
            Ok(shimmed) => shimmed,
            Err(AdoptError::ShimGone(_)) => return ended_meanwhile(found),
            Err(e) => return Adoption::Lost(LaunchError::Watch(e)),
        };
        match Vm::adopt(VmProcess::Shimmed(shimmed), found.dir.clone()).await {
            Ok(vm) => Adoption::Running(vm),
            Err(e) => {
                // Alive but deaf: it can be neither watched nor stopped
                // gracefully, so it goes.
                tracing::error!(pid = found.qemu.pid, error = %crate::error_chain(&e), "cannot reconnect to the VM; killing it");
                if let Ok(mut process) =
                    ShimmedQemu::adopt(found.qemu, found.shim, found.exit_record.clone())
                {
                    process.signal_group(Signal::SIGKILL);
                    let _ = tokio::time::timeout(KILL_WAIT, process.wait()).await;
                }
                Adoption::Lost(LaunchError::Reconnect(e))
            }
        }
    }

    fn record_kvm_failure(&self, reason: &str, qemu_version: Option<&str>) {
        if let Err(e) = verdict::record(&self.probe.state_dir, reason, qemu_version) {
            tracing::warn!(error = %crate::error_chain(&e), "cannot remember the KVM verdict");
        }
    }
}

/// The shim is gone: its record says how qemu ended. Without a record,
/// qemu is checked, and killed if it outlived its shim, before it is
/// reported gone.
fn ended_meanwhile(found: &Found) -> Adoption<Vm> {
    match ExitRecord::read(&found.exit_record) {
        Some(record) if record.qemu_pid == found.qemu.pid => Adoption::EndedMeanwhile {
            status: record.status(),
            ended_at_ms: record.ended_at_ms,
        },
        _ => {
            if found.qemu.is_alive() {
                tracing::warn!(pid = found.qemu.pid, "qemu outlived its shim; killing it");
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(found.qemu.pid as i32),
                    Signal::SIGKILL,
                );
            }
            Adoption::Lost(LaunchError::ShimKilled)
        }
    }
}
