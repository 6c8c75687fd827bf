//! `file://` sources: copied into the cache through the same pipeline as
//! a download (read on one blocking thread, written and hashed on two
//! others), with the same size limit and free-space check.

use bytes::Bytes;
use reqwest::Url;

use super::progress::Progress;
use super::sink::{Pump, Sink};
use super::{FetchConfig, FetchError, check_space};
use crate::cache::Cache;

/// Copies a `file://` image through the same pipeline as a download:
/// read on a blocking thread, hashed and written on another.
pub(super) async fn copy(
    config: &FetchConfig,
    cache: &Cache,
    url: &Url,
    sink: Sink,
    observer: Option<super::progress::Observer>,
) -> Result<(Sink, u64), FetchError> {
    let path = url
        .to_file_path()
        .map_err(|()| FetchError::UnsupportedScheme {
            source_url: url.to_string(),
        })?;
    let limit = config.max_image_size.0;
    let read_err = |source| FetchError::ReadSource {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(read_err)?;
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
