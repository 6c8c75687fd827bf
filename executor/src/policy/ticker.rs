//! The epoch ticker behind every policy's time limit.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Instant;

use wasmtime::Engine;

use super::host::EPOCH_TICK;

/// Advances the engine's epoch every [`EPOCH_TICK`] while at least one call
/// into a policy is running, and sleeps otherwise, so that an idle executor
/// does not wake up hundreds of times a second.
pub(crate) struct Ticker {
    thread: OnceLock<Thread>,
    state: Arc<TickerState>,
}

struct TickerState {
    running: AtomicUsize,
    stop: AtomicBool,
}

impl Ticker {
    pub(crate) fn start(engine: &Engine) -> Self {
        let state = Arc::new(TickerState {
            running: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let weak = engine.weak();
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("policy-epoch".into())
            .spawn(move || {
                let mut next = Instant::now() + EPOCH_TICK;
                while !shared.stop.load(Ordering::Acquire) {
                    if shared.running.load(Ordering::Acquire) == 0 {
                        std::thread::park();
                        next = Instant::now() + EPOCH_TICK;
                        continue;
                    }
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep(next - now);
                        continue;
                    }
                    let Some(engine) = weak.upgrade() else { break };
                    // One tick per EPOCH_TICK of wall time, however late
                    // this thread woke: a sleep that overshoots (a busy
                    // host) must not stretch every time limit with it.
                    while next <= now {
                        engine.increment_epoch();
                        next += EPOCH_TICK;
                    }
                }
            });
        let cell = OnceLock::new();
        match thread {
            Ok(handle) => {
                let _ = cell.set(handle.thread().clone());
            }
            // Without a ticker no deadline fires; every call then relies on
            // the host-side backstop in the chain. Say so loudly.
            Err(err) => tracing::error!(error = %err, "Cannot start the policy epoch ticker"),
        }
        Ticker {
            thread: cell,
            state,
        }
    }

    /// Marks a call as running until the guard drops.
    pub(crate) fn running(&self) -> RunningGuard<'_> {
        if self.state.running.fetch_add(1, Ordering::AcqRel) == 0
            && let Some(thread) = self.thread.get()
        {
            thread.unpark();
        }
        RunningGuard(self)
    }

    pub(crate) fn stop(&self) {
        self.state.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }
}

pub(crate) struct RunningGuard<'a>(&'a Ticker);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.state.running.fetch_sub(1, Ordering::AcqRel);
    }
}
