//! `[agent]` in executor.toml: how the agent confines its VMs.

use serde::Deserialize;

/// Default headroom over the guest's memory in each VM's memory limit.
///
/// Measured on qemu 7.2 with the 256 MiB test guest under TCG: qemu's own
/// mappings (binary, heap, device models, slirp) hold about 35 MiB, and
/// the TCG translation cache had 57 MiB resident right after boot; it
/// grows with the guest's working set of code, up to its 1 GiB mapping.
/// The original driver's limit of guest RAM alone left none of that, and
/// its VMs were OOM-killed. 384 MiB is four times the overhead measured
/// under TCG (and ten times qemu's own under KVM, where there is no
/// translation cache), while still bounding a runaway qemu.
pub const DEFAULT_MEMORY_HEADROOM_MB: u32 = 384;

/// `[agent]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The unprivileged user qemu runs as (`-runas`) when the agent runs
    /// as root. Unset: qemu runs as root, and the agent says so.
    #[serde(default)]
    pub user: Option<String>,
    /// Memory limit of each VM's cgroup = guest memory + this. Default 384.
    #[serde(default = "default_headroom")]
    pub memory_headroom_mb: u32,
    /// Put each VM in its own cgroup (as root). Default true.
    #[serde(default = "default_true")]
    pub cgroups: bool,
    /// Name of the cgroup that holds the VMs' cgroups. Default
    /// "qemu-executor".
    #[serde(default = "default_cgroup_parent")]
    pub cgroup_parent: String,
    /// `-chroot` qemu into its task directory (as root). Default true.
    #[serde(default = "default_true")]
    pub chroot: bool,
    /// Start qemu in a private mount namespace (as root). Default true.
    #[serde(default = "default_true")]
    pub mount_namespace: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            user: None,
            memory_headroom_mb: DEFAULT_MEMORY_HEADROOM_MB,
            cgroups: true,
            cgroup_parent: default_cgroup_parent(),
            chroot: true,
            mount_namespace: true,
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_headroom() -> u32 {
    DEFAULT_MEMORY_HEADROOM_MB
}

fn default_cgroup_parent() -> String {
    "qemu-executor".to_string()
}

impl AgentConfig {
    /// Checks each field; the error names it.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(user) = &self.user {
            let ok = !user.is_empty()
                && user.len() <= 32
                && !user.starts_with('-')
                && user
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
            if !ok {
                return Err(format!(
                    "agent.user: {user:?} is not a user name (letters, digits, '-', '_', '.')"
                ));
            }
        }
        if self.memory_headroom_mb < 64 {
            return Err(
                "agent.memory_headroom_mb: must be at least 64 (qemu itself needs ~35 MiB)".into(),
            );
        }
        let parent = &self.cgroup_parent;
        if parent.is_empty()
            || parent == "."
            || parent == ".."
            || !parent
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(format!(
                "agent.cgroup_parent: {parent:?} must be one directory name"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_field_errors() {
        let c: AgentConfig = toml::from_str("").unwrap();
        assert_eq!(c, AgentConfig::default());
        assert!(c.validate().is_ok());
        let c: AgentConfig = toml::from_str("user = \"qemu-executor\"").unwrap();
        assert!(c.validate().is_ok());
        for (text, field) in [
            ("user = \"-x\"", "agent.user"),
            ("user = \"a b\"", "agent.user"),
            ("memory_headroom_mb = 10", "agent.memory_headroom_mb"),
            ("cgroup_parent = \"../x\"", "agent.cgroup_parent"),
        ] {
            let c: AgentConfig = toml::from_str(text).unwrap();
            let err = c.validate().unwrap_err();
            assert!(err.starts_with(field), "{text}: {err}");
        }
        assert!(toml::from_str::<AgentConfig>("usr = \"x\"").is_err());
    }
}
