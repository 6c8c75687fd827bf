//! Where the executor keeps things when the operator does not say: the
//! XDG base directories for a user, the FHS places for root.

use std::path::PathBuf;

/// `$XDG_STATE_HOME/qemu-executor` (`~/.local/state/qemu-executor`); as
/// root `/var/lib/qemu-executor`.
pub fn default_state_dir() -> PathBuf {
    dir_for(&Base::STATE, Env::current(Base::STATE.xdg_var))
}

/// `$XDG_CACHE_HOME/qemu-executor` (`~/.cache/qemu-executor`); as root
/// `/var/cache/qemu-executor`, where system services keep their caches.
pub fn default_cache_dir() -> PathBuf {
    dir_for(&Base::CACHE, Env::current(Base::CACHE.xdg_var))
}

/// Where the agent listens unless told: `/run/qemu-executor.sock` as
/// root, else `$XDG_RUNTIME_DIR/qemu-executor.sock` (or a per-user name in
/// the temp dir when that is unset).
pub fn default_socket() -> PathBuf {
    socket_for(
        nix::unistd::geteuid().is_root(),
        std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
        nix::unistd::geteuid().as_raw(),
    )
}

fn socket_for(is_root: bool, runtime_dir: Option<PathBuf>, uid: u32) -> PathBuf {
    if is_root {
        return PathBuf::from("/run/qemu-executor.sock");
    }
    match runtime_dir.filter(|p| p.is_absolute()) {
        Some(dir) => dir.join("qemu-executor.sock"),
        None => std::env::temp_dir().join(format!("qemu-executor-{uid}.sock")),
    }
}

struct Base {
    system: &'static str,
    xdg_var: &'static str,
    home_relative: &'static str,
    temp_name: &'static str,
}

impl Base {
    const STATE: Base = Base {
        system: "/var/lib/qemu-executor",
        xdg_var: "XDG_STATE_HOME",
        home_relative: ".local/state",
        temp_name: "state",
    };
    const CACHE: Base = Base {
        system: "/var/cache/qemu-executor",
        xdg_var: "XDG_CACHE_HOME",
        home_relative: ".cache",
        temp_name: "cache",
    };
}

struct Env {
    is_root: bool,
    xdg: Option<PathBuf>,
    home: Option<PathBuf>,
    uid: u32,
}

impl Env {
    fn current(xdg_var: &str) -> Env {
        Env {
            is_root: nix::unistd::geteuid().is_root(),
            xdg: std::env::var_os(xdg_var).map(PathBuf::from),
            home: std::env::var_os("HOME").map(PathBuf::from),
            uid: nix::unistd::geteuid().as_raw(),
        }
    }
}

fn dir_for(base: &Base, env: Env) -> PathBuf {
    if env.is_root {
        return PathBuf::from(base.system);
    }
    // The XDG spec says relative values are invalid and must be ignored.
    if let Some(xdg) = env.xdg.filter(|p| p.is_absolute()) {
        return xdg.join("qemu-executor");
    }
    match env.home.filter(|p| p.is_absolute()) {
        Some(home) => home.join(base.home_relative).join("qemu-executor"),
        None => std::env::temp_dir().join(format!("qemu-executor-{}-{}", base.temp_name, env.uid)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(is_root: bool, xdg: Option<&str>, home: Option<&str>) -> Env {
        Env {
            is_root,
            xdg: xdg.map(PathBuf::from),
            home: home.map(PathBuf::from),
            uid: 1000,
        }
    }

    #[test]
    fn socket_defaults() {
        assert_eq!(
            socket_for(true, Some("/run/user/0".into()), 0),
            PathBuf::from("/run/qemu-executor.sock")
        );
        assert_eq!(
            socket_for(false, Some("/run/user/1000".into()), 1000),
            PathBuf::from("/run/user/1000/qemu-executor.sock")
        );
        assert_eq!(
            socket_for(false, None, 1000),
            std::env::temp_dir().join("qemu-executor-1000.sock")
        );
    }

    #[test]
    fn xdg_then_home_and_root_uses_the_system_dirs() {
        let home = Some("/home/u");
        assert_eq!(
            dir_for(&Base::CACHE, env(true, Some("/x/cache"), home)),
            PathBuf::from("/var/cache/qemu-executor")
        );
        assert_eq!(
            dir_for(&Base::STATE, env(true, None, home)),
            PathBuf::from("/var/lib/qemu-executor")
        );
        assert_eq!(
            dir_for(&Base::CACHE, env(false, Some("/x/cache"), home)),
            PathBuf::from("/x/cache/qemu-executor")
        );
        assert_eq!(
            dir_for(&Base::CACHE, env(false, Some("rel"), home)),
            PathBuf::from("/home/u/.cache/qemu-executor")
        );
        assert_eq!(
            dir_for(&Base::STATE, env(false, None, home)),
            PathBuf::from("/home/u/.local/state/qemu-executor")
        );
        assert_eq!(
            dir_for(&Base::STATE, env(false, None, None)),
            std::env::temp_dir().join("qemu-executor-state-1000")
        );
    }
}
