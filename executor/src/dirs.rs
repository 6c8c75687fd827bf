//! Where the executor keeps its state when the operator does not say.

use std::path::PathBuf;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

/// `$XDG_STATE_HOME/qemu-executor` (`~/.local/state/qemu-executor`), or
/// `/var/lib/qemu-executor` as root.
pub fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/qemu-executor");
    }
    std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map_or_else(|| home().join(".local/state"), PathBuf::from)
        .join("qemu-executor")
}

/// `$XDG_CACHE_HOME/qemu-executor` (`~/.cache/qemu-executor`), or
/// `/var/cache/qemu-executor` as root.
pub fn default_cache_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/cache/qemu-executor");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map_or_else(|| home().join(".cache"), PathBuf::from)
        .join("qemu-executor")
}
