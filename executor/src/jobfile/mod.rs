//! Job files of the cluster scheduler: its HCL `job` with a `driver =
//! "qemu"` task, in either generation of that driver's config, read into
//! our task.
//!
//! A job file never bypasses the task file: the mapping builds a
//! [`TaskFile`](crate::task::TaskFile) and runs its own defaults and
//! validation, so a job file yields only tasks a task file could. The
//! field-by-field mapping and its defaults are documented in
//! `docs/jobfile.md`; each of their fields is read in exactly one place
//! here (`mapping`, `image`, `ports`, `select`).
//!
//! [`load_task`] is the one entry point that reads any task source, task
//! file or job file, by its extension.

mod hcl;
mod image;
mod mapping;
mod ports;
mod render;
mod select;

use std::fmt;
use std::path::{Path, PathBuf};

use policy_sdk::Task;

use crate::task::TaskError;

pub use render::{converted_file, to_toml};

/// A field of the job that is ignored here, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub line: usize,
    pub field: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.field, self.message)
    }
}

/// A field of the job that cannot run here, with where it is and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub field: String,
    pub problem: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.field, self.problem)
    }
}

/// Every problem of a job, so that one pass fixes them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "{} problems:", many.len())?;
                for p in many {
                    write!(f, "\n    {p}")?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("Malformed HCL at line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{0}")]
    Problems(Problems),
    #[error("Job {job:?} has no task with driver = \"qemu\" (its tasks: {others})")]
    NoQemuTask { job: String, others: String },
    #[error("Job {job:?} has {count} qemu tasks ({candidates}): choose one with --task NAME")]
    AmbiguousTask {
        job: String,
        count: usize,
        candidates: String,
    },
    #[error("Job {job:?} has no qemu task {name:?} (its qemu tasks: {candidates})")]
    TaskNotFound {
        job: String,
        name: String,
        candidates: String,
    },
}

impl JobError {
    fn problems(list: Vec<Problem>) -> Self {
        JobError::Problems(Problems(list))
    }
}

/// A job's qemu task as our task, with what was ignored on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    pub task: Task,
    pub warnings: Vec<Warning>,
    /// Where the task came from: job, group and task names.
    pub job: String,
    pub group: String,
    pub task_name: String,
}

/// Reads a job file's text and maps its qemu task (the only one, or the
/// one named `GROUP/TASK` or `TASK`) onto our task. Pure.
pub fn convert(text: &str, task_name: Option<&str>) -> Result<Converted, JobError> {
    let file = hcl::parse(text).map_err(|e| JobError::Syntax {
        line: e.line,
        column: e.column,
        message: e.message,
    })?;
    select::convert(&file, task_name)
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("Cannot read job file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot use job file {}", path.display())]
    Job {
        path: PathBuf,
        #[source]
        source: JobError,
    },
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error("{} is neither a task file (.toml, .json) nor a job file (.hcl, .nomad)", path.display())]
    UnknownFormat { path: PathBuf },
    #[error("--task {name} picks a task of a job file; {} is a task file", path.display())]
    TaskNameForTaskFile { path: PathBuf, name: String },
}

/// A task read from a task file or a job file, with the job's ignored
/// fields (none for a task file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub task: Task,
    pub warnings: Vec<Warning>,
    /// Set when the task came out of a job file.
    pub origin: Option<Origin>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub job: String,
    pub group: String,
    pub task: String,
}

/// What kind of file a path is, by its extension.
fn is_job_file(path: &Path) -> Option<bool> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("hcl" | "nomad") => Some(true),
        Some("toml" | "json") => Some(false),
        _ => None,
    }
}

/// Reads a task file (`.toml`, `.json`) or a job file (`.hcl`, `.nomad`)
/// and returns the validated task with the job's warnings.
pub fn load(path: &Path, task_name: Option<&str>) -> Result<Loaded, LoadError> {
    match is_job_file(path) {
        None => Err(LoadError::UnknownFormat {
            path: path.to_path_buf(),
        }),
        Some(false) => {
            if let Some(name) = task_name {
                return Err(LoadError::TaskNameForTaskFile {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                });
            }
            Ok(Loaded {
                task: crate::task::load(path)?,
                warnings: Vec::new(),
                origin: None,
            })
        }
        Some(true) => {
            let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let converted = convert(&text, task_name).map_err(|source| LoadError::Job {
                path: path.to_path_buf(),
                source,
            })?;
            Ok(Loaded {
                task: converted.task,
                warnings: converted.warnings,
                origin: Some(Origin {
                    job: converted.job,
                    group: converted.group,
                    task: converted.task_name,
                }),
            })
        }
    }
}

/// The one loader of tasks for the verbs that run them: [`load`], with
/// the job's ignored fields logged as warnings.
pub fn load_task(path: &Path, task_name: Option<&str>) -> Result<Task, LoadError> {
    let loaded = load(path, task_name)?;
    for w in &loaded.warnings {
        tracing::warn!(task = %loaded.task.name, line = w.line, field = %w.field, "{}", w.message);
    }
    Ok(loaded.task)
}

#[cfg(test)]
mod tests;
