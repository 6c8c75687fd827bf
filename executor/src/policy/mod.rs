//! Sandboxed WebAssembly policies: each sees a task before launch and
//! accepts it, rejects it with a reason, or rewrites it.
//!
//! - [`PolicyEngine`]: one per process; the wasmtime engine, its epoch ticker
//!   and the on-disk cache of compiled policies.
//! - [`Chain`]: the operator's policies, loaded (compiled or read back from
//!   the cache, metadata read, settings checked) and run in order.
//! - [`Inspection`]: what a module is and whether it would load, for
//!   `qemu-executor policy inspect` ([`PolicyEngine::inspect`]).
//! - [`PolicySpec`]: one policy to load, from `executor.toml`
//!   ([`config::PolicyConfig`]) or from `--policy FILE[=SETTINGS_JSON]`.
//!
//! Every failure of a policy at evaluation time (trap, timeout, memory limit,
//! output that makes no sense) fails closed: the task is rejected with a
//! message naming the policy and the cause, and the engine keeps serving.

mod artifacts;
mod chain;
pub mod config;
mod convert;
pub mod diff;
mod host;
mod inspect;
mod lift;
mod ticker;
mod wasi;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use chain::{Chain, ChainOutcome, MAX_PASSES, PolicyInfo, Step, StepDecision};
pub use diff::FieldChange;
pub use host::{EngineOptions, PolicyEngine};
pub use inspect::{Import, Inspection};

/// The contract version this executor speaks (the WIT package version).
pub const CONTRACT_VERSION: &str = policy_sdk::CONTRACT_VERSION;

/// Default wall-clock limit of one call into a policy.
pub const DEFAULT_TIME_LIMIT: Duration = Duration::from_millis(100);
/// Default limit of a policy's linear memory.
pub const DEFAULT_MEMORY_LIMIT: u64 = 64 << 20;
/// Largest memory limit an operator may give one policy.
pub const MAX_MEMORY_LIMIT: u64 = 4 << 30;
/// Memory a policy may have per millisecond of its time limit. Filling or
/// copying all of its memory is one WebAssembly instruction, which the time
/// limit cannot interrupt; a host writes memory at 1 GiB/s or more, so with
/// this cap that instruction ends within about the time limit again.
pub const MEMORY_PER_MS: u64 = 1 << 20;
/// Largest time limit an operator may give one policy.
pub const MAX_TIME_LIMIT: Duration = Duration::from_secs(60);
/// Longest reason a policy may give, in bytes.
pub const MAX_REASON_BYTES: usize = 4096;
/// Largest rewritten task a policy may return, as the sum of its strings and
/// list entries, in bytes.
pub const MAX_TASK_BYTES: usize = 64 << 10;
/// Largest policy module read from disk.
pub const MAX_MODULE_BYTES: u64 = 256 << 20;

/// Where compiled policies are cached under the executor's cache directory.
pub fn artifact_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("policy-artifacts")
}

impl PolicyError {
    /// Whether the policy itself misbehaved while loading (as opposed to a
    /// bad module, settings or environment): `policy check` exits 3 for it.
    pub fn is_fault(&self) -> bool {
        matches!(
            self,
            PolicyError::LoadFault { .. } | PolicyError::BadMetadata { .. }
        )
    }
}

/// What a policy may use while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time of one call (load-time calls and each evaluation),
    /// enforced through epoch deadlines.
    pub time: Duration,
    /// Linear memory, in bytes.
    pub memory: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            time: DEFAULT_TIME_LIMIT,
            memory: DEFAULT_MEMORY_LIMIT,
        }
    }
}

impl Limits {
    /// The time limit `time` with the default memory limit, or less where
    /// [`MEMORY_PER_MS`] allows less.
    pub fn with_time(time: Duration) -> Limits {
        Limits {
            time,
            memory: DEFAULT_MEMORY_LIMIT.min(memory_for(time)),
        }
    }

    /// Refuses limits of zero, beyond what the engine can give, or memory
    /// the time limit cannot bound (see [`MEMORY_PER_MS`]).
    pub fn validate(&self) -> Result<(), String> {
        if self.time.is_zero() || self.time > MAX_TIME_LIMIT {
            return Err(format!(
                "time limit {:?} is out of range (1 ms to {} s)",
                self.time,
                MAX_TIME_LIMIT.as_secs()
            ));
        }
        if self.memory < (1 << 20) || self.memory > MAX_MEMORY_LIMIT {
            return Err(format!(
                "memory limit of {} bytes is out of range (1 MiB to {} MiB)",
                self.memory,
                MAX_MEMORY_LIMIT >> 20
            ));
        }
        if self.memory > memory_for(self.time) {
            return Err(format!(
                "memory limit of {} needs a time limit of at least {} ms ({} MiB per ms): \
                 one instruction can fill all of memory, and the time limit cannot stop it midway",
                mib(self.memory),
                self.memory.div_ceil(MEMORY_PER_MS),
                MEMORY_PER_MS >> 20
            ));
        }
        Ok(())
    }
}

/// The most memory a time limit bounds.
fn memory_for(time: Duration) -> u64 {
    u64::try_from(time.as_millis())
        .unwrap_or(u64::MAX)
        .saturating_mul(MEMORY_PER_MS)
}

/// One policy to load: from a `[[policy]]` entry of `executor.toml` or from
/// `--policy FILE[=SETTINGS_JSON]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    pub module: PathBuf,
    /// JSON text handed to the policy as is; `{}` when the operator gave none.
    pub settings: String,
    /// Expected sha256 of the module's bytes, lower-case hex.
    pub sha256: Option<String>,
    pub limits: Limits,
}

impl PolicySpec {
    pub fn new(module: impl Into<PathBuf>) -> Self {
        PolicySpec {
            module: module.into(),
            settings: "{}".to_string(),
            sha256: None,
            limits: Limits::default(),
        }
    }

    pub fn with_settings(mut self, settings: impl Into<String>) -> Self {
        self.settings = settings.into();
        self
    }

    /// Parses the command line's `FILE[=SETTINGS_JSON]`: everything up to
    /// the first `=` is the file (so a file name cannot contain `=`).
    pub fn parse_cli(arg: &str) -> Self {
        match arg.split_once('=') {
            Some((file, settings)) => PolicySpec::new(file).with_settings(settings),
            None => PolicySpec::new(arg),
        }
    }
}

type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

fn cause(err: wasmtime::Error) -> Cause {
    err.into()
}

/// Why a policy could not be loaded, or the engine not set up.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("Cannot set up the WebAssembly engine")]
    Engine(#[source] Cause),
    #[error("Cannot use {} as the cache of compiled policies", path.display())]
    ArtifactDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "Refusing the cache of compiled policies {}: {problem}; compiled code is only read from a directory that only this user can write",
        path.display()
    )]
    ArtifactDirUnsafe { path: PathBuf, problem: String },
    #[error("Cannot write the compiled policy {}", path.display())]
    ArtifactWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot read policy module {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Policy module {} is larger than {} MiB", path.display(), MAX_MODULE_BYTES >> 20)]
    TooLarge { path: PathBuf },
    #[error("The sha256 pin {pin:?} of {} is not 64 hex digits", path.display())]
    BadPin { path: PathBuf, pin: String },
    #[error(
        "Policy module {} does not match its sha256 pin: expected {expected}, got {actual}",
        path.display()
    )]
    PinMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("Bad limits for policy {}: {problem}", path.display())]
    BadLimits { path: PathBuf, problem: String },
    #[error("{} is not a WebAssembly component this executor can compile", path.display())]
    Compile {
        path: PathBuf,
        #[source]
        source: Cause,
    },
    #[error(
        "{} does not export qemu-executor:policy/evaluator; is it a policy component?",
        path.display()
    )]
    NotAPolicy { path: PathBuf },
    #[error(
        "{} speaks policy contract {found}, this executor speaks {supported}",
        path.display()
    )]
    ContractVersion {
        path: PathBuf,
        found: String,
        supported: String,
    },
    #[error("{} needs imports this executor does not grant", path.display())]
    Link {
        path: PathBuf,
        #[source]
        source: Cause,
    },
    #[error(
        "{}: its function {function} does not have the type of policy contract {CONTRACT_VERSION}",
        path.display()
    )]
    Signature {
        path: PathBuf,
        function: &'static str,
        #[source]
        source: Cause,
    },
    #[error("Policy {} failed while loading: {fault}", path.display())]
    LoadFault { path: PathBuf, fault: Fault },
    #[error("Policy {} has unusable metadata: {problem}", path.display())]
    BadMetadata { path: PathBuf, problem: String },
    #[error("Policy {name} ({}) refused its settings: {message}", path.display())]
    BadSettings {
        name: String,
        path: PathBuf,
        message: String,
    },
}

/// How a call into a policy went wrong. Every fault rejects the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The call ran past its time limit.
    Timeout { limit: Duration },
    /// The policy tried to grow its memory past the limit.
    Memory { limit: u64 },
    /// The policy trapped (a panic, `unreachable`, a stack overflow...);
    /// `stderr` holds the start of what it wrote there, such as the panic
    /// message.
    Trap { message: String, stderr: String },
    /// The policy called `exit`.
    Exit { code: i32 },
    /// The reason or rewritten task is larger than the caps.
    OutputTooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    /// A rewrite from a policy whose metadata says it does not rewrite.
    UndeclaredRewrite,
    /// The call did not return at all within a generous multiple of its
    /// limit (a host-side wait the epoch deadline cannot interrupt).
    Unresponsive { waited: Duration },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Timeout { limit } => {
                write!(
                    f,
                    "ran longer than its time limit of {} ms",
                    limit.as_millis()
                )
            }
            Fault::Memory { limit } => {
                write!(
                    f,
                    "tried to use more than its memory limit of {}",
                    mib(*limit)
                )
            }
            Fault::Trap { message, stderr } if stderr.is_empty() => {
                write!(f, "trapped: {message}")
            }
            Fault::Trap { message, stderr } => write!(f, "trapped: {message} ({stderr})"),
            Fault::Exit { code } => write!(f, "called exit with status {code}"),
            // A task's size is counted until it passes the limit.
            Fault::OutputTooLarge { what, size, limit } => {
                write!(
                    f,
                    "returned a {what} of {size} bytes or more (at most {limit})"
                )
            }
            Fault::UndeclaredRewrite => {
                f.write_str("rewrote the task although its metadata says it does not rewrite")
            }
            Fault::Unresponsive { waited } => {
                write!(f, "did not return within {} ms", waited.as_millis())
            }
        }
    }
}

fn mib(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_spec_splits_at_the_first_equals() {
        let spec = PolicySpec::parse_cli("p.wasm={\"min\":2000,\"mode\":\"a=b\"}");
        assert_eq!(spec.module, PathBuf::from("p.wasm"));
        assert_eq!(spec.settings, "{\"min\":2000,\"mode\":\"a=b\"}");
        let spec = PolicySpec::parse_cli("/opt/p.wasm");
        assert_eq!(spec.settings, "{}");
        assert_eq!(spec.limits, Limits::default());
    }

    #[test]
    fn limits_are_bounded() {
        assert!(Limits::default().validate().is_ok());
        let zero = Limits {
            time: Duration::ZERO,
            ..Limits::default()
        };
        assert!(zero.validate().unwrap_err().contains("time limit"));
        let huge = Limits {
            memory: MAX_MEMORY_LIMIT + 1,
            time: MAX_TIME_LIMIT,
        };
        assert!(huge.validate().unwrap_err().contains("memory limit"));
    }

    #[test]
    fn memory_is_bounded_by_the_time_limit() {
        let ms = Duration::from_millis;
        // The case: 2 GiB filled in one instruction against 100 ms.
        let unbounded = Limits {
            time: ms(100),
            memory: 2 << 30,
        };
        assert_eq!(
            unbounded.validate().unwrap_err(),
            "memory limit of 2048 MiB needs a time limit of at least 2048 ms (1 MiB per ms): \
             one instruction can fill all of memory, and the time limit cannot stop it midway"
        );
        let bounded = Limits {
            time: ms(2048),
            memory: 2 << 30,
        };
        assert!(bounded.validate().is_ok());
        assert_eq!(Limits::with_time(ms(20)).memory, 20 << 20);
        assert_eq!(Limits::with_time(ms(500)).memory, DEFAULT_MEMORY_LIMIT);
        assert!(Limits::with_time(ms(1)).validate().is_ok());
    }

    #[test]
    fn faults_read_well() {
        assert_eq!(
            Fault::Timeout {
                limit: Duration::from_millis(100)
            }
            .to_string(),
            "ran longer than its time limit of 100 ms"
        );
        assert_eq!(
            Fault::Memory { limit: 64 << 20 }.to_string(),
            "tried to use more than its memory limit of 64 MiB"
        );
        assert_eq!(
            Fault::OutputTooLarge {
                what: "reason",
                size: 5000,
                limit: 4096
            }
            .to_string(),
            "returned a reason of 5000 bytes or more (at most 4096)"
        );
    }
}
