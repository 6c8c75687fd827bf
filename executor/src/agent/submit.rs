//! What a submit may not do: take a host port that a live task holds (the
//! second qemu would fail to forward it, and the guest behind it would be
//! the first task's), or start a second VM for a client that retries a
//! submit it saw fail (an idempotency key names the first one).

use policy_sdk::{PortMapping, Task};

use super::record::TaskRecord;

/// The longest idempotency key taken, in bytes.
const MAX_KEY: usize = 255;

/// What a submit did.
#[derive(Debug)]
pub enum Submitted {
    /// A new task.
    Created(TaskRecord),
    /// The task an earlier submit with the same key created.
    Replayed(TaskRecord),
}

/// Whether two forwards would bind the same host socket.
pub fn overlaps(a: &PortMapping, b: &PortMapping) -> bool {
    let any = |ip: &str| ip == "0.0.0.0";
    a.protocol == b.protocol
        && a.host == b.host
        && (a.host_ip == b.host_ip || any(&a.host_ip) || any(&b.host_ip))
}

/// The first of `task`'s forwards that a live task in `records` holds,
/// with that task.
pub fn port_holder<'a>(
    task: &'a Task,
    records: &'a [TaskRecord],
) -> Option<(&'a PortMapping, &'a TaskRecord)> {
    records
        .iter()
        .filter(|r| !r.state.is_terminal())
        .find_map(|r| {
            let held = &r.effective_task().ports;
            task.ports
                .iter()
                .find(|p| held.iter().any(|h| overlaps(p, h)))
                .map(|p| (p, r))
        })
}

/// A key is visible ASCII (as an HTTP header value may be), and short.
pub fn check_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("it is empty");
    }
    if key.len() > MAX_KEY {
        return Err("it is longer than 255 bytes");
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("it holds a byte that is not visible ASCII");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_sdk::{Protocol, ReadyCheck};

    fn port(protocol: Protocol, ip: &str, host: u16) -> PortMapping {
        PortMapping {
            host,
            guest: 80,
            protocol,
            host_ip: ip.into(),
            check: ReadyCheck::None,
            http_path: "/".into(),
        }
    }

    #[test]
    fn forwards_overlap_on_one_socket_only() {
        let a = port(Protocol::Tcp, "127.0.0.1", 8080);
        assert!(overlaps(&a, &port(Protocol::Tcp, "127.0.0.1", 8080)));
        assert!(overlaps(&a, &port(Protocol::Tcp, "0.0.0.0", 8080)));
        assert!(!overlaps(&a, &port(Protocol::Udp, "127.0.0.1", 8080)));
        assert!(!overlaps(&a, &port(Protocol::Tcp, "127.0.0.2", 8080)));
        assert!(!overlaps(&a, &port(Protocol::Tcp, "127.0.0.1", 8081)));
    }

    #[test]
    fn keys_are_short_visible_ascii() {
        assert!(check_key("retry-7f3a").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key("a b").is_err());
        assert!(check_key("é").is_err());
        assert!(check_key(&"k".repeat(256)).is_err());
    }
}
