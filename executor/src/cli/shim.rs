//! `qemu-executor shim ...`: hidden; the per-VM process the agent starts
//! to be qemu's parent (see `qemu_executor::qemu::shim`). Synchronous and
//! without a runtime, to stay small.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use qemu_executor::qemu::shim::{self, ShimArgs as Settings};

#[derive(Debug, Args)]
pub struct ShimArgs {
    #[arg(long)]
    pub exit_record: PathBuf,
    #[arg(long)]
    pub cgroup: Vec<PathBuf>,
    #[arg(long)]
    pub mount_namespace: bool,
    #[arg(long)]
    pub dir: PathBuf,
    /// qemu and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

pub fn run(args: ShimArgs) -> ExitCode {
    let mut command = args.command.into_iter();
    let qemu = PathBuf::from(command.next().unwrap_or_default());
    ExitCode::from(shim::run(&Settings {
        exit_record: args.exit_record,
        cgroups: args.cgroup,
        mount_namespace: args.mount_namespace,
        dir: args.dir,
        qemu,
        args: command.collect(),
    }))
}
