//! Copies a VM's growing log files into the paths a scheduler reads the
//! task's output from. Nomad's log collector hands a task two FIFOs, for
//! its stdout and stderr; the VM's shim runs the copies, so the output
//! keeps flowing while no plugin runs, and is not lost while the collector
//! restarts: bytes that could not be written are kept and written later.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often a quiet log is looked at again.
const POLL: Duration = Duration::from_millis(200);
/// How long to wait before opening a destination again that had no reader.
const REOPEN: Duration = Duration::from_secs(1);
const CHUNK: usize = 64 * 1024;

/// Copy `from` (a file qemu appends to) into `to` (a FIFO or a file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub from: PathBuf,
    pub to: PathBuf,
}

/// A copy running on a thread of its own.
pub struct Forwarder {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl Forwarder {
    pub fn start(forward: Forward) -> Forwarder {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || copy_until_stopped(&forward, &flag));
        Forwarder { stop, thread }
    }

    /// Copies what is left and stops, giving up after `grace` (a reader
    /// that went away must not hold up the VM's exit record). Returns the
    /// bytes that could not be delivered, or `None` if the copy was still
    /// writing when the grace ran out.
    pub fn finish(self, grace: Duration) -> Option<usize> {
        self.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + grace;
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.thread.is_finished() {
            self.thread.join().ok()
        } else {
            None
        }
    }
}

/// Returns the bytes left undelivered when stopped.
fn copy_until_stopped(forward: &Forward, stop: &AtomicBool) -> usize {
    let mut source: Option<File> = None;
    let mut sink: Option<File> = None;
    let mut next_open = Instant::now();
    let mut pending: Vec<u8> = Vec::with_capacity(CHUNK);
    loop {
        let stopping = stop.load(Ordering::Acquire);
        if pending.is_empty() {
            match read_more(&forward.from, &mut source, &mut pending) {
                Ok(0) | Err(_) if stopping => return 0,
                Ok(0) | Err(_) => {
                    std::thread::sleep(POLL);
                    continue;
                }
                Ok(_) => {}
            }
        }
        if sink.is_none() && Instant::now() >= next_open {
            sink = open_sink(&forward.to).ok();
            next_open = Instant::now() + REOPEN;
        }
        let Some(out) = sink.as_mut() else {
            if stopping {
                return pending.len();
            }
            std::thread::sleep(POLL);
            continue;
        };
        match out.write(&pending) {
            Ok(n) => {
                pending.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The reader went away (EPIPE): keep the bytes for the next.
            Err(_) => sink = None,
        }
    }
}

/// Reads into the empty `pending` what `path` gained since the last read.
/// A file that shrank was started over (qemu relaunched): it is read from
/// its start again.
fn read_more(
    path: &Path,
    source: &mut Option<File>,
    pending: &mut Vec<u8>,
) -> std::io::Result<usize> {
    if source.is_none() {
        *source = Some(File::open(path)?);
    }
    let file = source.as_mut().expect("opened above");
    if file.metadata()?.len() < file.stream_position()? {
        file.seek(SeekFrom::Start(0))?;
    }
    pending.resize(CHUNK, 0);
    let n = file.read(pending);
    pending.truncate(*n.as_ref().unwrap_or(&0));
    n
}

/// Opens the destination for writing without waiting for a reader: a FIFO
/// nobody reads fails with ENXIO instead of blocking, and is tried again
/// later. Writes then block, as a log collector that falls behind should
/// slow the copy rather than lose output.
fn open_sink(path: &Path) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_a_growing_file_into_a_fifo_that_gets_a_reader_late() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("serial.log");
        let to = dir.path().join("stdout");
        nix::unistd::mkfifo(&to, nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::write(&from, b"first line\n").unwrap();
        let forwarder = Forwarder::start(Forward {
            from: from.clone(),
            to: to.clone(),
        });
        // No reader yet: nothing may be lost meanwhile.
        std::thread::sleep(Duration::from_millis(400));
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&from)
            .unwrap();
        log.write_all(b"second line\n").unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut fifo = File::open(&to).unwrap();
            let mut buf = [0u8; 256];
            while !got.ends_with(b"third line\n") {
                let n = fifo.read(&mut buf).unwrap();
                assert!(n > 0, "the writer closed early: {got:?}");
                got.extend_from_slice(&buf[..n]);
            }
            String::from_utf8(got).unwrap()
        });
        std::thread::sleep(Duration::from_millis(300));
        log.write_all(b"third line\n").unwrap();
        let got = reader.join().unwrap();
        assert_eq!(got, "first line\nsecond line\nthird line\n");
        assert_eq!(forwarder.finish(Duration::from_secs(5)), Some(0));
    }

    #[test]
    fn finish_gives_up_when_nobody_reads() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("qemu.log");
        let to = dir.path().join("stderr");
        nix::unistd::mkfifo(&to, nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::write(&from, b"never read\n").unwrap();
        let forwarder = Forwarder::start(Forward { from, to });
        std::thread::sleep(Duration::from_millis(300));
        // It stops, and says what it could not deliver.
        assert_eq!(forwarder.finish(Duration::from_secs(5)), Some(11));
    }
}
