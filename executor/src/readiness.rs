//! Whether a forwarded port is really served by the guest.
//!
//! qemu's user-mode network accepts every connection on a forwarded host
//! port at once, whatever the guest does: while the guest boots the
//! connection hangs, and once it is up with nothing listening the
//! connection is closed at once. Only bytes from the guest prove anything.

use std::time::Duration;

use policy_sdk::{PortMapping, Protocol, ReadyCheck};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one attempt waits for the guest's first bytes.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// The request sent for an `http` check.
/// Whether the guest has anything to show before it counts as ready: a
/// port to answer on, or a console line. Without either, ready only
/// means that qemu runs.
pub fn guest_is_checked(ports: &[PortMapping], ready_serial: Option<&str>) -> bool {
    ready_serial.is_some() || ports.iter().any(|p| p.check != ReadyCheck::None)
}

pub fn http_request(port: &PortMapping) -> String {
    format!(
        "GET {} HTTP/1.0\r\nHost: {}:{}\r\nUser-Agent: qemu-executor\r\nConnection: close\r\n\r\n",
        port.http_path, port.host_ip, port.host
    )
}

/// Whether the first bytes of an answer are an HTTP status line.
pub fn is_http_answer(head: &[u8]) -> bool {
    head.starts_with(b"HTTP/")
}

/// One probe of one port: true when the guest answered as the check asks.
pub async fn probe(port: &PortMapping) -> bool {
    if port.protocol == Protocol::Udp || port.check == ReadyCheck::None {
        return true;
    }
    let attempt = async {
        let mut stream = TcpStream::connect((port.host_ip.as_str(), port.host))
            .await
            .ok()?;
        if port.check == ReadyCheck::Http {
            stream.write_all(http_request(port).as_bytes()).await.ok()?;
        }
        let mut head = [0u8; 5];
        let mut filled = 0;
        while filled < head.len() {
            match stream.read(&mut head[filled..]).await.ok()? {
                0 => break,
                n => filled += n,
            }
            if port.check == ReadyCheck::Banner {
                break;
            }
        }
        Some(match port.check {
            ReadyCheck::Http => is_http_answer(&head[..filled]),
            _ => filled > 0,
        })
    };
    matches!(
        tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await,
        Ok(Some(true))
    )
}

/// Probes until the port answers; the caller bounds it with its deadline.
pub async fn wait_for(port: &PortMapping) {
    loop {
        if probe(port).await {
            return;
        }
        // Between attempts only: a hanging attempt already took its time.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn port(host: u16, check: ReadyCheck) -> PortMapping {
        PortMapping {
            host,
            guest: 80,
            protocol: Protocol::Tcp,
            host_ip: "127.0.0.1".into(),
            check,
            http_path: "/health".into(),
        }
    }

    #[test]
    fn request_and_answer() {
        let p = port(18080, ReadyCheck::Http);
        assert_eq!(
            http_request(&p),
            "GET /health HTTP/1.0\r\nHost: 127.0.0.1:18080\r\nUser-Agent: qemu-executor\r\nConnection: close\r\n\r\n"
        );
        assert!(is_http_answer(b"HTTP/1.0 404 Not Found"));
        assert!(!is_http_answer(b"SSH-2.0"));
        assert!(!is_http_answer(b""));
    }

    /// The three behaviours of a forwarded port, played by real sockets.
    #[tokio::test]
    async fn only_a_real_answer_counts() {
        // Accepts and closes at once: the guest is up, nothing listens.
        let closing = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closing_port = closing.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (s, _) = closing.accept().await.unwrap();
                drop(s);
            }
        });
        assert!(!probe(&port(closing_port, ReadyCheck::Http)).await);
        assert!(!probe(&port(closing_port, ReadyCheck::Banner)).await);

        // Accepts and says nothing: the guest is still booting.
        let hanging = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hanging_port = hanging.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (s, _) = hanging.accept().await.unwrap();
                held.push(s);
            }
        });
        assert!(!probe(&port(hanging_port, ReadyCheck::Banner)).await);

        // Answers.
        let serving = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let serving_port = serving.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = serving.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nhi").await;
            }
        });
        assert!(probe(&port(serving_port, ReadyCheck::Http)).await);
        assert!(probe(&port(serving_port, ReadyCheck::None)).await);
    }
}
