//! The CLI's side of the API: one HTTP/1.1 request per connection over the
//! agent's Unix socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Cannot connect to the agent at {} ({hint})", path.display())]
    Connect {
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("The connection to the agent failed")]
    Http(#[from] hyper::Error),
    #[error("The agent answered {status}: {message}")]
    Api { status: StatusCode, message: String },
    #[error("The agent's answer is not the JSON expected")]
    Json(#[from] serde_json::Error),
}

/// Where the agent listens.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends a request and returns the response with its body unread.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.socket.clone(),
                hint: match source.kind() {
                    std::io::ErrorKind::PermissionDenied => {
                        "permission denied: the socket belongs to the agent's user"
                    }
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                        "is the agent running? start it with `qemu-executor agent`, or set --socket / QEMU_EXECUTOR_SOCKET"
                    }
                    _ => "see the cause below",
                },
                source,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "qemu-executor");
        let bytes = match body {
            Some((content_type, bytes)) => {
                builder = builder.header(header::CONTENT_TYPE, content_type);
                Bytes::from(bytes)
            }
            None => Bytes::new(),
        };
        let req = builder.body(Full::new(bytes)).expect("a valid request");
        Ok(sender.send_request(req).await?)
    }

    /// Sends a request and returns its JSON answer; a 4xx or 5xx becomes
    /// [`ClientError::Api`] with the agent's message.
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<serde_json::Value, ClientError> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
            return Err(ClientError::Api { status, message });
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}
