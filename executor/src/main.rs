//! The `qemu-executor` binary: parse arguments, set up logging, run the
//! subcommand, and turn its outcome into an exit code.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    cli::init_tracing(&cli);
    match cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            // The whole chain, so the cause of a cause is never lost.
            cli::print_error(err.as_ref());
            qemu_executor::launch::Exit::ERROR.into()
        }
    }
}
