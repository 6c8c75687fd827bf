//! Leases: a record that a process uses a cached image, so `gc` leaves the
//! image alone.
//!
//! A lease is a file `leases/<entry>/<holder>` holding the pid of the
//! process that uses the image and that process's start time (field 22 of
//! `/proc/<pid>/stat`). It lives on disk, not in memory, because the user of
//! an image (qemu) outlives the executor that fetched it. A lease is live
//! while a process with that pid *and* that start time exists, so a reused
//! pid never keeps a stale lease alive; dead leases are removed by `gc`.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::OFlag;
use policy_sdk::Checksum;
use serde::{Deserialize, Serialize};

use super::{Cache, CacheError, create_dir, entry_name, io_err};

/// What a lease file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LeaseRecord {
    pid: u32,
    /// Field 22 of `/proc/<pid>/stat`, in clock ticks since boot.
    start_time: u64,
    /// When the lease was taken, seconds since the epoch.
    since: i64,
}

/// One lease on an entry, as `cache ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseInfo {
    pub holder: String,
    pub pid: u32,
    pub since: i64,
    /// Whether the holding process still runs.
    pub live: bool,
}

/// A held lease. Dropping it keeps it: a lease outlives the process that
/// took it until [`Lease::release`] or until its holder process ends.
#[derive(Debug)]
pub struct Lease {
    cache: Cache,
    checksum: Checksum,
    holder: String,
    path: PathBuf,
}

impl Lease {
    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn checksum(&self) -> &Checksum {
        &self.checksum
    }

    /// The lease file itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives the image back; `gc` may evict it once no lease remains.
    pub fn release(self) -> Result<(), CacheError> {
        self.cache.release_lease(&self.checksum, &self.holder)?;
        Ok(())
    }
}

/// Holder ids become file names: a task id or `agent-<n>`, nothing that
/// could climb out of the lease directory.
pub fn check_holder(holder: &str) -> Result<(), &'static str> {
    if holder.is_empty() || holder.len() > 128 {
        return Err("must be 1 to 128 characters long");
    }
    if holder.starts_with('.') || holder.starts_with('-') {
        return Err("must not start with '.' or '-'");
    }
    if !holder
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("may only contain letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// Field 22 (starttime) of a `/proc/<pid>/stat` line. The command name in
/// field 2 may hold spaces and parentheses, so fields are counted from the
/// last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // After ")" come fields 3 (state), 4, ...; field 22 is the 20th of them.
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The start time of a running process, `None` if there is no such process.
pub fn process_start_time(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

fn is_live(record: &LeaseRecord) -> bool {
    process_start_time(record.pid) == Some(record.start_time)
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Cache {
    /// Records that process `pid` uses the image for `checksum`, under the
    /// name `holder` (a task id). Taking it again with the same holder
    /// replaces the pid, say from the executor's own to qemu's.
    ///
    /// Takes the entry's lock for a moment (so `gc` cannot evict between
    /// the check and the record), which blocks the thread; it waits longer
    /// only while another process downloads this very image.
    pub fn lease(&self, checksum: &Checksum, holder: &str, pid: u32) -> Result<Lease, CacheError> {
        check_holder(holder).map_err(|problem| CacheError::InvalidHolder {
            holder: holder.to_string(),
            problem,
        })?;
        let start_time = process_start_time(pid).ok_or(CacheError::NoSuchProcess { pid })?;
        let name = entry_name(checksum);
        let _lock = self.lock_entry_blocking(&name, true)?;
        if self.lookup(checksum)?.is_none() {
            return Err(CacheError::NotCached {
                checksum: checksum.clone(),
            });
        }
        let dir = self.leases_dir().join(&name);
        create_dir(&dir, 0o755, false)?;
        let record = LeaseRecord {
            pid,
            start_time,
            since: now_unix(),
        };
        let path = dir.join(holder);
        write_atomically(
            &dir,
            &path,
            &serde_json::to_vec(&record).expect("plain struct"),
        )?;
        tracing::debug!(checksum = %checksum, holder, pid, "Leased cache entry");
        Ok(Lease {
            cache: self.clone(),
            checksum: checksum.clone(),
            holder: holder.to_string(),
            path,
        })
    }

    /// Removes `holder`'s lease on `checksum`, if there is one (say one left
    /// by an earlier run of the agent). Returns whether there was one.
    pub fn release_lease(&self, checksum: &Checksum, holder: &str) -> Result<bool, CacheError> {
        check_holder(holder).map_err(|problem| CacheError::InvalidHolder {
            holder: holder.to_string(),
            problem,
        })?;
        let path = self.leases_dir().join(entry_name(checksum)).join(holder);
        match fs::remove_file(&path) {
            Ok(()) => {
                tracing::debug!(checksum = %checksum, holder, "Released cache lease");
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("remove lease", &path)(e)),
        }
    }

    /// The leases on `checksum`, live or not.
    pub fn leases(&self, checksum: &Checksum) -> Result<Vec<LeaseInfo>, CacheError> {
        Ok(self
            .read_leases(&entry_name(checksum))?
            .into_iter()
            .map(|(_, info)| info)
            .collect())
    }

    /// Every lease file of the entry `name` with what it says. Files that
    /// cannot be parsed count as dead leases, so gc removes them.
    pub(super) fn read_leases(&self, name: &str) -> Result<Vec<(PathBuf, LeaseInfo)>, CacheError> {
        let dir = self.leases_dir().join(name);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("read", &dir)(e)),
        };
        let mut out = Vec::new();
        for dirent in entries {
            let dirent = dirent.map_err(io_err("read", &dir))?;
            let holder = dirent.file_name().to_string_lossy().into_owned();
            if holder.starts_with('.') {
                continue; // a lease being written
            }
            let path = dirent.path();
            let info = match read_record(&path) {
                Some(record) => LeaseInfo {
                    live: is_live(&record),
                    holder,
                    pid: record.pid,
                    since: record.since,
                },
                None => LeaseInfo {
                    holder,
                    pid: 0,
                    since: 0,
                    live: false,
                },
            };
            out.push((path, info));
        }
        out.sort_by(|a, b| a.1.holder.cmp(&b.1.holder));
        Ok(out)
    }
}

/// A lease file, read without following a symlink planted in its place.
fn read_record(path: &Path) -> Option<LeaseRecord> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    file.take(4096).read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_atomically(dir: &Path, dest: &Path, data: &[u8]) -> Result<(), CacheError> {
    let mut temp = tempfile::Builder::new()
        .prefix(".lease")
        .tempfile_in(dir)
        .map_err(io_err("create a lease in", dir))?;
    temp.write_all(data)
        .and_then(|()| temp.as_file().sync_all())
        .map_err(io_err("write lease", temp.path()))?;
    temp.persist(dest).map_err(|e| CacheError::Io {
        action: "write lease",
        path: dest.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_odd_command_names() {
        let stat = "4242 (qemu) sys (x)) S 1 4242 4242 0 -1 4194560 1234 0 0 0 10 5 0 0 20 0 3 0 987654 123456789 2000 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987654));
        let plain = "1 (init) S 0 1 1 0 -1 4194560 100 0 0 0 1 1 0 0 20 0 1 0 7 1000 10";
        assert_eq!(parse_start_time(plain), Some(7));
        assert_eq!(parse_start_time("1 (init) S 0 1"), None);
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn our_own_process_is_live_and_a_changed_start_time_is_not() {
        let me = std::process::id();
        let start = process_start_time(me).expect("our own /proc/self/stat");
        let record = LeaseRecord {
            pid: me,
            start_time: start,
            since: 0,
        };
        assert!(is_live(&record));
        // Same pid, other start time: a reused pid, not our holder.
        assert!(!is_live(&LeaseRecord {
            start_time: start + 1,
            ..record
        }));
        assert_eq!(process_start_time(0), None);
    }

    #[test]
    fn holder_ids_cannot_escape_the_lease_directory() {
        assert!(check_holder("task-42").is_ok());
        assert!(check_holder("web.1_a").is_ok());
        for bad in [
            "",
            "..",
            ".hidden",
            "-x",
            "a/b",
            "../x",
            "a b",
            "a\0b",
            &"x".repeat(129),
        ] {
            assert!(check_holder(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lease_release_and_liveness() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let sum: Checksum = "md5:0123456789abcdef0123456789abcdef".parse().unwrap();
        let err = cache.lease(&sum, "t1", std::process::id()).unwrap_err();
        assert!(matches!(err, CacheError::NotCached { .. }), "{err}");

        let entry = cache.entry_path(&sum);
        fs::write(&entry, b"img").unwrap();
        fs::set_permissions(&entry, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
        let lease = cache.lease(&sum, "t1", std::process::id()).unwrap();
        let infos = cache.leases(&sum).unwrap();
        assert_eq!(infos.len(), 1);
        assert!(infos[0].live && infos[0].holder == "t1");

        let err = cache.lease(&sum, "t2", u32::MAX - 1).unwrap_err();
        assert!(matches!(err, CacheError::NoSuchProcess { .. }), "{err}");

        lease.release().unwrap();
        assert!(cache.leases(&sum).unwrap().is_empty());
        assert!(!cache.release_lease(&sum, "t1").unwrap());
    }
}
