//! A small QMP client: the greeting, `qmp_capabilities`, commands with ids
//! whose replies are routed back by id, and events fanned out to whoever
//! listens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{broadcast, oneshot};
use tokio::time::Instant;

const EVENT_BACKLOG: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("Cannot connect to the QMP socket {} in time", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP connection failed")]
    Io(#[from] std::io::Error),
    #[error("QMP sent something that is not a QMP message: {0:?}")]
    Protocol(String),
    #[error("QMP connection closed")]
    Closed,
    #[error("qemu refused `{command}`: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// An asynchronous event from qemu, such as `SHUTDOWN` or `STOP`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
}

/// One message from qemu.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Greeting(Value),
    Return {
        id: Option<u64>,
        value: Value,
    },
    Error {
        id: Option<u64>,
        class: String,
        desc: String,
    },
    Event(Event),
}

/// Reads one line of QMP. Pure, so the framing is tested without qemu.
pub fn parse_message(line: &str) -> Result<Message, QmpError> {
    let value: Value =
        serde_json::from_str(line).map_err(|_| QmpError::Protocol(line.to_string()))?;
    let id = value.get("id").and_then(Value::as_u64);
    if let Some(greeting) = value.get("QMP") {
        return Ok(Message::Greeting(greeting.clone()));
    }
    if let Some(ret) = value.get("return") {
        return Ok(Message::Return {
            id,
            value: ret.clone(),
        });
    }
    if let Some(err) = value.get("error") {
        let field = |k: &str| {
            err.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        return Ok(Message::Error {
            id,
            class: field("class"),
            desc: field("desc"),
        });
    }
    if let Some(name) = value.get("event").and_then(Value::as_str) {
        return Ok(Message::Event(Event {
            name: name.to_string(),
            data: value.get("data").cloned().unwrap_or(Value::Null),
        }));
    }
    Err(QmpError::Protocol(line.to_string()))
}

/// The wire form of a command.
pub fn encode_command(id: u64, command: &str, arguments: Option<&Value>) -> String {
    let mut msg = json!({ "execute": command, "id": id });
    if let Some(args) = arguments {
        msg["arguments"] = args.clone();
    }
    let mut line = msg.to_string();
    line.push('\n');
    line
}

/// Waiters by command id; `None` once the connection is gone, so that a
/// late command fails at once instead of waiting for a reply that cannot
/// come.
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>>;

/// A connected, negotiated QMP session.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    events: broadcast::Sender<Event>,
    /// Fires once the connection is gone, after its last event was sent.
    closed: tokio_util::sync::CancellationToken,
    next_id: AtomicU64,
    /// qemu's version triple and capabilities.
    pub greeting: Value,
}

impl Qmp {
    /// Connects, retrying until `timeout` while qemu creates the socket,
    /// then negotiates capabilities. Events are buffered from this moment:
    /// take a receiver with [`Qmp::events`] before acting on the VM.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        source: e,
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let first = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .map_err(|_| QmpError::Closed)??
            .ok_or(QmpError::Closed)?;
        let Message::Greeting(greeting) = parse_message(&first)? else {
            return Err(QmpError::Protocol(first));
        };

        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let closed = tokio_util::sync::CancellationToken::new();
        tokio::spawn(read_loop(
            lines,
            pending.clone(),
            events.clone(),
            closed.clone(),
        ));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            events,
            closed,
            next_id: AtomicU64::new(1),
            greeting,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// A receiver for every event from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Resolves once qemu closed the connection; every event it sent
    /// before is in the receivers by then.
    pub async fn closed(&self) {
        self.closed.cancelled().await;
    }

    /// Runs one command and waits for its reply.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("pending map poisoned")
            .as_mut()
            .ok_or(QmpError::Closed)?
            .insert(id, tx);
        let line = encode_command(id, command, arguments.as_ref());
        let written = {
            let mut w = self.writer.lock().await;
            w.write_all(line.as_bytes()).await
        };
        if let Err(e) = written {
            if let Some(map) = self.pending.lock().expect("pending map poisoned").as_mut() {
                map.remove(&id);
            }
            return Err(e.into());
        }
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(QmpError::Command { class, desc, .. })) => Err(QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(QmpError::Closed),
        }
    }

    /// `query-status`: qemu's run state, e.g. "running" or "internal-error".
    pub async fn status(&self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string())
    }
}

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    pending: Pending,
    events: broadcast::Sender<Event>,
    closed: tokio_util::sync::CancellationToken,
) {
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match parse_message(&line) {
            Ok(Message::Event(event)) => {
                tracing::debug!(event = %event.name, data = %event.data, "qmp event");
                // Nobody listening is fine.
                let _ = events.send(event);
                continue;
            }
            Ok(Message::Return { id, value }) => (id, Ok(value)),
            Ok(Message::Error { id, class, desc }) => (
                id,
                Err(QmpError::Command {
                    command: String::new(),
                    class,
                    desc,
                }),
            ),
            Ok(Message::Greeting(_)) | Err(_) => {
                tracing::warn!(line = %line, "unexpected QMP message");
                continue;
            }
        };
        if let (Some(id), result) = reply
            && let Some(tx) = pending
                .lock()
                .expect("pending map poisoned")
                .as_mut()
                .and_then(|map| map.remove(&id))
        {
            let _ = tx.send(result);
        }
    }
    // Dropping the senders wakes every waiter with `Closed`.
    pending.lock().expect("pending map poisoned").take();
    closed.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_return_error_and_event() {
        let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#;
        assert!(
            matches!(parse_message(greeting).unwrap(), Message::Greeting(g) if g["version"]["qemu"]["major"] == 7)
        );

        assert_eq!(
            parse_message(r#"{"return": {}, "id": 4}"#).unwrap(),
            Message::Return {
                id: Some(4),
                value: json!({})
            }
        );
        assert_eq!(
            parse_message(r#"{"id": 2, "error": {"class": "CommandNotFound", "desc": "The command foo has not been found"}}"#).unwrap(),
            Message::Error {
                id: Some(2),
                class: "CommandNotFound".into(),
                desc: "The command foo has not been found".into()
            }
        );
        let event = r#"{"timestamp": {"seconds": 1795754258, "microseconds": 756912}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#;
        assert_eq!(
            parse_message(event).unwrap(),
            Message::Event(Event {
                name: "SHUTDOWN".into(),
                data: json!({"guest": true, "reason": "guest-shutdown"})
            })
        );
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        assert!(matches!(
            parse_message("not json"),
            Err(QmpError::Protocol(_))
        ));
        assert!(matches!(
            parse_message(r#"{"hello": 1}"#),
            Err(QmpError::Protocol(_))
        ));
    }

    #[test]
    fn commands_carry_ids_and_arguments() {
        assert_eq!(
            encode_command(7, "query-status", None),
            "{\"execute\":\"query-status\",\"id\":7}\n"
        );
        let line = encode_command(
            8,
            "human-monitor-command",
            Some(&json!({"command-line": "info"})),
        );
        let v: Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["arguments"]["command-line"], "info");
        assert_eq!(v["id"], 8);
        assert!(line.ends_with('\n'));
    }

    /// A scripted QMP peer on a real Unix socket: replies out of order and
    /// interleaves events, as qemu may.
    #[tokio::test]
    async fn replies_are_routed_by_id_and_events_fan_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .await
                .unwrap();
            let caps: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(caps["execute"], "qmp_capabilities");
            w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\r\n", caps["id"]).as_bytes())
                .await
                .unwrap();
            let a: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            let b: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            w.write_all(b"{\"event\": \"STOP\", \"timestamp\": {}}\r\n")
                .await
                .unwrap();
            // Answer the second command first.
            w.write_all(
                format!(
                    "{{\"return\": {{\"status\": \"paused\"}}, \"id\": {}}}\r\n",
                    b["id"]
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            w.write_all(format!("{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"no\"}}, \"id\": {}}}\r\n", a["id"]).as_bytes()).await.unwrap();
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        let mut events = qmp.events();
        let (a, b) = tokio::join!(qmp.execute("cont", None), qmp.status());
        assert!(
            matches!(a, Err(QmpError::Command { ref command, ref desc, .. }) if command == "cont" && desc == "no"),
            "{a:?}"
        );
        assert_eq!(b.unwrap(), "paused");
        assert_eq!(events.recv().await.unwrap().name, "STOP");
        server.await.unwrap();
        // The peer hung up: commands now fail instead of hanging.
        assert!(matches!(
            qmp.execute("query-status", None).await,
            Err(QmpError::Closed | QmpError::Io(_))
        ));
    }
}
