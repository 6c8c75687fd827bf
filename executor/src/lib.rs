//! qemu-executor: fetch a VM image, verify it, pass the task through
//! sandboxed policies, then launch and supervise qemu.
//!
//! The binary is a thin layer over this library; every piece of logic lives
//! here, one module per concern.

pub mod config;
pub mod policy;
pub mod task;
