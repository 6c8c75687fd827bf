//! Helpers for the end-to-end tests: where the binary is, processes that
//! are always cleaned up, a real HTTP server on loopback, and the test guest.

pub mod agent;
pub mod cli;
pub mod executor;
pub mod fault;
pub mod guest;
pub mod http;
pub mod nomad;
pub mod output;
pub mod proc;

mod policies;

pub use policies::{foreign_policy_dir, foreign_policy_wasm, policy_dir, policy_wasm};

use std::path::PathBuf;

/// The `qemu-executor` binary built alongside the tests.
pub fn executor_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("QEMU_EXECUTOR_BIN") {
        return PathBuf::from(path);
    }
    // Test binaries live in target/<profile>/deps; the executor one level up.
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary sits in target/<profile>/deps");
    let bin = profile_dir.join("qemu-executor");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p qemu-executor`, or run tests/run.sh)",
        bin.display()
    );
    bin
}
