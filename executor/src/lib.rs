//! qemu-executor: fetch a VM image, verify it, pass the task through
//! sandboxed policies, then launch and supervise qemu.
//!
//! The binary is a thin layer over this library; every piece of logic lives
//! here, one module per concern.

pub mod agent;
pub mod cache;
pub mod config;
pub mod digest;
pub mod dirs;
pub mod fetch;
pub mod host;
pub mod jobfile;
pub mod launch;
pub mod logging;
pub mod logtail;
pub mod nomad;
pub mod passthrough;
pub mod policy;
pub mod qemu;
pub mod readiness;
pub mod task;
pub mod text;
pub mod units;
pub mod vm;

/// An error and its causes on one line, `outer: cause: root cause`, for
/// log fields and messages to Nomad (the binary prints the chain one cause
/// per line instead). Control characters are escaped: a URL or a server's
/// answer inside a message must not reach a terminal or a log raw.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = write!(out, "{}", text::Printable(&err.to_string()));
    let mut cause = err.source();
    while let Some(c) = cause {
        let _ = write!(out, ": {}", text::Printable(&c.to_string()));
        cause = c.source();
    }
    out
}
