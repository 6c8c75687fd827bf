//! The writing half of a download: a temporary file in the cache and the
//! running digest of exactly the bytes written to it.
//!
//! The network side runs on tokio; hashing and writing run on a blocking
//! thread fed through a bounded channel, so receiving the next chunk
//! overlaps with hashing and writing the previous ones (two cores busy, not
//! one), and a slow disk pushes back on the socket instead of filling
//! memory.

use std::io::{self, IoSlice, Seek, SeekFrom, Write};

use bytes::Bytes;
use tempfile::NamedTempFile;
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinHandle};

use crate::digest::Hasher;

/// Chunks in flight between the receiver and the writer. hyper hands out
/// chunks of up to a few hundred KiB, so this bounds memory to a few MiB.
const CHANNEL_DEPTH: usize = 64;

/// At most this many chunks go into one write(2).
const MAX_BATCH: usize = 32;

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

    /// Appends `chunks` with as few syscalls as possible, then hashes them.
    pub fn write_all(&mut self, chunks: &[Bytes]) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match self.temp.as_file_mut().write_vectored(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        for chunk in chunks {
            self.hasher.update(chunk);
            self.written += chunk.len() as u64;
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

/// A [`Sink`] running on a blocking thread.
pub struct Pump {
    tx: mpsc::Sender<Bytes>,
    handle: JoinHandle<(Sink, io::Result<()>)>,
}

impl Pump {
    pub fn start(mut sink: Sink) -> Pump {
        let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
        let handle = tokio::task::spawn_blocking(move || {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            while let Some(chunk) = rx.blocking_recv() {
                batch.push(chunk);
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(chunk) => batch.push(chunk),
                        Err(_) => break,
                    }
                }
                if let Err(e) = sink.write_all(&batch) {
                    // Dropping the receiver tells the sender to stop.
                    return (sink, Err(e));
                }
                batch.clear();
            }
            (sink, Ok(()))
        });
        Pump { tx, handle }
    }

    /// Queues a chunk; false once the writer stopped on an error (which
    /// [`Pump::close`] returns).
    pub async fn send(&self, chunk: Bytes) -> bool {
        self.tx.send(chunk).await.is_ok()
    }

    /// Waits for every queued chunk to be written and returns the sink with
    /// the writer's outcome.
    pub async fn close(self) -> Result<(Sink, io::Result<()>), JoinError> {
        drop(self.tx);
        self.handle.await
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
