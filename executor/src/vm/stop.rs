//! Stop requests, which carry the requester's kill timeout, and the
//! graceful stop of a VM.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

use super::{Ending, StopHow, Vm};

/// After `quit`, how long before SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(3);

/// A stop request: graceful, with the kill timeout the requester gave (or
/// the task's own). Cheap to clone; every clone sees the same request.
#[derive(Debug, Clone, Default)]
pub struct StopSignal {
    token: CancellationToken,
    timeout: Arc<Mutex<Option<Duration>>>,
}

impl StopSignal {
    /// A stop signal that fires when `token` is cancelled.
    pub fn from_token(token: CancellationToken) -> Self {
        StopSignal {
            token,
            timeout: Default::default(),
        }
    }

    /// Asks for a stop; `timeout` overrides the task's kill timeout.
    pub fn request(&self, timeout: Option<Duration>) {
        if let Some(t) = timeout {
            *self.timeout.lock().expect("stop timeout poisoned") = Some(t);
        }
        self.token.cancel();
    }

    pub fn is_requested(&self) -> bool {
        self.token.is_cancelled()
    }

    pub async fn requested(&self) {
        self.token.cancelled().await;
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// The kill timeout for this stop: the requester's, else `default`.
    pub fn kill_timeout(&self, default: Duration) -> Duration {
        self.timeout
            .lock()
            .expect("stop timeout poisoned")
            .unwrap_or(default)
    }
}

impl Vm {
    pub async fn stop(&mut self, graceful: bool, kill_timeout: Duration) -> Ending {
        if let Ok(Some(status)) = self.process.try_wait().await {
            let tail = self.log_tail();
            return self.ending_after_exit(Ok(status), tail);
        }
        if graceful {
            tracing::info!(
                pid = self.pid(),
                timeout_s = kill_timeout.as_secs(),
                "pressing the ACPI power button"
            );
            if let Err(e) = self.qmp.execute("system_powerdown", None).await {
                tracing::warn!(error = %e, "system_powerdown failed");
            }
            let never = CancellationToken::new();
            if let Ok(ending) = tokio::time::timeout(kill_timeout, self.wait(&never)).await {
                return match ending {
                    Some(Ending::GuestShutdown) => Ending::Stopped(StopHow::Powerdown),
                    Some(other) => other,
                    None => unreachable!("never cancelled"),
                };
            }
            tracing::warn!(
                pid = self.pid(),
                "the guest ignored the power button; stopping qemu"
            );
        }
        let how = if graceful {
            StopHow::Killed
        } else {
            StopHow::Quit
        };
        let _ = tokio::time::timeout(QUIT_GRACE, self.qmp.execute("quit", None)).await;
        if tokio::time::timeout(QUIT_GRACE, self.process.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                pid = self.pid(),
                "qemu did not quit; killing its process group"
            );
            self.process.signal_group(Signal::SIGKILL);
            let _ = self.process.wait().await;
        }
        Ending::Stopped(how)
    }
}
