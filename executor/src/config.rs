//! The operator's `executor.toml`: one section per concern, each with its
//! own defaults and validation.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::passthrough::{ArgsConfig, ArgsError};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub qemu: QemuConfig,
    #[serde(default)]
    pub args: ArgsConfig,
}

/// `[qemu]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuConfig {
    /// Default: `qemu-system-x86_64` on PATH.
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// qemu's seccomp sandbox (`-sandbox on,...`). Default true.
    #[serde(default = "default_true")]
    pub sandbox: bool,
    /// Under kvm, a guest silent on its serial console this long before it
    /// is ready is taken as hung by a broken KVM. Default 10; 0 disables.
    #[serde(default = "default_kvm_stall_s")]
    pub kvm_stall_s: u32,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: None,
            sandbox: true,
            kvm_stall_s: default_kvm_stall_s(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_kvm_stall_s() -> u32 {
    10
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read the configuration {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Configuration {} is invalid", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("Configuration {} is invalid", path.display())]
    Args {
        path: PathBuf,
        #[source]
        source: ArgsError,
    },
}

impl Config {
    /// Reads and validates `path`; no path means every default.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.args.validate().map_err(|source| ConfigError::Args {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_sections() {
        let c = Config::load(None).unwrap();
        assert!(c.qemu.sandbox);
        assert_eq!(c.qemu.kvm_stall_s, 10);
        assert!(!c.args.enabled);

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("executor.toml");
        std::fs::write(&p, "[qemu]\nsandbox = false\n[bogus]\nx = 1\n").unwrap();
        let err = Config::load(Some(&p)).unwrap_err();
        assert!(format!("{:?}", err).contains("bogus"), "{err:?}");

        std::fs::write(
            &p,
            "[args]\nenabled = true\n[args.allow]\n\"-drive\" = [\"file\"]\n",
        )
        .unwrap();
        assert!(matches!(
            Config::load(Some(&p)),
            Err(ConfigError::Args { .. })
        ));
    }
}
