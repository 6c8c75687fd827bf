//! The operator's configuration file (`--config executor.toml`), one
//! struct per section, each validating its own fields.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::fetch::{FetchConfig, FetchConfigError};
use crate::host::isolation::config::AgentConfig;
use crate::passthrough::{ArgsConfig, ArgsError};
use crate::policy::PolicySpec;
use crate::policy::config::PolicyConfig;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[[policy]]`: the policy chain, in the order the policies run.
    #[serde(default)]
    pub policy: Vec<PolicyConfig>,
    /// `[fetch]`: downloads into the image cache.
    #[serde(default)]
    pub fetch: FetchConfig,
    /// `[qemu]`: the binary and how it is confined.
    #[serde(default)]
    pub qemu: QemuConfig,
    /// `[args]`: the task `args` passthrough and its allowlist.
    #[serde(default)]
    pub args: ArgsConfig,
    /// `[agent]`: how agent mode confines its VMs.
    #[serde(default)]
    pub agent: AgentConfig,
    /// Directory of the file it was loaded from: relative paths inside it
    /// are relative to this.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[qemu]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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
    #[error("Cannot read the configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Invalid configuration file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error(transparent)]
    Fetch(#[from] FetchConfigError),
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error("Invalid setting policy[{index}].{problem}")]
    Policy { index: usize, problem: String },
    #[error("Invalid setting {0}")]
    Agent(String),
}

impl Config {
    pub fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.fetch.validate()?;
        self.args.validate()?;
        self.agent.validate().map_err(ConfigError::Agent)?;
        for (index, p) in self.policy.iter().enumerate() {
            p.validate()
                .map_err(|problem| ConfigError::Policy { index, problem })?;
        }
        Ok(())
    }

    /// The policy chain to load, relative modules resolved against the
    /// configuration file's directory.
    pub fn policy_specs(&self) -> Result<Vec<PolicySpec>, ConfigError> {
        self.policy
            .iter()
            .enumerate()
            .map(|(index, p)| {
                p.to_spec(&self.base_dir)
                    .map_err(|problem| ConfigError::Policy { index, problem })
            })
            .collect()
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        config.validate()?;
        Ok(config)
    }

    /// The file at `path` if one is given, else every default.
    pub fn load_or_default(path: Option<&Path>) -> Result<Config, ConfigError> {
        path.map_or_else(|| Ok(Config::default()), Config::load)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_means_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c, Config::default());
        assert!(c.qemu.sandbox);
        assert_eq!(c.qemu.kvm_stall_s, 10);
        assert!(!c.args.enabled);
    }

    #[test]
    fn fetch_section_and_unknown_sections() {
        let c = Config::parse("[fetch]\nmax_attempts = 3\nmax_image_size = \"1G\"\n").unwrap();
        assert_eq!(c.fetch.max_attempts, 3);
        assert_eq!(c.fetch.max_image_size.0, 1 << 30);
        let err = Config::parse("[fecth]\nmax_attempts = 3\n").unwrap_err();
        assert!(err.to_string().contains("fecth"), "{err}");
        let err = Config::parse("[qemu]\nsandbx = false\n").unwrap_err();
        assert!(err.to_string().contains("sandbx"), "{err}");
    }

    #[test]
    fn load_validates_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("executor.toml");
        std::fs::write(&path, "[fetch]\nmax_attempts = 0\n").unwrap();
        let err = Config::load(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid setting fetch.max_attempts: must be between 1 and 100"
        );
        std::fs::write(&path, "[fetch\n").unwrap();
        let err = Config::load(&path).unwrap_err();
        assert!(err.to_string().contains("executor.toml"), "{err}");
        let missing = Config::load(&dir.path().join("nope.toml")).unwrap_err();
        assert!(matches!(missing, ConfigError::Read { .. }));
    }

    #[test]
    fn load_resolves_modules_next_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("executor.toml");
        std::fs::write(
            &path,
            "[[policy]]\nmodule = \"policies/accel_fallback.wasm\"\n",
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        let specs = config.policy_specs().unwrap();
        assert_eq!(
            specs[0].module,
            dir.path().join("policies/accel_fallback.wasm")
        );

        std::fs::write(&path, "[[policy]]\nmodule = \"p.wasm\"\nsha256 = \"x\"\n").unwrap();
        let err = Config::load(&path).unwrap_err();
        assert!(err.to_string().contains("policy[0].sha256"), "{err}");
    }

    #[test]
    fn dangerous_passthrough_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("executor.toml");
        std::fs::write(
            &path,
            "[args]\nenabled = true\n[args.allow]\n\"-drive\" = [\"file\"]\n",
        )
        .unwrap();
        assert!(matches!(Config::load(&path), Err(ConfigError::Args(_))));
    }
}
