//! Log output that can never fail the program. When our stderr loses its
//! reader (a Nomad agent that crashed while its plugins live on, a
//! supervisor that died under `run`), a write returns EPIPE; the tracing
//! writer's own fallback would then report that on the same stderr, and
//! `eprintln!` panics on it. A VM's supervision must not hang on a log
//! line nobody can read, so the line is dropped and the program carries
//! on: the tasks' own logs (serial console, qemu's output) go to files and
//! FIFOs of their own and are unaffected.

use std::io::Write;

/// Writes log lines to stderr, dropping them when stderr is gone.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = Stderr;

    fn make_writer(&'a self) -> Self::Writer {
        Stderr
    }
}

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // One write_all per line keeps lines whole between threads; an
        // error means nobody reads, so the line is gone either way.
        let _ = std::io::stderr().lock().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// `eprintln!` for messages to a person: silent, not a panic, when
/// stderr is gone.
#[macro_export]
macro_rules! eprint_line {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_claim_success_whatever_stderr_does() {
        let mut out = Stderr;
        assert_eq!(out.write(b"a line nobody may read\n").unwrap(), 23);
        out.flush().unwrap();
    }
}
