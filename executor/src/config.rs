//! The operator's configuration file (`--config executor.toml`), one
//! struct per section, each validating its own fields.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fetch::{FetchConfig, FetchConfigError};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[fetch]`: downloads into the image cache.
    #[serde(default)]
    pub fetch: FetchConfig,
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
}

impl Config {
    pub fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.fetch.validate()?;
        Ok(())
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
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
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn fetch_section_and_unknown_sections() {
        let c = Config::parse("[fetch]\nmax_attempts = 3\nmax_image_size = \"1G\"\n").unwrap();
        assert_eq!(c.fetch.max_attempts, 3);
        assert_eq!(c.fetch.max_image_size.0, 1 << 30);
        let err = Config::parse("[fecth]\nmax_attempts = 3\n").unwrap_err();
        assert!(err.to_string().contains("fecth"), "{err}");
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
}
