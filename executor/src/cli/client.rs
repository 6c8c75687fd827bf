//! What the client verbs (`submit`, `ls`, `status`, `stop`, `logs`) share:
//! how they find the agent's socket.

use std::path::PathBuf;

use clap::Args;
use qemu_executor::agent::client::Client;

#[derive(Debug, Args)]
pub struct SocketArg {
    /// The agent's socket; default /run/qemu-executor.sock as root, else
    /// $XDG_RUNTIME_DIR/qemu-executor.sock.
    #[arg(long, env = "QEMU_EXECUTOR_SOCKET")]
    pub socket: Option<PathBuf>,
}

impl SocketArg {
    pub fn client(&self) -> Client {
        Client::new(
            self.socket
                .clone()
                .unwrap_or_else(qemu_executor::dirs::default_socket),
        )
    }
}

/// A task id as it may appear in a URL path.
pub fn check_id(id: &str) -> anyhow::Result<&str> {
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        anyhow::bail!("{id:?} is not a task id (as printed by `submit` and `ls`)");
    }
    Ok(id)
}
