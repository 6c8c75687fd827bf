//! The one error kind of the launch pipeline. Each front end maps it to
//! its own output through [`Kind`]: `run` to an exit code, the agent to a
//! task state, the Nomad plugin to a gRPC status.

use std::path::PathBuf;

use policy_sdk::{Accelerator, KvmStatus};

use super::exit::Exit;
use crate::fetch::FetchError;
use crate::host::isolation::IsolationError;
use crate::host::probe::FingerprintError;
use crate::passthrough::ArgsError;
use crate::qemu::image::ImageError;
use crate::qemu::shim::AdoptError;
use crate::vm::SuperviseError;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The policy chain said no; `summary` is its verdict, one line per
    /// policy that spoke.
    #[error("{summary}")]
    Rejected { summary: String, fault: bool },
    #[error("Task refused")]
    Args(#[from] ArgsError),
    #[error("qemu was not found on this host")]
    NoQemu,
    #[error("This qemu does not offer the {0} accelerator (it offers: {1})")]
    AcceleratorMissing(Accelerator, String),
    #[error("Task asks for kvm without fallback, but KVM is {0}")]
    KvmUnavailable(KvmStatus),
    #[error("Cannot find qemu")]
    Qemu(#[from] FingerprintError),
    #[error("Cannot create the task directory {}", path.display())]
    TaskDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot fetch the image")]
    Fetch(#[from] FetchError),
    #[error("Cannot confine the VM")]
    Isolation(#[from] IsolationError),
    #[error("Cannot prepare the boot image")]
    Image(#[from] ImageError),
    #[error("Cannot launch qemu")]
    Start(#[from] SuperviseError),
    #[error("Cannot reconnect to the VM")]
    Reconnect(#[source] SuperviseError),
    #[error("Cannot watch the VM's shim")]
    Watch(#[source] AdoptError),
    #[error("The VM's shim was killed, and qemu with it")]
    ShimKilled,
    #[error("Interrupted before the VM started; nothing was launched")]
    Interrupted,
}

/// What kind of failure it was, for the front ends' mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The task, or its `args`, cannot be run as written.
    Invalid,
    /// A policy rejected the task, or failed on it.
    Rejected,
    /// This host cannot run it as asked: no qemu, no such accelerator,
    /// KVM unusable without fallback.
    Unavailable,
    /// The image could not be had; a retry may help when `retryable`.
    Fetch { retryable: bool },
    /// qemu could not be started, or a running VM could not be taken
    /// back.
    Qemu,
    /// A stop came before the VM started.
    Interrupted,
    /// The executor's own state: task directory, cache, confinement.
    Internal,
}

impl LaunchError {
    pub fn kind(&self) -> Kind {
        match self {
            LaunchError::Rejected { .. } => Kind::Rejected,
            LaunchError::Args(_) => Kind::Invalid,
            LaunchError::NoQemu
            | LaunchError::AcceleratorMissing(..)
            | LaunchError::KvmUnavailable(_)
            | LaunchError::Qemu(_) => Kind::Unavailable,
            LaunchError::Fetch(e) => Kind::Fetch {
                retryable: match e {
                    FetchError::Exhausted { source, .. } => source.is_retryable(),
                    other => other.is_retryable(),
                },
            },
            LaunchError::Image(_)
            | LaunchError::Start(_)
            | LaunchError::Reconnect(_)
            | LaunchError::Watch(_)
            | LaunchError::ShimKilled => Kind::Qemu,
            LaunchError::Interrupted => Kind::Interrupted,
            LaunchError::TaskDir { .. } | LaunchError::Write { .. } | LaunchError::Isolation(_) => {
                Kind::Internal
            }
        }
    }

    /// The exit code `run` ends with, and the one a Nomad task reports
    /// when its launch failed.
    pub fn exit(&self) -> Exit {
        match self.kind() {
            Kind::Invalid => Exit::INVALID,
            Kind::Rejected => Exit::REJECTED,
            Kind::Fetch { .. } => Exit::FETCH,
            Kind::Unavailable | Kind::Qemu => Exit::QEMU,
            Kind::Interrupted => Exit::INTERRUPTED,
            Kind::Internal => Exit::ERROR,
        }
    }
}
