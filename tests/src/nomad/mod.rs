//! A Nomad client in miniature, to check `qemu-executor nomad-plugin`
//! against the published driver-plugin protocol without a Nomad binary:
//! it launches the plugin as go-plugin does, encodes configs as go-cty
//! does, lays out allocations and reads log FIFOs as logmon does, and
//! keeps the long-lived streams open as the client's driver manager does.
//!
//! - [`cty`]: the msgpack encoding of task and plugin configs.
//! - [`handshake`]: the stdout handshake line and the hclog stderr lines.
//! - [`plugin`]: the plugin process, its gRPC clients, and the kill
//!   sequence.
//! - [`alloc`]: allocation dirs, log FIFOs, `TaskConfig`.
//! - [`calls`]: the calls a client makes, and readers for their answers.
//! - [`streams`]: `Fingerprint`, `TaskEvents` and `TaskStats` collectors.
//! - [`status`]: gRPC error codes and the recoverable-error detail.
//! - [`schema`]: the hclspec schemas, read and checked.
//! - [`env`]: sandbox, config and VM reaper of one test.

pub mod alloc;
pub mod calls;
pub mod cty;
pub mod env;
pub mod handshake;
pub mod plugin;
pub mod schema;
pub mod status;
pub mod streams;

pub use alloc::{AllocDir, Fifo, TaskConfigBuilder};
pub use env::NomadEnv;
pub use plugin::{Killed, PluginUnderTest, plugin_command};
pub use streams::{Collector, End};
