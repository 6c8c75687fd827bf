//! The writing half of a download: a temporary file in the cache and the
//! running digest of exactly the bytes written to it.
//!
//! The network side runs on tokio; writing and hashing each run on a
//! blocking thread fed through a bounded channel with the same chunks
//! (`Bytes` are shared, not copied). So receiving, writing and hashing
//! overlap: the slowest of the three sets the pace (MD5, about 650 MB/s per
//! core), not their sum. A slow disk pushes back on the socket instead of
//! filling memory.

use std::io::{self, IoSlice, Seek, SeekFrom, Write};

use bytes::Bytes;
use tempfile::NamedTempFile;
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinHandle};

use crate::digest::Hasher;

/// Chunks in flight to each thread. hyper hands out chunks of up to a few
/// hundred KiB, so this bounds memory to a few tens of MiB at most.
const CHANNEL_DEPTH: usize = 64;

/// At most this many chunks go into one write(2).
const MAX_BATCH: usize = 32;

/// Disk writeback is started every this many bytes, see [`Writeback`].
const WRITEBACK_WINDOW: u64 = 32 << 20;

/// A partial download. Invariant: `hasher` has seen exactly the first
/// `written` bytes of the file, in order, so a resumed download continues
/// the same digest without reading anything back.
#[derive(Debug)]
pub struct Sink {
    temp: NamedTempFile,
    hasher: Hasher,
    written: u64,
}

impl Sink {
    pub fn new(temp: NamedTempFile, hasher: Hasher) -> Self {
        Sink {
            temp,
            hasher,
            written: 0,
        }
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Back to an empty file and a fresh digest, for a server that ignored
    /// our Range request or a resume that cannot be trusted.
    pub fn reset(&mut self) -> io::Result<()> {
        let file = self.temp.as_file_mut();
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        self.hasher = Hasher::new(self.hasher.algorithm());
        self.written = 0;
        Ok(())
    }

    /// Appends and hashes `chunks` on the calling thread.
    #[cfg(test)]
    pub fn write_all(&mut self, chunks: &[Bytes]) -> io::Result<()> {
        self.written += write_chunks(self.temp.as_file_mut(), chunks)?;
        for chunk in chunks {
            self.hasher.update(chunk);
        }
        Ok(())
    }

    /// The digest of everything written so far, without ending the sink.
    pub fn digest_hex(&self) -> String {
        self.hasher.clone().finalize_hex()
    }

    /// Flushes the file to disk and hands it over for the rename.
    pub fn finish(self) -> io::Result<(NamedTempFile, String, u64)> {
        self.temp.as_file().sync_all()?;
        Ok((self.temp, self.hasher.finalize_hex(), self.written))
    }
}

/// Appends `chunks` with as few syscalls as possible; returns the bytes
/// written.
fn write_chunks(file: &mut std::fs::File, chunks: &[Bytes]) -> io::Result<u64> {
    let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(chunks.iter().map(|c| c.len() as u64).sum())
}

/// Starts the disk writeback of the file while it is still being written.
///
/// Without it the kernel keeps the whole image dirty in memory and the
/// final fsync(2) then waits for all of it (0.6 s for 1 GiB here, GiBs of
/// dirty memory for a large image). Every [`WRITEBACK_WINDOW`] bytes this
/// starts writeback of the window just written and waits for the one
/// before, so the disk works during the download, the final fsync only has
/// the last two windows left, and dirty memory stays bounded. Best effort:
/// errors are ignored here because the final fsync reports them.
struct Writeback {
    started_to: u64,
    synced_to: u64,
}

impl Writeback {
    fn new(offset: u64) -> Self {
        Writeback {
            started_to: offset,
            synced_to: offset,
        }
    }

    fn advance(&mut self, file: &std::fs::File, written: u64) {
        use nix::libc::{
            SYNC_FILE_RANGE_WAIT_AFTER, SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE,
        };
        use std::os::fd::AsRawFd;
        if written < self.started_to + WRITEBACK_WINDOW {
            return;
        }
        let fd = file.as_raw_fd();
        let range = |from: u64, to: u64| {
            (
                from as nix::libc::off64_t,
                (to - from) as nix::libc::off64_t,
            )
        };
        let (off, len) = range(self.synced_to, self.started_to);
        if len > 0 {
            let wait =
                SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER;
            // SAFETY: sync_file_range only reads its integer arguments; `fd`
            // is open for the whole call since `file` is borrowed.
            unsafe { nix::libc::sync_file_range(fd, off, len, wait) };
        }
        let (off, len) = range(self.started_to, written);
        // SAFETY: as above.
        unsafe { nix::libc::sync_file_range(fd, off, len, SYNC_FILE_RANGE_WRITE) };
        self.synced_to = self.started_to;
        self.started_to = written;
    }
}

type WriterResult = (NamedTempFile, u64, io::Result<()>);

/// A [`Sink`] running on two blocking threads, one writing, one hashing.
pub struct Pump {
    to_writer: mpsc::Sender<Bytes>,
    to_hasher: mpsc::Sender<Bytes>,
    writer: JoinHandle<WriterResult>,
    hasher: JoinHandle<Hasher>,
}

impl Pump {
    pub fn start(sink: Sink) -> Pump {
        let Sink {
            mut temp,
            mut hasher,
            written,
        } = sink;
        let (to_writer, mut chunks) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
        let writer = tokio::task::spawn_blocking(move || {
            let mut written = written;
            let mut writeback = Writeback::new(written);
            let mut batch = Vec::with_capacity(MAX_BATCH);
            while let Some(chunk) = chunks.blocking_recv() {
                batch.push(chunk);
                while batch.len() < MAX_BATCH {
                    match chunks.try_recv() {
                        Ok(chunk) => batch.push(chunk),
                        Err(_) => break,
                    }
                }
                match write_chunks(temp.as_file_mut(), &batch) {
                    Ok(n) => {
                        written += n;
                        writeback.advance(temp.as_file(), written);
                    }
                    // Returning drops the receiver, which tells the sender.
                    Err(e) => return (temp, written, Err(e)),
                }
                batch.clear();
            }
            (temp, written, Ok(()))
        });
        let (to_hasher, mut pieces) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
        let hasher = tokio::task::spawn_blocking(move || {
            while let Some(piece) = pieces.blocking_recv() {
                hasher.update(&piece);
            }
            hasher
        });
        Pump {
            to_writer,
            to_hasher,
            writer,
            hasher,
        }
    }

    /// Queues a chunk; false once the writer stopped on an error (which
    /// [`Pump::close`] returns).
    pub async fn send(&self, chunk: Bytes) -> bool {
        if self.to_writer.send(chunk.clone()).await.is_err() {
            return false;
        }
        // The hasher only stops when its sender is dropped.
        self.to_hasher.send(chunk).await.is_ok()
    }

    /// Waits for every queued chunk to be written and hashed, and returns
    /// the sink with the writer's outcome. After a write error the digest
    /// may cover bytes that never reached the file: such a sink is only
    /// good for dropping (which removes its file), never for resuming.
    pub async fn close(self) -> Result<(Sink, io::Result<()>), JoinError> {
        drop(self.to_writer);
        drop(self.to_hasher);
        let (temp, written, outcome) = self.writer.await?;
        let hasher = self.hasher.await?;
        Ok((
            Sink {
                temp,
                hasher,
                written,
            },
            outcome,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_sdk::ChecksumAlgorithm;

    fn md5_hex(data: &[u8]) -> String {
        let mut h = Hasher::new(ChecksumAlgorithm::Md5);
        h.update(data);
        h.finalize_hex()
    }

    #[tokio::test]
    async fn pumped_chunks_land_in_order_and_hash_once() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::new(
            NamedTempFile::new_in(dir.path()).unwrap(),
            Hasher::new(ChecksumAlgorithm::Md5),
        );
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let pump = Pump::start(sink);
        for piece in data.chunks(7_001) {
            assert!(pump.send(Bytes::copy_from_slice(piece)).await);
        }
        let (sink, outcome) = pump.close().await.unwrap();
        outcome.unwrap();
        assert_eq!(sink.written(), data.len() as u64);
        assert_eq!(sink.digest_hex(), md5_hex(&data));
        let (temp, digest, size) = sink.finish().unwrap();
        assert_eq!(std::fs::read(temp.path()).unwrap(), data);
        assert_eq!((digest, size), (md5_hex(&data), data.len() as u64));
    }

    #[test]
    fn reset_starts_the_file_and_digest_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = Sink::new(
            NamedTempFile::new_in(dir.path()).unwrap(),
            Hasher::new(ChecksumAlgorithm::Md5),
        );
        sink.write_all(&[Bytes::from_static(b"stale prefix")])
            .unwrap();
        sink.reset().unwrap();
        sink.write_all(&[Bytes::from_static(b"ab"), Bytes::from_static(b"c")])
            .unwrap();
        let (temp, digest, size) = sink.finish().unwrap();
        assert_eq!(std::fs::read(temp.path()).unwrap(), b"abc");
        assert_eq!(
            (digest.as_str(), size),
            ("900150983cd24fb0d6963f7d28e17f72", 3)
        );
    }
}
