//! The HTTP side of a fetch: attempts, retries with backoff, resume with
//! Range requests, and the limits that keep a hostile server in check.

use std::time::{Duration, Instant};

use policy_sdk::Checksum;
use reqwest::header::{ACCEPT_RANGES, CONTENT_RANGE, RANGE};
use reqwest::{StatusCode, Url, redirect};

use super::progress::Progress;
use super::range::check_resume;
use super::sink::{Pump, Sink};
use super::{FetchConfig, FetchError, Inner, check_space};
use crate::cache::Cache;

/// Why the redirect policy stopped following; read back out of the
/// reqwest error to say which it was.
#[derive(Debug)]
enum RedirectStop {
    Loop(Url),
    TooMany(u32),
    Scheme(Url),
}

impl std::fmt::Display for RedirectStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedirectStop::Loop(url) => write!(f, "redirect loop back to {url}"),
            RedirectStop::TooMany(max) => write!(f, "more than {max} redirects"),
            RedirectStop::Scheme(url) => write!(f, "redirect to {url}"),
        }
    }
}

impl std::error::Error for RedirectStop {}

pub(super) fn client(config: &FetchConfig) -> Result<reqwest::Client, reqwest::Error> {
    let max = config.max_redirects;
    let policy = redirect::Policy::custom(move |attempt| {
        let next = attempt.url().clone();
        if !matches!(next.scheme(), "http" | "https") {
            attempt.error(RedirectStop::Scheme(next))
        } else if attempt.previous().contains(&next) {
            attempt.error(RedirectStop::Loop(next))
        } else if attempt.previous().len() > max as usize {
            // `previous` holds the first URL too, hence `>`.
            attempt.error(RedirectStop::TooMany(max))
        } else {
            attempt.follow()
        }
    });
    reqwest::Client::builder()
        .user_agent(concat!("qemu-executor/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(config.connect_timeout())
        .redirect(policy)
        .tcp_nodelay(true)
        .build()
}

/// Delay before attempt `attempt + 1` after `attempt` failed (counting from
/// 1): `base · 2^(attempt-1)`, capped at `max`, of which the upper half is
/// random (`jitter` in [0, 1)) so that many executors that lost the same
/// server do not come back at the same instant.
pub fn backoff_delay(attempt: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max);
    exp / 2 + (exp / 2).mul_f64(jitter.clamp(0.0, 1.0))
}

/// Abandons an attempt whose average speed over a window is too low.
#[derive(Debug)]
struct SpeedGuard {
    min_per_s: u64,
    window: Duration,
    window_start: Instant,
    bytes: u64,
}

impl SpeedGuard {
    fn new(min_per_s: u64, window: Duration, now: Instant) -> Self {
        SpeedGuard {
            min_per_s,
            window,
            window_start: now,
            bytes: 0,
        }
    }

    /// Records `n` bytes at `now`; `Err(rate)` when a window just ended
    /// below the minimum.
    fn record(&mut self, n: u64, now: Instant) -> Result<(), u64> {
        if self.min_per_s == 0 {
            return Ok(());
        }
        self.bytes += n;
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= self.window {
            let rate = (self.bytes as f64 / elapsed.as_secs_f64()) as u64;
            if rate < self.min_per_s {
                return Err(rate);
            }
            self.window_start = now;
            self.bytes = 0;
        }
        Ok(())
    }
}

/// One download over HTTP, across all its attempts.
pub(super) struct Download<'a> {
    inner: &'a Inner,
    cache: &'a Cache,
    url: Url,
    source: &'a str,
    expected: &'a Checksum,
    /// `None` only while a pump owns it during an attempt.
    sink: Option<Sink>,
    /// The file's size, once an answer told it.
    total: Option<u64>,
    /// The server said `Accept-Ranges: bytes`, and has not since sent a
    /// partial answer we could not trust.
    ranges: bool,
    /// The bytes on disk come from more than one answer.
    resumed: bool,
    body_bytes: u64,
    progress: Progress,
}

impl<'a> Download<'a> {
    pub(super) fn new(
        inner: &'a Inner,
        cache: &'a Cache,
        url: Url,
        source: &'a str,
        expected: &'a Checksum,
        sink: Sink,
        observer: Option<super::progress::Observer>,
    ) -> Self {
        Download {
            inner,
            cache,
            url,
            source,
            expected,
            sink: Some(sink),
            total: None,
            ranges: false,
            resumed: false,
            body_bytes: 0,
            progress: Progress::new(source, observer),
        }
    }

    /// Tries until the body is complete, a fatal error, or the attempts run
    /// out. Returns the sink holding the whole body and the bytes received.
    pub(super) async fn run(mut self) -> Result<(Sink, u64), FetchError> {
        let inner = self.inner;
        let config = &inner.config;
        let mut attempt = 1;
        loop {
            let err = match self.attempt(attempt).await {
                Ok(()) => match self.check_splice() {
                    Ok(()) => {
                        self.progress.finish();
                        let sink = self.sink.take().expect("sink is back after an attempt");
                        return Ok((sink, self.body_bytes));
                    }
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if !err.is_retryable() {
                return Err(err);
            }
            if attempt >= config.max_attempts {
                if attempt == 1 {
                    // Retries are off: the error alone says it all.
                    return Err(err);
                }
                return Err(FetchError::Exhausted {
                    url: self.source.to_string(),
                    attempts: attempt,
                    source: Box::new(err),
                });
            }
            let delay = backoff_delay(
                attempt,
                Duration::from_millis(config.retry_base_delay_ms),
                Duration::from_millis(config.retry_max_delay_ms),
                rand::random::<f64>(),
            );
            tracing::warn!(
                attempt,
                max_attempts = config.max_attempts,
                delay_ms = delay.as_millis() as u64,
                written = self.sink().written(),
                error = %crate::error_chain(&err),
                "Download attempt failed; retrying"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    fn sink(&mut self) -> &mut Sink {
        self.sink.as_mut().expect("sink is back after an attempt")
    }

    fn reset(&mut self) -> Result<(), FetchError> {
        self.resumed = false;
        let dir = self.cache.tmp_dir();
        self.sink()
            .reset()
            .map_err(|source| FetchError::Write { dir, source })
    }

    /// A body put together from several answers could mix two versions of
    /// the file; if its digest is wrong, start over once from zero rather
    /// than blame the checksum.
    fn check_splice(&mut self) -> Result<(), FetchError> {
        if !self.resumed || self.sink().digest_hex() == self.expected.digest {
            return Ok(());
        }
        self.ranges = false;
        self.reset()?;
        Err(FetchError::SplicedMismatch {
            url: self.source.to_string(),
        })
    }

    async fn attempt(&mut self, attempt: u32) -> Result<(), FetchError> {
        let inner = self.inner;
        let config = &inner.config;
        let mut offset = self.sink().written();
        if offset > 0 && !self.ranges {
            self.reset()?;
            offset = 0;
        }
        let mut request = inner.client.get(self.url.clone());
        if offset > 0 {
            request = request.header(RANGE, format!("bytes={offset}-"));
        }
        tracing::debug!(attempt, offset, "Sending request");
        let wait = config.connect_timeout() + config.read_timeout();
        let response = match tokio::time::timeout(wait, request.send()).await {
            Err(_) => return Err(self.stalled()),
            Ok(Err(e)) => return Err(self.classify(e)),
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        let headers = response.headers();
        let (start, total) = match status {
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                let header = headers.get(CONTENT_RANGE).and_then(|v| v.to_str().ok());
                match check_resume(header, offset, self.total, response.content_length()) {
                    Ok(total) => {
                        tracing::info!(offset, total, "Resuming the download");
                        self.resumed = true;
                        (offset, total)
                    }
                    Err(problem) => {
                        self.ranges = false;
                        return Err(FetchError::BadRange {
                            url: self.source.to_string(),
                            problem,
                        });
                    }
                }
            }
            StatusCode::PARTIAL_CONTENT => {
                return Err(FetchError::BadRange {
                    url: self.source.to_string(),
                    problem: "a partial answer to a request for the whole file".into(),
                });
            }
            StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
                self.ranges = false;
                return Err(FetchError::BadRange {
                    url: self.source.to_string(),
                    problem: format!("it cannot serve from byte {offset}"),
                });
            }
            s if s.is_success() => {
                if offset > 0 {
                    tracing::info!(
                        offset,
                        "Server ignored the Range request; downloading from the start"
                    );
                    self.reset()?;
                }
                self.ranges = headers
                    .get_all(ACCEPT_RANGES)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .any(|unit| unit.trim().eq_ignore_ascii_case("bytes"));
                (0, response.content_length())
            }
            s => {
                return Err(FetchError::Status {
                    url: self.source.to_string(),
                    status: s,
                });
            }
        };
        let limit = config.max_image_size.0;
        if let Some(total) = total {
            if total > limit {
                return Err(FetchError::TooLarge {
                    url: self.source.to_string(),
                    size: total,
                    limit,
                });
            }
            check_space(self.cache, total - start)?;
        }
        self.total = total;
        self.progress.set_total(total);
        tracing::debug!(%status, start, total, ranges = self.ranges, "Receiving the body");

        let pump = Pump::start(self.sink.take().expect("sink is back after an attempt"));
        let (position, streamed) = self.stream(response, &pump, start, total).await;
        let (sink, written) = pump.close().await.map_err(FetchError::Blocking)?;
        self.sink = Some(sink);
        // A write error explains why streaming stopped, so it goes first.
        written.map_err(|source| FetchError::Write {
            dir: self.cache.tmp_dir(),
            source,
        })?;
        streamed?;
        match total {
            Some(expected) if position < expected => Err(FetchError::Truncated {
                url: self.source.to_string(),
                received: position,
                expected,
            }),
            _ => Ok(()),
        }
    }

    /// Moves the body into the pump, enforcing the limits; returns the
    /// position reached in the file and how streaming ended.
    async fn stream(
        &mut self,
        mut response: reqwest::Response,
        pump: &Pump,
        start: u64,
        total: Option<u64>,
    ) -> (u64, Result<(), FetchError>) {
        let inner = self.inner;
        let config = &inner.config;
        let limit = config.max_image_size.0;
        let mut speed = SpeedGuard::new(
            config.min_speed_bytes_per_s,
            Duration::from_millis(config.min_speed_window_ms),
            Instant::now(),
        );
        let mut position = start;
        loop {
            let chunk = match tokio::time::timeout(config.read_timeout(), response.chunk()).await {
                Err(_) => return (position, Err(self.stalled())),
                Ok(Err(e)) => {
                    let err = match self.classify(e) {
                        FetchError::Request { url, source } => FetchError::Body {
                            url,
                            received: position,
                            source,
                        },
                        other => other,
                    };
                    return (position, Err(err));
                }
                Ok(Ok(None)) => return (position, Ok(())),
                Ok(Ok(Some(chunk))) => chunk,
            };
            let len = chunk.len() as u64;
            self.body_bytes += len;
            if position + len > limit {
                let url = self.source.to_string();
                return (position, Err(FetchError::TooLargeStreaming { url, limit }));
            }
            if let Some(expected) = total.filter(|t| position + len > *t) {
                let url = self.source.to_string();
                return (position, Err(FetchError::BodyTooLong { url, expected }));
            }
            if let Err(rate) = speed.record(len, Instant::now()) {
                let (url, min) = (self.source.to_string(), config.min_speed_bytes_per_s);
                return (position, Err(FetchError::TooSlow { url, rate, min }));
            }
            position += len;
            self.progress.update(position);
            if !pump.send(chunk).await {
                // The writer stopped on an error, which close() returns.
                return (position, Ok(()));
            }
        }
    }

    fn stalled(&self) -> FetchError {
        FetchError::Stalled {
            url: self.source.to_string(),
            timeout: self.inner.config.read_timeout(),
        }
    }

    fn classify(&self, err: reqwest::Error) -> FetchError {
        let url = self.source.to_string();
        if err.is_redirect() {
            let mut cause = std::error::Error::source(&err);
            while let Some(c) = cause {
                if let Some(stop) = c.downcast_ref::<RedirectStop>() {
                    return match stop {
                        RedirectStop::Loop(target) => FetchError::RedirectLoop {
                            url,
                            target: target.to_string(),
                        },
                        RedirectStop::TooMany(max) => {
                            FetchError::TooManyRedirects { url, max: *max }
                        }
                        RedirectStop::Scheme(target) => FetchError::RedirectScheme {
                            url,
                            target: target.to_string(),
                        },
                    };
                }
                cause = c.source();
            }
        }
        if err.is_connect() {
            return FetchError::Connect { url, source: err };
        }
        if err.is_timeout() {
            return self.stalled();
        }
        FetchError::Request { url, source: err }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(backoff_delay(1, base, max, 0.0), Duration::from_millis(50));
        assert_eq!(backoff_delay(1, base, max, 1.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(2, base, max, 0.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(3, base, max, 0.5), Duration::from_millis(300));
        assert_eq!(backoff_delay(10, base, max, 1.0), max);
        assert_eq!(backoff_delay(u32::MAX, base, max, 0.0), max / 2);
        for j in [0.0, 0.3, 0.99] {
            let d = backoff_delay(4, base, max, j);
            assert!(d >= Duration::from_millis(400) && d <= Duration::from_millis(800));
        }
    }

    #[test]
    fn speed_guard_cuts_trickles_and_spares_fast_transfers() {
        let t0 = Instant::now();
        let mut guard = SpeedGuard::new(1000, Duration::from_secs(2), t0);
        assert_eq!(guard.record(1, t0 + Duration::from_secs(1)), Ok(()));
        assert_eq!(guard.record(1, t0 + Duration::from_secs(2)), Err(1));

        let mut fast = SpeedGuard::new(1000, Duration::from_secs(2), t0);
        for s in 1..10 {
            assert_eq!(fast.record(5000, t0 + Duration::from_secs(s)), Ok(()));
        }
        let mut off = SpeedGuard::new(0, Duration::from_secs(1), t0);
        assert_eq!(off.record(0, t0 + Duration::from_secs(100)), Ok(()));
    }
}
