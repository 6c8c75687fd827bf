//! What a running qemu costs: resident memory (VmRSS) and CPU time
//! (utime + stime), from /proc.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub rss_bytes: u64,
    pub cpu_time_ms: u64,
}

/// The usage of process `pid` now, if it exists.
pub fn of(pid: u32) -> Option<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_cpu_ticks(&stat)?;
    let per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|&t| t > 0)
        .unwrap_or(100);
    Some(Usage {
        rss_bytes: parse_rss(&status)?,
        cpu_time_ms: ticks * 1000 / per_sec,
    })
}

/// `VmRSS:   123 kB` from /proc/PID/status, in bytes.
pub fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// utime + stime (fields 14 and 15 of /proc/PID/stat), in clock ticks.
/// Fields are counted after the last ')', as the command name may hold
/// spaces and parentheses.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // The first field after ')' is field 3 (state).
    let utime: u64 = fields.nth(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rss_and_cpu_time() {
        let status =
            "Name:\tqemu-system-x86\nVmHWM:\t  231792 kB\nVmRSS:\t  231700 kB\nThreads:\t4\n";
        assert_eq!(parse_rss(status), Some(231_700 * 1024));
        assert_eq!(parse_rss("Name: x\n"), None);
        let stat =
            "4242 (qemu (a) b) S 1 4242 4242 0 -1 4194560 1 0 0 0 1500 250 0 0 20 0 4 0 98765";
        assert_eq!(parse_cpu_ticks(stat), Some(1750));
        assert_eq!(parse_cpu_ticks("1 (x) S 1"), None);
    }

    #[test]
    fn own_usage_is_readable() {
        let me = of(std::process::id()).unwrap();
        assert!(me.rss_bytes > 0);
    }
}
