//! The SDK for qemu-executor policies.

pub mod types;

pub use types::*;
