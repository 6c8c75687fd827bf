//! qemu-executor: fetch a VM image, verify it, pass the task through
//! sandboxed policies, then launch and supervise qemu.
//!
//! The binary is a thin layer over this library; every piece of logic lives
//! here, one module per concern.

pub mod config;
pub mod dirs;
pub mod fingerprint;
pub mod kvm;
pub mod launcher;
pub mod logtail;
pub mod passthrough;
pub mod qemu;
pub mod readiness;
pub mod supervisor;
pub mod task;
pub mod verdict;
