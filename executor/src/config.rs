//! The operator's configuration file, `executor.toml`: one struct per
//! section, unknown keys refused.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::policy::PolicySpec;
use crate::policy::config::PolicyConfig;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The policy chain, in the order the policies run.
    #[serde(default)]
    pub policy: Vec<PolicyConfig>,
    /// Directory of the file it was loaded from: relative paths inside it
    /// are relative to this.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read configuration file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Configuration file {} is not valid", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("Configuration file {}: policy[{index}].{problem}", path.display())]
    Policy {
        path: PathBuf,
        index: usize,
        problem: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        config
            .validate()
            .map_err(|(index, problem)| ConfigError::Policy {
                path: path.to_path_buf(),
                index,
                problem,
            })?;
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The first problem found, as the index of the `[[policy]]` entry and
    /// the field with its problem.
    pub fn validate(&self) -> Result<(), (usize, String)> {
        for (i, p) in self.policy.iter().enumerate() {
            p.validate().map_err(|problem| (i, problem))?;
        }
        Ok(())
    }

    /// The policy chain to load, relative modules resolved against the
    /// configuration file's directory.
    pub fn policy_specs(&self) -> Result<Vec<PolicySpec>, (usize, String)> {
        self.policy
            .iter()
            .enumerate()
            .map(|(i, p)| p.to_spec(&self.base_dir).map_err(|problem| (i, problem)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_has_no_policies() {
        assert!(Config::parse("").unwrap().policy.is_empty());
    }

    #[test]
    fn unknown_section_is_named() {
        let err = Config::parse("[polcy]\n").unwrap_err();
        assert!(err.to_string().contains("polcy"), "{err}");
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
}
