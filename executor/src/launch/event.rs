//! What happens on the way from a task to a VM's end, for the front ends
//! to print (`run`), record (the agent) or send as task events (Nomad).

use std::path::{Path, PathBuf};
use std::time::Duration;

use policy_sdk::{Accelerator, HostFacts, PortMapping};

use crate::fetch::Fetched;
use crate::host::isolation::IsolationReport;
use crate::policy::ChainOutcome;
use crate::qemu::process::ProcessIdentity;

#[derive(Debug)]
pub enum Event<'a> {
    /// The facts the policies are about to see.
    Facts(&'a HostFacts),
    /// Every policy's decision, with the diff of its rewrites.
    Policies(&'a ChainOutcome),
    /// The accelerator this host gives the task, and why when it is not
    /// the one it asked for.
    Accelerator {
        requested: Accelerator,
        chosen: Accelerator,
        reason: Option<&'a str>,
    },
    /// The image is in the cache and leased to the task.
    Image(&'a Fetched),
    /// A detached VM's cgroups, and which isolation applies to it.
    Confined {
        cgroups: &'a [PathBuf],
        report: &'a IsolationReport,
    },
    /// qemu runs (again, after a KVM fallback).
    Started {
        pid: u32,
        accelerator: Accelerator,
        dir: &'a Path,
        /// qemu's identity, and its shim's when it runs under one.
        identity: ProcessIdentity,
        shim: Option<ProcessIdentity>,
    },
    PortReady(&'a PortMapping),
    /// Every check passed.
    Ready {
        after: Duration,
    },
    /// KVM failed this guest: it is relaunched under tcg.
    KvmFallback {
        reason: &'a str,
    },
    /// The VM is being stopped.
    Stopping,
}
