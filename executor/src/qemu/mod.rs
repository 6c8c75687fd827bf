//! Everything about one qemu process: its command line, its image, the
//! process itself and its QMP connection.

pub mod cmdline;
pub mod forward;
pub mod image;
pub mod pidfd;
pub mod process;
pub mod qmp;
pub mod shim;
