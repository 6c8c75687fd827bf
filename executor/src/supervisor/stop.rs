//! A stop request that carries the requester's kill timeout.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

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
