//! The agent's Unix socket: created with mode 0600 (only its owner may
//! connect), one HTTP/1.1 connection per client in a tokio task of its
//! own, until shutdown.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::Agent;

/// How long a client gets to send a request's headers.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The socket's mode unless the operator says otherwise.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("Another agent is already listening on {}", path.display())]
    InUse { path: PathBuf },
    #[error("Cannot listen on {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the socket at `path` with `mode`, replacing a stale one (a socket
/// file nobody answers on) but never a live agent's.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, ServerError> {
    let bind_err = |source| ServerError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(bind_err)?;
    }
    // The socket is created with the umask's mode: make that private, so
    // there is no moment at which another user could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    Ok(listener)
}

/// Serves until `shutdown`, then removes the socket.
pub async fn serve(
    agent: Arc<Agent>,
    listener: UnixListener,
    path: PathBuf,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of fds and the like: pass, and serve the next.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| super::api::handle(agent.clone(), req));
            if let Err(e) = http1::Builder::new()
                // A client that never finishes its headers gives up its
                // connection instead of holding it forever.
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
}
