//! The content-addressed image store.
//!
//! Layout under the cache directory:
//! ```text
//! images/<algo>-<hex>          verified images, read-only (0444), named by checksum
//! tmp/<algo>-<hex>.<random>    downloads in progress (or left by a crash)
//! locks/<algo>-<hex>.lock      one flock(2) per entry: held while fetching or evicting it
//! leases/<algo>-<hex>/<holder> who uses an image: pid and process start time
//! ```
//! An entry exists only once its content was verified: it is written in
//! `tmp/`, hashed while written, then renamed into `images/`. Its mtime is
//! its last use (touched on every hit and lease), which `gc` evicts by.
//!
//! Trust: the cache directory belongs to the executor's user. Entries are
//! opened with `O_NOFOLLOW` and must be regular files; a symlink or another
//! kind of file planted under `images/` is refused with an error and left
//! for the operator to inspect (it means someone else wrote into the cache).
//! A regular entry that is writable, or owned by another user, may have been
//! changed since it was verified: it is removed and fetched again.

mod gc;
mod lease;

pub use gc::{EntryInfo, GcReport};
pub use lease::{Lease, LeaseInfo};

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::futimens;
use nix::sys::time::TimeSpec;
use policy_sdk::{Checksum, ChecksumAlgorithm};
use tempfile::NamedTempFile;

/// Mode of a verified entry: nobody writes it again, qemu reads it.
pub const ENTRY_MODE: u32 = 0o444;

const IMAGES: &str = "images";
const TMP: &str = "tmp";
const LOCKS: &str = "locks";
const LEASES: &str = "leases";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("Cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cache directory {path} is a symlink or not a directory: refusing to use it")]
    NotADirectory { path: PathBuf },
    #[error(
        "Cache entry {path} is a symlink: refusing to follow it (remove it if you did not put it there)"
    )]
    Symlink { path: PathBuf },
    #[error(
        "Cache entry {path} is not a regular file: refusing to use it (remove it if you did not put it there)"
    )]
    NotRegular { path: PathBuf },
    #[error("Nothing is cached for {checksum}: fetch it first")]
    NotCached { checksum: Checksum },
    #[error("Invalid lease holder id {holder:?}: {problem}")]
    InvalidHolder {
        holder: String,
        problem: &'static str,
    },
    #[error("Process {pid} does not exist, so it cannot hold a lease")]
    NoSuchProcess { pid: u32 },
    #[error("Cannot lock cache entry {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The file name of the entry for `checksum`: `md5-<hex>`. No `:` so the
/// path is safe in qemu option strings and on every filesystem.
pub fn entry_name(checksum: &Checksum) -> String {
    format!("{}-{}", checksum.algorithm, checksum.digest)
}

/// The checksum an entry name stands for, if it is one.
pub fn parse_entry_name(name: &str) -> Option<Checksum> {
    let (algo, hex) = name.split_once('-')?;
    let algorithm = match algo {
        "md5" => ChecksumAlgorithm::Md5,
        "sha256" => ChecksumAlgorithm::Sha256,
        "sha512" => ChecksumAlgorithm::Sha512,
        _ => return None,
    };
    // Only the canonical spelling: lower-case hex of the right length, so
    // one checksum never has two entries.
    if hex.len() != algorithm.hex_len()
        || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    Some(Checksum {
        algorithm,
        digest: hex.to_string(),
    })
}

/// A verified image in the cache.
#[derive(Debug)]
pub struct Entry {
    pub path: PathBuf,
    pub size: u64,
}

/// A handle on the cache directory. Cheap to clone; clones share the
/// in-process bookkeeping that makes concurrent fetches of one image end in
/// a single download.
#[derive(Debug, Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// One async mutex per entry being locked in this process, so waiters
    /// queue without each blocking a thread on flock(2).
    inflight: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

/// Holds an entry's lock: the flock (other processes) and the in-process
/// mutex (other tasks of this process). Released on drop.
#[derive(Debug)]
pub struct EntryLock {
    _flock: Flock<File>,
    _local: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Cache {
    /// Opens the cache at `dir`, creating its layout if needed.
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        // The top directory may be a symlink an operator set up; the layout
        // inside it is ours and must be real directories.
        create_dir(dir, 0o755, true)?;
        // Locks are private: anyone who can open a lock file can flock it
        // and stall our fetches. Images and leases may be read by others.
        for (sub, mode) in [
            (IMAGES, 0o755),
            (TMP, 0o700),
            (LOCKS, 0o700),
            (LEASES, 0o755),
        ] {
            create_dir(&dir.join(sub), mode, false)?;
        }
        let tag = dir.join("CACHEDIR.TAG");
        if fs::symlink_metadata(&tag).is_err() {
            // Tells backup tools to skip gigabytes of re-fetchable images.
            let _ = fs::write(
                &tag,
                "Signature: 8a477f597d28d172789f06886806bc55\n# qemu-executor image cache\n",
            );
        }
        Ok(Cache {
            inner: Arc::new(Inner {
                root: dir.to_path_buf(),
                inflight: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.inner.root.join(TMP)
    }

    fn images_dir(&self) -> PathBuf {
        self.inner.root.join(IMAGES)
    }

    fn leases_dir(&self) -> PathBuf {
        self.inner.root.join(LEASES)
    }

    fn lock_path(&self, name: &str) -> PathBuf {
        self.inner.root.join(LOCKS).join(format!("{name}.lock"))
    }

    /// Where the entry for `checksum` lives (whether or not it exists yet).
    pub fn entry_path(&self, checksum: &Checksum) -> PathBuf {
        self.images_dir().join(entry_name(checksum))
    }

    /// The verified entry for `checksum`, its last use updated; `None` when
    /// there is none (or there was an untrustworthy one, now removed).
    pub fn lookup(&self, checksum: &Checksum) -> Result<Option<Entry>, CacheError> {
        let path = self.entry_path(checksum);
        let Some(file) = open_entry(&path)? else {
            return Ok(None);
        };
        let meta = file.metadata().map_err(io_err("inspect", &path))?;
        let foreign = meta.uid() != nix::unistd::geteuid().as_raw();
        if meta.mode() & 0o222 != 0 || foreign {
            // Verified content is only ever stored 0444 and owned by us: a
            // writable or foreign entry may no longer match its name.
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", meta.mode() & 0o7777),
                uid = meta.uid(),
                "Cache entry is writable or owned by another user; removing it and fetching again"
            );
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
            return Ok(None);
        }
        touch(&file, &path)?;
        Ok(Some(Entry {
            path,
            size: meta.len(),
        }))
    }

    /// Locks the entry for `checksum` against other processes and other
    /// tasks of this one; waits as long as another holder has it.
    pub async fn lock_entry(&self, checksum: &Checksum) -> Result<EntryLock, CacheError> {
        let name = entry_name(checksum);
        let mutex = self.local_mutex(&name);
        let local = match mutex.clone().try_lock_owned() {
            Ok(guard) => guard,
            Err(_) => {
                tracing::info!(checksum = %checksum, "Another task is fetching this image; waiting for it");
                mutex.lock_owned().await
            }
        };
        let path = self.lock_path(&name);
        // The uncontended case is two quick syscalls, fine on this thread.
        if let Some(flock) = flock_path(&path, false)? {
            return Ok(EntryLock {
                _flock: flock,
                _local: Some(local),
            });
        }
        tracing::info!(checksum = %checksum, lock = %path.display(), "Another process is fetching this image; waiting for it");
        let flock = tokio::task::spawn_blocking(move || flock_path(&path, true))
            .await
            .map_err(|e| CacheError::Io {
                action: "wait for the lock",
                path: self.lock_path(&name),
                source: io::Error::other(e),
            })??
            .expect("a blocking flock returns a lock");
        Ok(EntryLock {
            _flock: flock,
            _local: Some(local),
        })
    }

    /// Locks the entry named `name` from synchronous code, blocking the
    /// thread; `None` if `wait` is false and someone holds it.
    fn lock_entry_blocking(&self, name: &str, wait: bool) -> Result<Option<EntryLock>, CacheError> {
        Ok(
            flock_path(&self.lock_path(name), wait)?.map(|flock| EntryLock {
                _flock: flock,
                _local: None,
            }),
        )
    }

    fn local_mutex(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.retain(|_, weak| weak.strong_count() > 0);
        if let Some(existing) = map.get(name).and_then(Weak::upgrade) {
            return existing;
        }
        let fresh = Arc::new(tokio::sync::Mutex::new(()));
        map.insert(name.to_string(), Arc::downgrade(&fresh));
        fresh
    }

    /// A new temporary file for the entry, with an unpredictable name.
    pub fn temp_file(
        &self,
        checksum: &Checksum,
        _lock: &EntryLock,
    ) -> Result<NamedTempFile, CacheError> {
        let tmp = self.tmp_dir();
        tempfile::Builder::new()
            .prefix(&format!("{}.", entry_name(checksum)))
            .permissions(fs::Permissions::from_mode(0o600))
            .tempfile_in(&tmp)
            .map_err(io_err("create a temporary file in", &tmp))
    }

    /// Removes partial downloads of this entry left by a process that died;
    /// holding the lock proves nobody is writing them.
    pub fn remove_stale_temps(
        &self,
        checksum: &Checksum,
        _lock: &EntryLock,
    ) -> Result<usize, CacheError> {
        let prefix = format!("{}.", entry_name(checksum));
        let tmp = self.tmp_dir();
        let mut removed = 0;
        for dirent in fs::read_dir(&tmp).map_err(io_err("read", &tmp))? {
            let dirent = dirent.map_err(io_err("read", &tmp))?;
            if dirent.file_name().to_string_lossy().starts_with(&prefix) {
                let path = dirent.path();
                tracing::info!(path = %path.display(), "Removing a partial download left behind");
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Makes a verified, synced temporary file the entry for `checksum`:
    /// read-only, renamed into place without replacing anything, and the
    /// directory synced so the rename survives a crash.
    pub fn commit(
        &self,
        temp: NamedTempFile,
        checksum: &Checksum,
        _lock: &EntryLock,
    ) -> Result<PathBuf, CacheError> {
        let dest = self.entry_path(checksum);
        temp.as_file()
            .set_permissions(fs::Permissions::from_mode(ENTRY_MODE))
            .map_err(io_err("make read-only", temp.path()))?;
        // No clobber: whatever sits at `dest` now (say a symlink planted
        // since the lookup) makes this fail rather than be replaced.
        temp.persist_noclobber(&dest).map_err(|e| CacheError::Io {
            action: "move the verified image to",
            path: dest.clone(),
            source: e.error,
        })?;
        let images = self.images_dir();
        File::open(&images)
            .and_then(|dir| dir.sync_all())
            .map_err(io_err("sync", &images))?;
        Ok(dest)
    }

    /// Bytes available to us on the cache's filesystem.
    pub fn free_space(&self) -> Result<u64, CacheError> {
        let tmp = self.tmp_dir();
        let st = nix::sys::statvfs::statvfs(&tmp).map_err(|e| CacheError::Io {
            action: "measure free space in",
            path: tmp.clone(),
            source: e.into(),
        })?;
        Ok(st.blocks_available().saturating_mul(st.fragment_size()))
    }
}

fn create_dir(path: &Path, mode: u32, follow: bool) -> Result<(), CacheError> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("create directory", path)(e)),
    }
    let meta = if follow {
        fs::metadata(path)
    } else {
        fs::symlink_metadata(path)
    };
    match meta {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(CacheError::NotADirectory {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(io_err("inspect", path)(e)),
    }
}

/// Opens an entry without following a symlink, and only if it is a regular
/// file. `O_NONBLOCK` so a planted FIFO cannot hang us in open(2).
fn open_entry(path: &Path) -> Result<Option<File>, CacheError> {
    let flags = OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(CacheError::Symlink {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let meta = file.metadata().map_err(io_err("inspect", path))?;
    if !meta.is_file() {
        return Err(CacheError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    Ok(Some(file))
}

/// Records a use of the entry: its mtime is its place in the LRU order.
fn touch(file: &File, path: &Path) -> Result<(), CacheError> {
    futimens(file, &TimeSpec::UTIME_NOW, &TimeSpec::UTIME_NOW).map_err(|e| CacheError::Io {
        action: "record the use of",
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// flock(2) on the lock file at `path`. A lock file can be removed by gc
/// between our open and our flock; then we hold a lock nobody else can
/// see, so check that the path still names our inode and start over if not.
fn flock_path(path: &Path, wait: bool) -> Result<Option<Flock<File>>, CacheError> {
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
            .open(path)
            .map_err(io_err("open lock file", path))?;
        let arg = if wait {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockExclusiveNonblock
        };
        let flock = match Flock::lock(file, arg) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if !wait => return Ok(None),
            Err((_, nix::errno::Errno::EINTR)) => continue,
            Err((_, errno)) => {
                return Err(CacheError::Lock {
                    path: path.to_path_buf(),
                    source: errno,
                });
            }
        };
        let ours = flock.metadata().map_err(io_err("inspect", path))?;
        match fs::symlink_metadata(path) {
            Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {
                return Ok(Some(flock));
            }
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("inspect", path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MD5: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn entry_names_round_trip() {
        let sum: Checksum = format!("md5:{MD5}").parse().unwrap();
        assert_eq!(entry_name(&sum), format!("md5-{MD5}"));
        assert_eq!(parse_entry_name(&entry_name(&sum)), Some(sum));
        let sha: Checksum = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        assert_eq!(parse_entry_name(&entry_name(&sha)), Some(sha));
    }

    #[test]
    fn foreign_names_are_not_entries() {
        for name in [
            "md5",
            "md5-",
            "md5-0123",
            &format!("md5-{}", MD5.to_uppercase()),
            &format!("md5:{MD5}"),
            &format!("crc32-{MD5}"),
            &format!("md5-{MD5}.lock"),
            &format!("md5-{MD5}.tmpXYZ"),
            &format!("md5-../{}", &MD5[3..]),
        ] {
            assert_eq!(parse_entry_name(name), None, "{name}");
        }
    }

    #[test]
    fn lookup_refuses_symlinks_and_replaces_writable_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let sum: Checksum = format!("md5:{MD5}").parse().unwrap();
        assert!(cache.lookup(&sum).unwrap().is_none());

        let target = dir.path().join("secret");
        fs::write(&target, b"not an image").unwrap();
        std::os::unix::fs::symlink(&target, cache.entry_path(&sum)).unwrap();
        let err = cache.lookup(&sum).unwrap_err();
        assert!(matches!(err, CacheError::Symlink { .. }), "{err}");
        fs::remove_file(cache.entry_path(&sum)).unwrap();

        fs::write(cache.entry_path(&sum), b"tampered").unwrap();
        assert!(cache.lookup(&sum).unwrap().is_none());
        assert!(!cache.entry_path(&sum).exists());

        fs::write(cache.entry_path(&sum), b"good").unwrap();
        fs::set_permissions(cache.entry_path(&sum), fs::Permissions::from_mode(0o444)).unwrap();
        let entry = cache.lookup(&sum).unwrap().unwrap();
        assert_eq!(entry.size, 4);
    }

    #[test]
    fn layout_symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join(IMAGES)).unwrap();
        let err = Cache::open(dir.path()).unwrap_err();
        assert!(matches!(err, CacheError::NotADirectory { .. }), "{err}");
    }
}
