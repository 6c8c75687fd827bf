//! The exit codes of every verb, in one place. The README's tables list
//! them; `run` and the Nomad plugin's exit results share the launch codes,
//! the `policy` verbs have their own four.

/// A process exit code with a meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Exit(u8);

impl Exit {
    /// The guest shut down (on its own, on the power button, or `quit`),
    /// or a verb did what it was asked.
    pub const SUCCESS: Exit = Exit(0);
    /// Another error: cache, state directory, I/O.
    pub const ERROR: Exit = Exit(1);
    /// Invalid task file, configuration, `args` or policy input.
    pub const INVALID: Exit = Exit(2);
    /// Rejected by a policy, or a policy failed, on the way to a launch.
    pub const REJECTED: Exit = Exit(3);
    /// The image could not be fetched or its checksum does not match.
    pub const FETCH: Exit = Exit(4);
    /// qemu failed: missing, could not start, crashed, or KVM unusable.
    pub const QEMU: Exit = Exit(5);
    /// The guest ignored the power button and was killed.
    pub const KILLED: Exit = Exit(6);
    /// The guest was not ready within `ready_timeout_s`.
    pub const NOT_READY: Exit = Exit(7);
    /// Interrupted before the VM started.
    pub const INTERRUPTED: Exit = Exit(130);

    /// `policy check` and `policy test`: the policy rejected the task.
    pub const POLICY_REJECTED: Exit = Exit(1);
    /// `policy check` and `policy test`: the policy failed (trap, timeout,
    /// a limit, an answer that makes no sense).
    pub const POLICY_FAULT: Exit = Exit(3);

    pub fn code(self) -> u8 {
        self.0
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit.0)
    }
}

impl From<Exit> for i32 {
    fn from(exit: Exit) -> Self {
        i32::from(exit.0)
    }
}

impl crate::vm::Ending {
    /// How `run` exits after this end, and the code a Nomad task reports.
    pub fn exit(&self) -> Exit {
        use crate::vm::{Ending, StopHow};
        match self {
            Ending::GuestShutdown | Ending::Stopped(StopHow::Powerdown | StopHow::Quit) => {
                Exit::SUCCESS
            }
            Ending::QemuExited { .. } | Ending::KvmUnusable { .. } => Exit::QEMU,
            Ending::Stopped(StopHow::Killed) => Exit::KILLED,
            Ending::NotReady { .. } => Exit::NOT_READY,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::vm::{Ending, StopHow};
    use std::time::Duration;

    #[test]
    fn endings_exit_as_documented() {
        assert_eq!(Ending::GuestShutdown.exit().code(), 0);
        assert_eq!(Ending::Stopped(StopHow::Powerdown).exit().code(), 0);
        assert_eq!(Ending::Stopped(StopHow::Quit).exit().code(), 0);
        assert_eq!(Ending::Stopped(StopHow::Killed).exit().code(), 6);
        let not_ready = Ending::NotReady {
            after: Duration::from_secs(1),
        };
        assert_eq!(not_ready.exit().code(), 7);
        let failed = Ending::QemuExited {
            status: "exit code 1".into(),
            log_tail: String::new(),
        };
        assert_eq!(failed.exit().code(), 5);
    }
}
