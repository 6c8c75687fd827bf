//! `qemu-executor shim ...`: hidden; the per-VM process the agent starts
//! to be qemu's parent (see `qemu_executor::qemu::shim`). Synchronous and
//! without a runtime, to stay small.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use qemu_executor::qemu::forward::Forward;
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
    /// A log to copy while qemu runs; pairs with the --forward-to after it.
    #[arg(long)]
    pub forward_from: Vec<PathBuf>,
    /// Where the --forward-from of the same rank goes (a FIFO or a file).
    #[arg(long)]
    pub forward_to: Vec<PathBuf>,
    /// qemu and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

pub fn run(args: ShimArgs) -> ExitCode {
    if args.forward_from.len() != args.forward_to.len() {
        eprintln!("qemu-executor shim: every --forward-from needs a --forward-to");
        return ExitCode::from(shim::SHIM_FAILED);
    }
    let forwards = args
        .forward_from
        .into_iter()
        .zip(args.forward_to)
        .map(|(from, to)| Forward { from, to })
        .collect();
    let mut command = args.command.into_iter();
    let qemu = PathBuf::from(command.next().unwrap_or_default());
    ExitCode::from(shim::run(&Settings {
        exit_record: args.exit_record,
        cgroups: args.cgroup,
        mount_namespace: args.mount_namespace,
        dir: args.dir,
        qemu,
        args: command.collect(),
        forwards,
    }))
}
