//! The `[fetch]` section of the operator's configuration.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::ByteSize;

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
    /// Directories `file://` image sources may be read from, absolute.
    /// A source must lie inside one of them once symlinks and `..` are
    /// resolved; anything else is refused before it is opened. Default:
    /// none, so `file://` sources are refused: the executor runs as root,
    /// and a task must not be able to read `/etc/shadow` or another
    /// tenant's disk through it.
    pub file_dirs: Vec<PathBuf>,
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
            file_dirs: Vec::new(),
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
        if let Some(dir) = self.file_dirs.iter().find(|d| !d.is_absolute()) {
            return Err(FetchConfigError {
                field: "file_dirs",
                problem: format!("{:?} is not an absolute path", dir.display()),
            });
        }
        Ok(())
    }

    pub(super) fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }

    pub(super) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
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
        assert!(c.file_dirs.is_empty(), "file:// is closed unless opened");
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
            ("file_dirs = [\"/srv/images\", \"images\"]", "file_dirs"),
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
}
