//! Fetching an image into the cache: HTTP(S) or a local file, hashed while
//! it is written, verified before it becomes an entry.
//!
//! One fetch: look the checksum up in the cache (a hit sends nothing to the
//! server); otherwise lock the entry (other processes and other tasks of
//! this one wait, then find the entry), stream the body into a temporary
//! file in the cache while hashing it, retry and resume on failures, compare
//! the digest, and rename the file into place read-only. Any failure drops
//! the temporary file, so nothing half-written stays behind.

mod config;
mod http;
mod local;
mod progress;

pub use progress::Observer as ProgressObserver;
mod range;
mod sink;

pub use config::{FetchConfig, FetchConfigError};
pub use http::backoff_delay;
pub use range::{ContentRange, parse_content_range};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use policy_sdk::Checksum;
use reqwest::Url;
use tracing::Instrument;

use crate::cache::{Cache, CacheError, Lease};
use crate::digest::Hasher;
use crate::units::format_size;
use sink::Sink;

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
    #[error(
        "Image source {url} is a local file, and no directory is open to file:// sources here (fetch.file_dirs)"
    )]
    FileSourcesClosed { url: String },
    #[error(
        "Image source {url} is outside the directories file:// sources may be read from (fetch.file_dirs)"
    )]
    FileOutside { url: String },
    /// A local file's digest is not shown: it would tell whoever wrote the
    /// task the digest of a file they may not read.
    #[error("Checksum mismatch for {url}: the file does not have {expected}")]
    LocalMismatch { url: String, expected: Checksum },
    #[error("Giving up on {url} after {attempts} attempts")]
    Exhausted {
        url: String,
        attempts: u32,
        #[source]
        source: Box<FetchError>,
    },
    #[error("A blocking task of the fetch failed")]
    Blocking(#[source] tokio::task::JoinError),
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
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
    observer: Option<ProgressObserver>,
    /// Where `file://` sources may be read from: `fetch.file_dirs`, and
    /// whatever [`Fetcher::granting`] added for this clone.
    file_dirs: Arc<[PathBuf]>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("inner", &self.inner)
            .field("observed", &self.observer.is_some())
            .field("file_dirs", &self.file_dirs)
            .finish()
    }
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
        let file_dirs = config.file_dirs.clone().into();
        Ok(Fetcher {
            inner: Arc::new(Inner { config, client }),
            observer: None,
            file_dirs,
        })
    }

    /// This fetcher, telling `observer` how far its downloads are (bytes
    /// so far, total when known), as often as it logs them.
    pub fn observed(&self, observer: ProgressObserver) -> Fetcher {
        Fetcher {
            observer: Some(observer),
            ..self.clone()
        }
    }

    /// This fetcher, also allowed to read `file://` sources at or below
    /// `path`, a directory or file the caller vouches for: the Nomad task's
    /// own directory, where its artifacts land, or the file the operator
    /// named on the command line. The same resolution applies as to
    /// `fetch.file_dirs`.
    pub fn granting(&self, path: impl Into<PathBuf>) -> Fetcher {
        let mut file_dirs = self.file_dirs.to_vec();
        file_dirs.push(path.into());
        Fetcher {
            file_dirs: file_dirs.into(),
            ..self.clone()
        }
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
        let span = tracing::info_span!("fetch", source = %crate::text::Printable(source), checksum = %checksum);
        self.fetch_inner(cache, source, checksum)
            .instrument(span)
            .await
    }

    /// Fetches, then leases the image for `holder` (a task id) and process
    /// `pid`, so that `gc` cannot evict it once this returns. If `gc`
    /// evicts it between the two steps, fetches again.
    pub async fn fetch_leased(
        &self,
        cache: &Cache,
        source: &str,
        checksum: &Checksum,
        holder: &str,
        pid: u32,
    ) -> Result<(Fetched, Lease), FetchError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let fetched = self.fetch(cache, source, checksum).await?;
            let (c, sum, h) = (cache.clone(), checksum.clone(), holder.to_string());
            // Leasing takes the entry's flock, which may wait: not on a
            // runtime thread.
            let leased = tokio::task::spawn_blocking(move || c.lease(&sum, &h, pid))
                .await
                .map_err(FetchError::Blocking)?;
            match leased {
                Ok(lease) => return Ok((fetched, lease)),
                Err(CacheError::NotCached { .. }) if tries < 3 => {
                    tracing::info!(checksum = %checksum, "Image evicted before it was leased; fetching it again");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn fetch_inner(
        &self,
        cache: &Cache,
        source: &str,
        checksum: &Checksum,
    ) -> Result<Fetched, FetchError> {
        let url = parse_source(source)?;
        let local = url.scheme() == "file";
        // A refused source is refused even when its checksum is cached.
        if local {
            local::resolve(&self.file_dirs, &url)?;
        }
        if let Some(hit) = cache.lookup(checksum)? {
            tracing::info!(path = %hit.path.display(), size = hit.size, body_bytes = 0, "Image found in the cache");
            return Ok(hit_result(hit));
        }
        let lock = cache.lock_entry(checksum).await?;
        // Whoever held the lock before us may have fetched it.
        if let Some(hit) = cache.lookup(checksum)? {
            tracing::info!(path = %hit.path.display(), size = hit.size, body_bytes = 0, "Image fetched meanwhile by another fetch");
            return Ok(hit_result(hit));
        }
        cache.remove_stale_temps(checksum, &lock)?;
        let temp = cache.temp_file(checksum, &lock)?;
        tracing::debug!(temp = %temp.path().display(), "Downloading into the cache");
        let sink = Sink::new(temp, Hasher::new(checksum.algorithm));
        let started = std::time::Instant::now();
        let (sink, body_bytes) = if local {
            local::copy(
                &self.inner.config,
                &self.file_dirs,
                cache,
                &url,
                sink,
                self.observer.clone(),
            )
            .await?
        } else {
            http::Download::new(
                &self.inner,
                cache,
                url,
                source,
                checksum,
                sink,
                self.observer.clone(),
            )
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
            .map_err(FetchError::Blocking)?
            .map_err(|source| FetchError::Write {
                dir: tmp_dir,
                source,
            })?;
        if digest != checksum.digest && local {
            return Err(FetchError::LocalMismatch {
                url: source.to_string(),
                expected: checksum.clone(),
            });
        }
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
mod tests;
