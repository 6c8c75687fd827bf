//! Server streams kept open in the background as a Nomad client keeps
//! them (`Fingerprint` and `TaskEvents` for the plugin's lifetime,
//! `TaskStats` per task), with every message recorded with its arrival
//! time so tests can wait for one or look at all of them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::{Status, Streaming};

/// How a stream ended.
#[derive(Debug, Clone)]
pub enum End {
    /// The server closed it.
    Eof,
    Error(Status),
}

struct Seen<T> {
    items: Vec<(Instant, T)>,
    end: Option<End>,
}

/// A stream read to its end by a background task.
pub struct Collector<T> {
    /// When the call that opened the stream was made.
    pub opened: Instant,
    seen: Arc<Mutex<Seen<T>>>,
    task: tokio::task::JoinHandle<()>,
}

impl<T: Clone + Send + 'static> Collector<T> {
    /// Starts reading `stream`, opened by a call made at `opened`.
    pub fn start(opened: Instant, mut stream: Streaming<T>) -> Collector<T> {
        let seen = Arc::new(Mutex::new(Seen {
            items: Vec::new(),
            end: None,
        }));
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            let end = loop {
                match stream.message().await {
                    Ok(Some(item)) => shared.lock().unwrap().items.push((Instant::now(), item)),
                    Ok(None) => break End::Eof,
                    Err(status) => break End::Error(status),
                }
            };
            shared.lock().unwrap().end = Some(end);
        });
        Collector { opened, seen, task }
    }

    /// Every message so far.
    pub fn items(&self) -> Vec<T> {
        self.timed().into_iter().map(|(_, t)| t).collect()
    }

    /// Every message so far, with when it arrived.
    pub fn timed(&self) -> Vec<(Instant, T)> {
        self.seen.lock().unwrap().items.clone()
    }

    /// How the stream ended, if it did.
    pub fn end(&self) -> Option<End> {
        self.seen.lock().unwrap().end.clone()
    }

    /// Waits until a message matches `pred` (one already received
    /// counts) and returns it, or `None` at the deadline or when the
    /// stream ended without one.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&T) -> bool) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let seen = self.seen.lock().unwrap();
                if let Some((_, item)) = seen.items.iter().find(|(_, t)| pred(t)) {
                    return Some(item.clone());
                }
                if seen.end.is_some() {
                    return None;
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until at least `n` messages arrived; returns all so far.
    pub async fn wait_count(&self, n: usize, timeout: Duration) -> Vec<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let items = self.items();
            let ended = self.end().is_some();
            if items.len() >= n || ended || Instant::now() >= deadline {
                return items;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the stream's end.
    pub async fn wait_end(&self, timeout: Duration) -> Option<End> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = self.end() {
                return Some(end);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl<T> Drop for Collector<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}
