//! `file://` sources: confined to the directories the operator opened
//! (`fetch.file_dirs`) or a front end vouches for, then copied into the
//! cache through the same pipeline as a download (read on one blocking
//! thread, written and hashed on two others), with the same size limit and
//! free-space check.

use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use reqwest::Url;

use super::progress::Progress;
use super::sink::{Pump, Sink};
use super::{FetchConfig, FetchError, check_space};
use crate::cache::Cache;

/// Where a `file://` source really is, once symlinks and `..` are
/// resolved, if that lies inside one of `allowed` (directories, or single
/// files, themselves resolved). Nothing outside is opened, and the error
/// for a path outside does not say whether it exists.
pub(super) fn resolve(allowed: &[PathBuf], url: &Url) -> Result<PathBuf, FetchError> {
    let outside = || FetchError::FileOutside {
        url: url.to_string(),
    };
    if allowed.is_empty() {
        return Err(FetchError::FileSourcesClosed {
            url: url.to_string(),
        });
    }
    let path = url
        .to_file_path()
        .map_err(|()| FetchError::UnsupportedScheme {
            source_url: url.to_string(),
        })?;
    let roots: Vec<PathBuf> = allowed
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    match std::fs::canonicalize(&path) {
        Ok(real) if within(&roots, &real) => Ok(real),
        Ok(_) => Err(outside()),
        // Say why only where the operator allowed reading: elsewhere the
        // error would tell a task which host files exist.
        Err(source) if allowed.iter().any(|r| path.starts_with(r)) => {
            Err(FetchError::ReadSource { path, source })
        }
        Err(_) => Err(outside()),
    }
}

fn within(roots: &[PathBuf], path: &Path) -> bool {
    roots.iter().any(|root| path.starts_with(root))
}

/// Opens the resolved source without following a symlink, without
/// blocking on a FIFO, and checks again where the opened file is: a
/// directory inside an allowed one swapped for a symlink since
/// [`resolve`] must not lead outside.
fn open_confined(allowed: &[PathBuf], path: &Path) -> std::io::Result<Option<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let opened = std::fs::read_link(format!("/proc/self/fd/{fd}"))?;
    let roots: Vec<PathBuf> = allowed
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect();
    Ok(within(&roots, &opened).then_some(file))
}

/// Copies a `file://` image through the same pipeline as a download:
/// read on a blocking thread, hashed and written on another.
pub(super) async fn copy(
    config: &FetchConfig,
    allowed: &[PathBuf],
    cache: &Cache,
    url: &Url,
    sink: Sink,
    observer: Option<super::progress::Observer>,
) -> Result<(Sink, u64), FetchError> {
    let path = resolve(allowed, url)?;
    let limit = config.max_image_size.0;
    let read_err = |source| FetchError::ReadSource {
        path: path.clone(),
        source,
    };
    let Some(file) = open_confined(allowed, &path).map_err(read_err)? else {
        return Err(FetchError::FileOutside {
            url: url.to_string(),
        });
    };
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(FetchError::SourceNotFile { path });
    }
    if meta.len() > limit {
        return Err(FetchError::TooLarge {
            url: url.to_string(),
            size: meta.len(),
            limit,
        });
    }
    check_space(cache, meta.len())?;
    let mut progress = Progress::new(url.as_str(), observer);
    progress.set_total(Some(meta.len()));
    let pump = Pump::start(sink);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
    let reader = tokio::task::spawn_blocking(move || read_chunks(file, &tx));
    let mut copied = 0u64;
    let mut outcome = Ok(());
    while let Some(chunk) = rx.recv().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                outcome = Err(read_err(e));
                break;
            }
        };
        copied += chunk.len() as u64;
        if copied > limit {
            outcome = Err(FetchError::TooLargeStreaming {
                url: url.to_string(),
                limit,
            });
            break;
        }
        progress.update(copied);
        if !pump.send(chunk).await {
            break;
        }
    }
    drop(rx);
    let _ = reader.await;
    let (sink, written) = pump.close().await.map_err(FetchError::Blocking)?;
    written.map_err(|source| FetchError::Write {
        dir: cache.tmp_dir(),
        source,
    })?;
    outcome?;
    Ok((sink, copied))
}

fn read_chunks(mut file: std::fs::File, tx: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>) {
    use std::io::Read;
    const CHUNK: usize = 1 << 20;
    loop {
        let mut buf = bytes::BytesMut::zeroed(CHUNK);
        let n = match file.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        buf.truncate(n);
        if tx.blocking_send(Ok(buf.freeze())).is_err() {
            return;
        }
    }
}
