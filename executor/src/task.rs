//! Task files: reading them from disk. Their raw form, the defaults and the
//! validation live in `policy_sdk::taskfile`, shared with policies and their
//! tests, and are re-exported here.

use std::path::{Path, PathBuf};

use policy_sdk::Task;

pub use policy_sdk::taskfile::{
    DEFAULT_CPUS, DEFAULT_HOST_IP, DEFAULT_KILL_TIMEOUT_S, DEFAULT_MACHINE_TYPE, DEFAULT_MEMORY_MB,
    DEFAULT_READY_TIMEOUT_S, FieldError, FieldErrors, PortFile, RestartFile, TaskFile, check_name,
    validate,
};

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("Cannot read task file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Task file {} is neither .toml nor .json", path.display())]
    UnknownFormat { path: PathBuf },
    #[error("Task file {} is not valid TOML for a task", path.display())]
    Toml {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("Task file {} is not valid JSON for a task", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("Invalid task: {0}")]
    Invalid(FieldErrors),
}

/// Reads a task file, TOML or JSON by extension, and returns the validated task.
pub fn load(path: &Path) -> Result<Task, TaskError> {
    let text = std::fs::read_to_string(path).map_err(|source| TaskError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file = match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => parse_toml(&text).map_err(|source| TaskError::Toml {
            path: path.to_path_buf(),
            source,
        })?,
        Some("json") => parse_json(&text).map_err(|source| TaskError::Json {
            path: path.to_path_buf(),
            source,
        })?,
        _ => {
            return Err(TaskError::UnknownFormat {
                path: path.to_path_buf(),
            });
        }
    };
    file.into_task().map_err(TaskError::Invalid)
}

pub fn parse_toml(text: &str) -> Result<TaskFile, toml::de::Error> {
    toml::from_str(text)
}

pub fn parse_json(text: &str) -> Result<TaskFile, serde_json::Error> {
    serde_json::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MD5: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn load_by_extension() {
        let dir = tempfile::tempdir().unwrap();
        let toml_path = dir.path().join("t.toml");
        std::fs::write(
            &toml_path,
            format!("name = \"web\"\nimage_source = \"http://h/x\"\nchecksum = \"{MD5}\"\nhost_port = 1\nguest_port = 2\n"),
        )
        .unwrap();
        assert_eq!(load(&toml_path).unwrap().name, "web");
        let yaml = dir.path().join("t.yaml");
        std::fs::write(&yaml, "name: web").unwrap();
        assert!(matches!(load(&yaml), Err(TaskError::UnknownFormat { .. })));
        assert!(matches!(
            load(&dir.path().join("missing.toml")),
            Err(TaskError::Read { .. })
        ));
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{").unwrap();
        assert!(matches!(load(&bad), Err(TaskError::Json { .. })));
    }
}
