//! Download progress: a bar for a person at a terminal, periodic log lines
//! for everyone else (services, CI, the agent).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::units::format_size;

/// Log a line at least this often...
const LOG_EVERY: Duration = Duration::from_secs(5);
/// ...or whenever another tenth of a known total has arrived...
const LOG_STEP_PERCENT: u64 = 10;
/// ...but never more often than this, so small images do not flood the log.
const LOG_MIN_GAP: Duration = Duration::from_secs(1);

/// Told how far a download is, as often as the log is: for a caller that
/// reports progress elsewhere (the Nomad plugin's task events).
pub type Observer = std::sync::Arc<dyn Fn(u64, Option<u64>) + Send + Sync>;

pub struct Progress {
    source: String,
    observer: Option<Observer>,
    bar: Option<ProgressBar>,
    start: Instant,
    last_log: Instant,
    last_step: u64,
    total: Option<u64>,
}

impl Progress {
    pub fn new(source: &str, observer: Option<Observer>) -> Progress {
        // An observer reports elsewhere: the log lines stay, the bar goes.
        let bar = (observer.is_none() && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(short_name(source));
            bar
        });
        let now = Instant::now();
        Progress {
            source: source.to_string(),
            observer,
            bar,
            start: now,
            last_log: now,
            last_step: 0,
            total: None,
        }
    }

    pub fn set_total(&mut self, total: Option<u64>) {
        self.total = total;
        if let (Some(bar), Some(total)) = (&self.bar, total) {
            bar.set_length(total);
        }
    }

    /// `position` bytes of the image are on disk (or on their way).
    pub fn update(&mut self, position: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(position);
            return;
        }
        let now = Instant::now();
        let step = match self.total {
            Some(total) if total > 0 => position.saturating_mul(100) / total / LOG_STEP_PERCENT,
            _ => 0,
        };
        let since = now.duration_since(self.last_log);
        if since < LOG_MIN_GAP || (since < LOG_EVERY && step <= self.last_step) {
            return;
        }
        self.last_log = now;
        self.last_step = step;
        if let Some(observe) = &self.observer {
            observe(position, self.total);
        }
        let secs = now.duration_since(self.start).as_secs_f64().max(1e-3);
        tracing::info!(
            source = %self.source,
            bytes = position,
            total = self.total,
            percent = self.total.filter(|t| *t > 0).map(|t| position * 100 / t),
            rate = %format!("{}/s", format_size((position as f64 / secs) as u64)),
            "Downloading"
        );
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The last path segment of a URL, which is what fits next to a bar.
fn short_name(source: &str) -> String {
    source
        .rsplit('/')
        .find(|s| !s.is_empty())
        .unwrap_or(source)
        .chars()
        .take(40)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_label_is_the_file_name() {
        assert_eq!(short_name("http://h:1/images/guest.iso"), "guest.iso");
        assert_eq!(short_name("file:///srv/img/"), "img");
    }
}
