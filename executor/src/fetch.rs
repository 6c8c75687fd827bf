//! Fetching an image into the cache: HTTP(S) or a local file, hashed while
//! it is written, verified before it becomes an entry.
//!
//! One fetch: look the checksum up in the cache (a hit sends nothing to the
//! server); otherwise lock the entry (other processes and other tasks of
//! this one wait, then find the entry), stream the body into a temporary
//! file in the cache while hashing it, retry and resume on failures, compare
//! the digest, and rename the file into place read-only. Any failure drops
//! the temporary file, so nothing half-written stays behind.

mod http;
mod progress;
mod sink;

pub use http::{ContentRange, backoff_delay, parse_content_range};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use policy_sdk::Checksum;
use reqwest::Url;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::cache::{Cache, CacheError};
use crate::digest::Hasher;
use crate::units::{ByteSize, format_size};
use progress::Progress;
use sink::{Pump, Sink};

/// The `[fetch]` section of the operator's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    /// Largest image accepted, checked against Content-Length before the
    /// download and against the bytes as they arrive. Bytes, or a string
    /// such as `"64G"`. Default 64 GiB.
    pub max_image_size: ByteSize,
    /// Time to establish a connection (TCP and TLS). Default 10 000 ms.
    pub connect_timeout_ms: u64,
    /// Longest wait for the answer's headers or for the next piece of the
    /// body; the attempt is abandoned then (and retried). Default 30 000 ms.
    pub read_timeout_ms: u64,
    /// An attempt whose average speed over `min_speed_window_ms` falls below
    /// this many bytes per second is abandoned (and retried), so a server
    /// that trickles a byte at a time cannot hold a task forever. 0 turns
    /// the check off. Default 1024.
    pub min_speed_bytes_per_s: u64,
    /// Window for `min_speed_bytes_per_s`. Default 60 000 ms.
    pub min_speed_window_ms: u64,
    /// Redirects followed before giving up. Default 5.
    pub max_redirects: u32,
    /// Tries in all, the first included, on connection errors, timeouts,
    /// 5xx answers and truncated bodies. Default 5.
    pub max_attempts: u32,
    /// Delay before the second try; it doubles for each further one, with
    /// random jitter. Default 1000 ms.
    pub retry_base_delay_ms: u64,
    /// Upper bound of the delay between tries. Default 30 000 ms.
    pub retry_max_delay_ms: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            max_image_size: ByteSize(64 << 30),
            connect_timeout_ms: 10_000,
            read_timeout_ms: 30_000,
            min_speed_bytes_per_s: 1024,
            min_speed_window_ms: 60_000,
            max_redirects: 5,
            max_attempts: 5,
            retry_base_delay_ms: 1_000,
            retry_max_delay_ms: 30_000,
        }
    }
}

/// A `[fetch]` setting out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid setting fetch.{field}: {problem}")]
pub struct FetchConfigError {
    pub field: &'static str,
    pub problem: String,
}

impl FetchConfig {
    pub fn validate(&self) -> Result<(), FetchConfigError> {
        let fail = |field, problem: &str| {
            Err(FetchConfigError {
                field,
                problem: problem.to_string(),
            })
        };
        if self.max_image_size.0 == 0 {
            return fail("max_image_size", "must be more than 0");
        }
        if self.connect_timeout_ms == 0 {
            return fail("connect_timeout_ms", "must be more than 0");
        }
        if self.read_timeout_ms == 0 {
            return fail("read_timeout_ms", "must be more than 0");
        }
        if self.min_speed_bytes_per_s > 0 && self.min_speed_window_ms == 0 {
            return fail(
                "min_speed_window_ms",
                "must be more than 0 while min_speed_bytes_per_s is set",
            );
        }
        if self.max_redirects > 20 {
            return fail("max_redirects", "must be at most 20");
        }
        if !(1..=100).contains(&self.max_attempts) {
            return fail("max_attempts", "must be between 1 and 100");
        }
        if self.retry_base_delay_ms > self.retry_max_delay_ms {
            return fail("retry_base_delay_ms", "must not exceed retry_max_delay_ms");
        }
        Ok(())
    }

    fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }

    fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Config(#[from] FetchConfigError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("Image source {source_url:?} is not a URL")]
    InvalidUrl {
        source_url: String,
        #[source]
        source: url::ParseError,
    },
    #[error("Image source {source_url} is not supported: use an http, https or file URL")]
    UnsupportedScheme { source_url: String },
    #[error("Cannot set up the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("Cannot connect to {url}")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("Request for {url} failed")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("Server answered {status} for {url}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("Redirect loop at {url}: it leads back to {target}")]
    RedirectLoop { url: String, target: String },
    #[error("More than {max} redirects for {url} (fetch.max_redirects)")]
    TooManyRedirects { url: String, max: u32 },
    #[error("{url} redirects to {target}: only http and https redirects are followed")]
    RedirectScheme { url: String, target: String },
    #[error("{url} is {} ({size} bytes), over the limit of {} (fetch.max_image_size)", format_size(*size), format_size(*limit))]
    TooLarge { url: String, size: u64, limit: u64 },
    #[error("{url} sent more than {} without ending, the limit (fetch.max_image_size)", format_size(*limit))]
    TooLargeStreaming { url: String, limit: u64 },
    #[error("No data from {url} for {} ms (fetch.read_timeout_ms)", timeout.as_millis())]
    Stalled { url: String, timeout: Duration },
    #[error(
        "Download from {url} too slow: {rate} bytes/s, below fetch.min_speed_bytes_per_s = {min}"
    )]
    TooSlow { url: String, rate: u64, min: u64 },
    #[error("Body of {url} broke off after {received} bytes of the image")]
    Body {
        url: String,
        received: u64,
        #[source]
        source: reqwest::Error,
    },
    #[error("Body of {url} ended after {received} of {expected} bytes")]
    Truncated {
        url: String,
        received: u64,
        expected: u64,
    },
    #[error("Body of {url} is longer than the {expected} bytes the server announced")]
    BodyTooLong { url: String, expected: u64 },
    #[error("Bad partial answer from {url}: {problem}; downloading from the start instead")]
    BadRange { url: String, problem: String },
    #[error(
        "Resumed download of {url} does not match its checksum; downloading from the start instead"
    )]
    SplicedMismatch { url: String },
    #[error(
        "Checksum mismatch for {url}: expected {expected}, got {actual} ({size} bytes received)"
    )]
    Mismatch {
        url: String,
        expected: Checksum,
        actual: Checksum,
        size: u64,
    },
    #[error(
        "Not enough free space in the cache at {dir}: the image needs {} more, {} available",
        format_size(*needed), format_size(*available)
    )]
    NoSpace {
        dir: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("Cannot write the image into the cache at {dir}")]
    Write {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot read the image source {path}")]
    ReadSource {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Image source {path} is not a regular file")]
    SourceNotFile { path: PathBuf },
    #[error("Giving up on {url} after {attempts} attempts")]
    Exhausted {
        url: String,
        attempts: u32,
        #[source]
        source: Box<FetchError>,
    },
    #[error("The download's writer thread failed")]
    Writer(#[source] tokio::task::JoinError),
}

impl FetchError {
    /// Whether another attempt may succeed where this one failed.
    pub fn is_retryable(&self) -> bool {
        match self {
            FetchError::Connect { .. }
            | FetchError::Request { .. }
            | FetchError::Stalled { .. }
            | FetchError::TooSlow { .. }
            | FetchError::Body { .. }
            | FetchError::Truncated { .. }
            | FetchError::BadRange { .. }
            | FetchError::SplicedMismatch { .. } => true,
            FetchError::Status { status, .. } => {
                status.is_server_error()
                    || *status == reqwest::StatusCode::REQUEST_TIMEOUT
                    || *status == reqwest::StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }
}

/// The outcome of a fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The verified, read-only image in the cache.
    pub path: PathBuf,
    pub size: u64,
    /// Body bytes received, every attempt counted; 0 on a cache hit.
    pub body_bytes: u64,
    /// The image was in the cache already (possibly fetched meanwhile by
    /// another process or task while this one waited).
    pub cache_hit: bool,
}

/// Downloads images into a [`Cache`]. Cheap to clone: clones share one
/// HTTP client (and its connection pool).
#[derive(Debug, Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: FetchConfig,
    client: reqwest::Client,
}

impl Fetcher {
    pub fn new(config: FetchConfig) -> Result<Fetcher, FetchError> {
        config.validate()?;
        let client = http::client(&config).map_err(FetchError::Client)?;
        Ok(Fetcher {
            inner: Arc::new(Inner { config, client }),
        })
    }

    pub fn config(&self) -> &FetchConfig {
        &self.inner.config
    }

    /// Makes the image `source` with checksum `checksum` available in
    /// `cache` and returns where it is.
    pub async fn fetch(
        &self,
        cache: &Cache,
        source: &str,
        checksum: &Checksum,
    ) -> Result<Fetched, FetchError> {
        let span = tracing::info_span!("fetch", source = %source, checksum = %checksum);
        self.fetch_inner(cache, source, checksum)
            .instrument(span)
            .await
    }

    async fn fetch_inner(
        &self,
        cache: &Cache,
        source: &str,
        checksum: &Checksum,
    ) -> Result<Fetched, FetchError> {
        let url = parse_source(source)?;
        if let Some(hit) = cache.lookup(checksum)? {
            tracing::info!(path = %hit.path.display(), size = hit.size, "Image found in the cache");
            return Ok(hit_result(hit));
        }
        let lock = cache.lock_entry(checksum).await?;
        // Whoever held the lock before us may have fetched it.
        if let Some(hit) = cache.lookup(checksum)? {
            tracing::info!(path = %hit.path.display(), size = hit.size, "Image fetched meanwhile by another fetch");
            return Ok(hit_result(hit));
        }
        cache.remove_stale_temps(checksum, &lock)?;
        let temp = cache.temp_file(checksum, &lock)?;
        tracing::debug!(temp = %temp.path().display(), "Downloading into the cache");
        let sink = Sink::new(temp, Hasher::new(checksum.algorithm));
        let started = std::time::Instant::now();
        let (sink, body_bytes) = if url.scheme() == "file" {
            self.copy_local(cache, &url, sink).await?
        } else {
            http::Download::new(&self.inner, cache, url, source, checksum, sink)
                .run()
                .await?
        };
        tracing::debug!(
            body_bytes,
            secs = format_args!("{:.2}", started.elapsed().as_secs_f64()),
            "Body received; syncing it to disk"
        );
        let tmp_dir = cache.tmp_dir();
        let (temp, digest, size) = tokio::task::spawn_blocking(move || sink.finish())
            .await
            .map_err(FetchError::Writer)?
            .map_err(|source| FetchError::Write {
                dir: tmp_dir,
                source,
            })?;
        if digest != checksum.digest {
            // `temp` is dropped on return, and its file with it.
            return Err(FetchError::Mismatch {
                url: source.to_string(),
                expected: checksum.clone(),
                actual: Checksum {
                    algorithm: checksum.algorithm,
                    digest,
                },
                size,
            });
        }
        let path = cache.commit(temp, checksum, &lock)?;
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            path = %path.display(),
            size,
            body_bytes,
            secs = format_args!("{secs:.2}"),
            rate = %format!("{}/s", format_size((size as f64 / secs.max(1e-3)) as u64)),
            "Image fetched and verified"
        );
        Ok(Fetched {
            path,
            size,
            body_bytes,
            cache_hit: false,
        })
    }

    /// Copies a `file://` image through the same pipeline as a download:
    /// read on a blocking thread, hashed and written on another.
    async fn copy_local(
        &self,
        cache: &Cache,
        url: &Url,
        sink: Sink,
    ) -> Result<(Sink, u64), FetchError> {
        let path = url
            .to_file_path()
            .map_err(|()| FetchError::UnsupportedScheme {
                source_url: url.to_string(),
            })?;
        let limit = self.inner.config.max_image_size.0;
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
        let mut progress = Progress::new(url.as_str());
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
        let (sink, written) = pump.close().await.map_err(FetchError::Writer)?;
        written.map_err(|source| FetchError::Write {
            dir: cache.tmp_dir(),
            source,
        })?;
        outcome?;
        Ok((sink, copied))
    }
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

fn hit_result(hit: crate::cache::Entry) -> Fetched {
    Fetched {
        path: hit.path,
        size: hit.size,
        body_bytes: 0,
        cache_hit: true,
    }
}

/// Only http, https and file URLs: anything else is refused before any I/O.
pub fn parse_source(source: &str) -> Result<Url, FetchError> {
    let url = Url::parse(source).map_err(|e| FetchError::InvalidUrl {
        source_url: source.to_string(),
        source: e,
    })?;
    match url.scheme() {
        "http" | "https" if url.host_str().is_some_and(|h| !h.is_empty()) => Ok(url),
        "file" if url.to_file_path().is_ok() => Ok(url),
        _ => Err(FetchError::UnsupportedScheme {
            source_url: source.to_string(),
        }),
    }
}

/// Refuses a download that cannot fit in the cache's filesystem.
fn check_space(cache: &Cache, needed: u64) -> Result<(), FetchError> {
    let available = cache.free_space()?;
    if needed > available {
        return Err(FetchError::NoSpace {
            dir: cache.root().to_path_buf(),
            needed,
            available,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = FetchConfig::default();
        c.validate().unwrap();
        assert_eq!(c.max_image_size.0, 64 << 30);
        assert_eq!(c.max_redirects, 5);
    }

    #[test]
    fn config_reads_units_and_refuses_unknown_fields() {
        let c: FetchConfig =
            toml::from_str("max_image_size = \"10M\"\nmax_attempts = 2\n").unwrap();
        assert_eq!(c.max_image_size.0, 10 << 20);
        assert_eq!(c.max_attempts, 2);
        assert_eq!(c.read_timeout_ms, 30_000, "unset fields keep defaults");
        let err = toml::from_str::<FetchConfig>("max_atempts = 2\n").unwrap_err();
        assert!(err.to_string().contains("max_atempts"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let bad = [
            ("max_attempts = 0", "max_attempts"),
            ("read_timeout_ms = 0", "read_timeout_ms"),
            ("max_image_size = 0", "max_image_size"),
            ("max_redirects = 50", "max_redirects"),
            (
                "retry_base_delay_ms = 5000\nretry_max_delay_ms = 10",
                "retry_base_delay_ms",
            ),
        ];
        for (text, field) in bad {
            let c: FetchConfig = toml::from_str(text).unwrap();
            let err = c.validate().unwrap_err();
            assert_eq!(err.field, field);
            assert!(
                err.to_string()
                    .starts_with(&format!("Invalid setting fetch.{field}"))
            );
        }
    }

    #[test]
    fn only_http_https_and_file_sources() {
        assert!(parse_source("http://127.0.0.1:8000/g.iso").is_ok());
        assert!(parse_source("https://example.org/g.iso").is_ok());
        assert!(parse_source("file:///srv/g.iso").is_ok());
        for bad in [
            "ftp://h/g.iso",
            "gopher://h/x",
            "data:text/plain,hi",
            "/srv/g.iso",
            "http://",
        ] {
            assert!(parse_source(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mismatch_message_shows_both_sums() {
        let expected: Checksum = "md5:0123456789abcdef0123456789abcdef".parse().unwrap();
        let actual: Checksum = "md5:ffffffffffffffffffffffffffffffff".parse().unwrap();
        let err = FetchError::Mismatch {
            url: "http://h/g.iso".into(),
            expected,
            actual,
            size: 3,
        };
        assert_eq!(
            err.to_string(),
            "Checksum mismatch for http://h/g.iso: expected md5:0123456789abcdef0123456789abcdef, got md5:ffffffffffffffffffffffffffffffff (3 bytes received)"
        );
    }
}
