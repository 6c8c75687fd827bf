//! How the supervisor starts qemu: as its own child, or under a shim.

use std::path::PathBuf;

/// How qemu is started.
#[derive(Debug, Clone)]
pub enum SpawnMode {
    /// As our own child. With `die_with_parent` it is killed when we die
    /// (`run`, where nothing else would ever stop it).
    Direct { die_with_parent: bool },
    /// Under a shim in a session of its own, so that it outlives us and
    /// its exit status is kept (the agent).
    Shim(ShimSettings),
}

/// What the shim needs besides qemu's command line.
#[derive(Debug, Clone)]
pub struct ShimSettings {
    /// The `qemu-executor` binary that runs `shim`.
    pub exe: PathBuf,
    pub exit_record: PathBuf,
    pub cgroups: Vec<PathBuf>,
    pub mount_namespace: bool,
    /// Logs the shim copies while qemu runs.
    pub forwards: Vec<crate::qemu::forward::Forward>,
}
