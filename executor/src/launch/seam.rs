//! Where the pipeline meets the world: the host's facts, the policy
//! sandbox, the image cache, and qemu's processes. [`super::LiveSeam`] is
//! the real one; the unit tests bring their own.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitStatus;

use policy_sdk::{Checksum, HostFacts, Task};

use super::LaunchError;
use crate::cache::CacheError;
use crate::fetch::{FetchError, Fetched, ProgressObserver};
use crate::host::probe::{FingerprintError, QemuInfo};
use crate::policy::ChainOutcome;
use crate::qemu::process::ProcessIdentity;
use crate::vm::{Launch, Machine, SuperviseError, TaskDir};

pub trait Seam: Send + Sync {
    /// A running VM.
    type Vm: Machine;

    /// What policies see of this host.
    fn facts(&self) -> impl Future<Output = HostFacts> + Send;

    /// The operator's policy chain on `task`.
    fn evaluate(&self, task: Task, facts: &HostFacts) -> impl Future<Output = ChainOutcome> + Send;

    /// The qemu binary, its version and accelerators.
    fn qemu(&self) -> impl Future<Output = Result<QemuInfo, FingerprintError>> + Send;

    /// Fetches the image into the cache and leases it to `holder` (the
    /// task directory's name) until [`Seam::release_lease`]; a `file://`
    /// source may also be read from `file_dir`.
    fn fetch(
        &self,
        source: &str,
        checksum: &Checksum,
        holder: &str,
        file_dir: Option<&std::path::Path>,
        progress: Option<ProgressObserver>,
    ) -> impl Future<Output = Result<Fetched, FetchError>> + Send;

    /// Leases a cached image again for `holder`, after a restart.
    fn renew_lease(&self, checksum: &Checksum, holder: &str) -> Result<(), CacheError>;

    fn release_lease(&self, checksum: &Checksum, holder: &str) -> Result<(), CacheError>;

    /// Creates the copy-on-write overlay of a disk image.
    fn create_overlay(
        &self,
        image: &std::path::Path,
        format: crate::qemu::cmdline::DiskFormat,
        overlay: &std::path::Path,
    ) -> impl Future<Output = Result<(), crate::qemu::image::ImageError>> + Send;

    /// Starts qemu as `launch` says and connects to its QMP socket.
    fn start(
        &self,
        launch: Launch<'_>,
    ) -> impl Future<Output = Result<Self::Vm, SuperviseError>> + Send;

    /// Takes back a VM an earlier process started under a shim.
    fn adopt(&self, found: &Found) -> impl Future<Output = Adoption<Self::Vm>> + Send;

    /// Remembers that KVM failed a real guest, for the facts to come.
    fn record_kvm_failure(&self, reason: &str, qemu_version: Option<&str>);
}

/// A VM an earlier process started, as it recorded it.
#[derive(Debug, Clone)]
pub struct Found {
    pub qemu: ProcessIdentity,
    pub shim: ProcessIdentity,
    pub exit_record: PathBuf,
    pub dir: TaskDir,
}

/// What became of a VM an earlier process started.
#[derive(Debug)]
pub enum Adoption<V> {
    /// Running, and connected to again.
    Running(V),
    /// It ended while nobody watched; its shim recorded qemu's status.
    EndedMeanwhile {
        status: ExitStatus,
        ended_at_ms: u64,
    },
    /// Gone without a record, or alive but deaf (and killed, since it
    /// could be neither watched nor stopped gracefully).
    Lost(LaunchError),
}
