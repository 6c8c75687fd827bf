//! Listing the cache and evicting from it.
//!
//! `gc` evicts least recently used images (by entry mtime, which every hit
//! and lease refreshes) until the total is at most the size asked for. It
//! never evicts an image with a live lease, nor one whose lock someone holds
//! (a lease being taken); it says so when that keeps it above the size. It
//! also removes dead leases, partial downloads that no process is writing,
//! and lock files of entries that are gone.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use policy_sdk::Checksum;
use serde::Serialize;

use super::{Cache, CacheError, IMAGES, LOCKS, io_err, parse_entry_name};

/// A partial download is left alone for this long even when nobody holds
/// its entry's lock: the lock already proves it abandoned, the age guards
/// against a writer that does not take locks (an older executor).
pub const TEMP_GRACE: Duration = Duration::from_secs(15 * 60);

/// One cached image, as `cache ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EntryInfo {
    pub checksum: Checksum,
    pub path: PathBuf,
    pub size: u64,
    /// Last use, seconds since the epoch.
    pub last_used: i64,
    /// Holders of live leases: the tasks using the image.
    pub holders: Vec<String>,
    #[serde(skip)]
    last_used_precise: SystemTime,
}

/// What `gc` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub max_size: Option<u64>,
    pub total_before: u64,
    pub total_after: u64,
    pub evicted: Vec<EntryInfo>,
    /// Images that eviction reached but that are in use.
    pub kept_in_use: Vec<EntryInfo>,
    pub stale_leases_removed: usize,
    pub temps_removed: usize,
}

impl GcReport {
    /// Whether the cache is now within the size asked for.
    pub fn reached(&self) -> bool {
        self.max_size.is_none_or(|max| self.total_after <= max)
    }
}

/// Walks `entries` from least to most recently used while the total is
/// above `max`, calling `try_evict` on each; it returns false for one it
/// must keep. Returns the evicted and the kept ones, and the new total.
fn evict_lru<T>(
    mut entries: Vec<T>,
    max: u64,
    key: impl Fn(&T) -> (SystemTime, u64),
    mut try_evict: impl FnMut(&T) -> bool,
) -> (Vec<T>, Vec<T>, u64) {
    let mut total: u64 = entries.iter().map(|e| key(e).1).sum();
    entries.sort_by_key(|e| key(e).0);
    let (mut evicted, mut kept) = (Vec::new(), Vec::new());
    for entry in entries {
        if total <= max {
            break;
        }
        if try_evict(&entry) {
            total -= key(&entry).1;
            evicted.push(entry);
        } else {
            kept.push(entry);
        }
    }
    (evicted, kept, total)
}

impl Cache {
    /// Every verified image, most recently used first. Entries that are not
    /// regular files are skipped with a warning (`fetch` refuses them).
    pub fn list(&self) -> Result<Vec<EntryInfo>, CacheError> {
        let images = self.images_dir();
        let mut out = Vec::new();
        for dirent in fs::read_dir(&images).map_err(io_err("read", &images))? {
            let dirent = dirent.map_err(io_err("read", &images))?;
            let name = dirent.file_name().to_string_lossy().into_owned();
            let Some(checksum) = parse_entry_name(&name) else {
                tracing::warn!(path = %dirent.path().display(), "Unexpected file in the image cache");
                continue;
            };
            let path = dirent.path();
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // evicted meanwhile
                Err(e) => return Err(io_err("inspect", &path)(e)),
            };
            if !meta.is_file() {
                tracing::warn!(path = %path.display(), "Cache entry is not a regular file; fetch refuses it");
                continue;
            }
            let holders = self
                .read_leases(&name)?
                .into_iter()
                .filter(|(_, l)| l.live)
                .map(|(_, l)| l.holder)
                .collect();
            let last_used_precise = meta.modified().unwrap_or(UNIX_EPOCH);
            out.push(EntryInfo {
                checksum,
                path,
                size: meta.size(),
                last_used: meta.mtime(),
                holders,
                last_used_precise,
            });
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.last_used_precise));
        Ok(out)
    }

    /// Evicts least recently used images until the total is at most
    /// `max_size` (`None`: evict nothing), and cleans up dead leases and
    /// abandoned partial downloads.
    pub fn gc(&self, max_size: Option<u64>) -> Result<GcReport, CacheError> {
        let mut report = GcReport {
            max_size,
            stale_leases_removed: self.remove_dead_leases()?,
            temps_removed: self.remove_abandoned_temps()?,
            ..GcReport::default()
        };
        let entries = self.list()?;
        report.total_before = entries.iter().map(|e| e.size).sum();
        let mut failure = None;
        let (evicted, kept, total) = evict_lru(
            entries,
            max_size.unwrap_or(u64::MAX),
            |e| (e.last_used_precise, e.size),
            |e| {
                if failure.is_some() || !e.holders.is_empty() {
                    return false;
                }
                match self.evict(e) {
                    Ok(done) => done,
                    Err(err) => {
                        failure = Some(err);
                        false
                    }
                }
            },
        );
        if let Some(err) = failure {
            return Err(err);
        }
        report.total_after = total;
        report.evicted = evicted;
        report.kept_in_use = kept;
        self.remove_orphan_locks()?;
        Ok(report)
    }

    /// Removes one entry unless someone holds its lock or a live lease
    /// appeared since it was listed. Returns whether it was removed.
    fn evict(&self, entry: &EntryInfo) -> Result<bool, CacheError> {
        let name = super::entry_name(&entry.checksum);
        let Some(_lock) = self.lock_entry_blocking(&name, false)? else {
            tracing::info!(checksum = %entry.checksum, "Cache entry is locked; keeping it");
            return Ok(false);
        };
        if self.read_leases(&name)?.iter().any(|(_, l)| l.live) {
            return Ok(false);
        }
        match fs::remove_file(&entry.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &entry.path)(e)),
        }
        let _ = fs::remove_dir(self.leases_dir().join(&name));
        // Removing the lock file while holding it is safe: waiters check
        // that the path still names the inode they locked.
        let _ = fs::remove_file(self.lock_path(&name));
        tracing::info!(checksum = %entry.checksum, size = entry.size, "Evicted cache entry");
        Ok(true)
    }

    fn remove_dead_leases(&self) -> Result<usize, CacheError> {
        let leases = self.leases_dir();
        let mut removed = 0;
        for dirent in fs::read_dir(&leases).map_err(io_err("read", &leases))? {
            let dirent = dirent.map_err(io_err("read", &leases))?;
            let name = dirent.file_name().to_string_lossy().into_owned();
            if parse_entry_name(&name).is_none() {
                continue;
            }
            for (path, lease) in self.read_leases(&name)? {
                if !lease.live {
                    tracing::info!(entry = %name, holder = %lease.holder, pid = lease.pid, "Removing dead lease");
                    match fs::remove_file(&path) {
                        Ok(()) => removed += 1,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err("remove lease", &path)(e)),
                    }
                }
            }
            if !self.images_dir().join(&name).exists() {
                // Fails harmlessly while a lease is still in it.
                let _ = fs::remove_dir(dirent.path());
            }
        }
        Ok(removed)
    }

    /// Partial downloads older than [`TEMP_GRACE`] whose entry nobody has
    /// locked: left by a process that died mid-download.
    fn remove_abandoned_temps(&self) -> Result<usize, CacheError> {
        let tmp = self.tmp_dir();
        let now = SystemTime::now();
        let mut removed = 0;
        for dirent in fs::read_dir(&tmp).map_err(io_err("read", &tmp))? {
            let dirent = dirent.map_err(io_err("read", &tmp))?;
            let path = dirent.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if age < TEMP_GRACE {
                continue;
            }
            let file_name = dirent.file_name().to_string_lossy().into_owned();
            let entry = file_name.split('.').next().unwrap_or_default();
            let _lock = match parse_entry_name(entry) {
                Some(_) => match self.lock_entry_blocking(entry, false)? {
                    Some(lock) => Some(lock),
                    None => continue, // being downloaded right now
                },
                None => None, // not ours to lock, but tmp/ is ours alone
            };
            tracing::info!(path = %path.display(), age_s = age.as_secs(), "Removing abandoned partial download");
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &path)(e)),
            }
        }
        Ok(removed)
    }

    fn remove_orphan_locks(&self) -> Result<(), CacheError> {
        let locks = self.root().join(LOCKS);
        for dirent in fs::read_dir(&locks).map_err(io_err("read", &locks))? {
            let dirent = dirent.map_err(io_err("read", &locks))?;
            let file_name = dirent.file_name().to_string_lossy().into_owned();
            let Some(name) = file_name.strip_suffix(".lock") else {
                continue;
            };
            if parse_entry_name(name).is_none() || self.root().join(IMAGES).join(name).exists() {
                continue;
            }
            if let Some(_lock) = self.lock_entry_blocking(name, false)? {
                let _ = fs::remove_file(dirent.path());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn evicts_least_recently_used_first_until_within_size() {
        // (name, last use, size)
        let entries = vec![
            ("new", at(30), 10),
            ("old", at(10), 10),
            ("mid", at(20), 10),
        ];
        let (evicted, kept, total) = evict_lru(entries, 15, |e| (e.1, e.2), |_| true);
        let names: Vec<_> = evicted.iter().map(|e| e.0).collect();
        assert_eq!(names, ["old", "mid"]);
        assert!(kept.is_empty());
        assert_eq!(total, 10);
    }

    #[test]
    fn leased_entries_are_skipped_and_reported() {
        let entries = vec![
            ("old", at(10), 10),
            ("mid", at(20), 10),
            ("new", at(30), 10),
        ];
        let (evicted, kept, total) = evict_lru(entries, 0, |e| (e.1, e.2), |e| e.0 != "old");
        let names: Vec<_> = evicted.iter().map(|e| e.0).collect();
        assert_eq!(names, ["mid", "new"]);
        assert_eq!(kept.iter().map(|e| e.0).collect::<Vec<_>>(), ["old"]);
        assert_eq!(total, 10, "the leased image stays, so 0 is out of reach");
    }

    #[test]
    fn nothing_is_evicted_when_already_within_size() {
        let entries = vec![("a", at(1), 5), ("b", at(2), 5)];
        let (evicted, kept, total) =
            evict_lru(entries, 10, |e| (e.1, e.2), |_| panic!("no eviction"));
        assert!(evicted.is_empty() && kept.is_empty());
        assert_eq!(total, 10);
    }
}
