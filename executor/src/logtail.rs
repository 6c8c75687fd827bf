//! Follows a log file that another process (qemu) appends to.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

/// The most recent text kept for pattern searches.
const WINDOW: usize = 64 * 1024;

pub struct LogTail {
    path: PathBuf,
    offset: u64,
    window: String,
}

impl LogTail {
    pub fn new(path: PathBuf) -> Self {
        Self::starting_at(path, 0)
    }

    /// Follows only what comes after byte `offset`.
    pub fn starting_at(path: PathBuf, offset: u64) -> Self {
        LogTail {
            path,
            offset,
            window: String::new(),
        }
    }

    /// Reads what was appended since the last call; true if anything was.
    pub fn poll(&mut self) -> bool {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return false;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return false;
        }
        let mut new = Vec::new();
        let Ok(n) = file.read_to_end(&mut new) else {
            return false;
        };
        if n == 0 {
            return false;
        }
        self.offset += n as u64;
        self.window.push_str(&String::from_utf8_lossy(&new));
        if self.window.len() > WINDOW {
            let mut cut = self.window.len() - WINDOW;
            while !self.window.is_char_boundary(cut) {
                cut += 1;
            }
            self.window.drain(..cut);
        }
        true
    }

    pub fn contains(&self, pattern: &str) -> bool {
        self.window.contains(pattern)
    }

    pub fn text(&self) -> &str {
        &self.window
    }
}

/// The last lines of qemu's own log from byte `from` on, for error
/// messages.
pub fn log_tail(path: &std::path::Path, from: u64) -> String {
    let mut tail = LogTail::starting_at(path.to_path_buf(), from);
    tail.poll();
    let text = tail.text();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn follows_appends_and_finds_split_markers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let mut tail = LogTail::new(path.clone());
        assert!(!tail.poll(), "a missing file is no growth");
        let mut f = std::fs::File::create(&path).unwrap();
        assert!(!tail.poll());
        f.write_all(b"qe-guest: re").unwrap();
        assert!(tail.poll());
        assert!(!tail.contains("qe-guest: ready"));
        f.write_all(b"ady\n").unwrap();
        assert!(tail.poll());
        assert!(tail.contains("qe-guest: ready"));
        assert!(!tail.poll());
    }

    #[test]
    fn window_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.log");
        std::fs::write(&path, "é".repeat(WINDOW)).unwrap();
        let mut tail = LogTail::new(path);
        assert!(tail.poll());
        assert!(tail.text().len() <= WINDOW);
    }

    #[test]
    fn tail_keeps_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "1\n2\n\n3\n4\n5\n6\n7\n").unwrap();
        assert_eq!(log_tail(&p, 0), "3 | 4 | 5 | 6 | 7");
        assert_eq!(log_tail(&p, 9), "5 | 6 | 7");
        assert_eq!(log_tail(&dir.path().join("missing"), 0), "");
    }
}
