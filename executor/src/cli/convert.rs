//! `qemu-executor convert FILE [--task NAME]`
//!
//! Prints the task file, in our TOML format, that runs as the given job
//! file's qemu task does, so that users can move over. What the job sets
//! that is ignored here is listed on stderr and in the file's header.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use qemu_executor::jobfile;
use qemu_executor::launch::Exit;

use super::GlobalOpts;

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Job file (.hcl, .nomad); a task file (.toml, .json) is printed with
    /// every default written out.
    pub file: PathBuf,
    /// The job's qemu task to convert, as TASK or GROUP/TASK; needed when
    /// the job has several.
    #[arg(long = "task", value_name = "NAME")]
    pub task_name: Option<String>,
}

pub async fn run(args: ConvertArgs, _global: &GlobalOpts) -> anyhow::Result<ExitCode> {
    let loaded = match jobfile::load(&args.file, args.task_name.as_deref()) {
        Ok(loaded) => loaded,
        Err(e) => {
            super::print_error(&e);
            return Ok(Exit::INVALID.into());
        }
    };
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    print!(
        "{}",
        jobfile::converted_file(&loaded, &args.file.display().to_string())
    );
    Ok(ExitCode::SUCCESS)
}
