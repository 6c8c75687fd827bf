//! A task's logs as a response body: qemu's own output or the serial
//! console, read from the task directory, and with `follow` kept open and
//! read again as it grows until the task ends.
//!
//! Following polls the file's size every [`FOLLOW_TICK`] (and wakes early
//! on a state change): only while someone follows, so an idle agent does
//! no work at all.

use std::convert::Infallible;
use std::io::SeekFrom;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::StreamBody;
use http_body_util::combinators::BoxBody;
use hyper::body::Frame;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio::sync::mpsc;

use super::TaskHandle;

const FOLLOW_TICK: Duration = Duration::from_millis(250);
const CHUNK: usize = 64 * 1024;

/// Opens a log without following a symlink: the task directory belongs to
/// the VM's user, who could plant one pointing anywhere.
fn open(path: &PathBuf) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// The body streaming `path`; with `follow`, until the task has ended.
pub(super) fn body(
    path: PathBuf,
    follow: bool,
    handle: Arc<TaskHandle>,
) -> BoxBody<Bytes, Infallible> {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        if let Err(e) = pump(&path, follow, &handle, &tx).await {
            let _ = tx
                .send(Bytes::from(format!(
                    "\n[qemu-executor: log read failed: {e}]\n"
                )))
                .await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    BoxBody::new(StreamBody::new(stream))
}

async fn pump(
    path: &PathBuf,
    follow: bool,
    handle: &TaskHandle,
    tx: &mpsc::Sender<Bytes>,
) -> std::io::Result<()> {
    let mut states = handle.watch();
    let mut file: Option<(tokio::fs::File, u64)> = None;
    let mut offset = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        // Taken before reading: whatever qemu wrote before the task ended
        // is read in this round.
        let ended = handle.state().is_terminal();
        // (Re)open when the file appears or is replaced by a new one.
        let on_disk = std::fs::symlink_metadata(path).ok();
        let replaced = match (&file, &on_disk) {
            (Some((_, ino)), Some(meta)) => meta.ino() != *ino,
            (None, Some(_)) => true,
            _ => false,
        };
        if replaced {
            match open(path) {
                Ok(f) => {
                    let ino = f.metadata()?.ino();
                    file = Some((tokio::fs::File::from_std(f), ino));
                    offset = 0;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if let Some((f, _)) = &mut file {
            // qemu truncates the serial log when a VM restarts.
            if on_disk.as_ref().is_some_and(|m| m.len() < offset) {
                offset = 0;
            }
            f.seek(SeekFrom::Start(offset)).await?;
            loop {
                let n = f.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                offset += n as u64;
                if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                    return Ok(());
                }
            }
        }
        if !follow {
            if file.is_none() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{} does not exist yet", path.display()),
                ));
            }
            return Ok(());
        }
        if ended {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_TICK) => {}
            _ = states.changed() => {}
            _ = tx.closed() => return Ok(()),
        }
    }
}
