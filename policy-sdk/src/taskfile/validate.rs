//! The checks every task passes before launch, whether it comes from a task
//! file or out of a policy chain.

use std::net::Ipv4Addr;

use super::{
    FieldErrors, MAX_CPUS, MAX_MEMORY_MB, MAX_NAME_LEN, MAX_RESTART_ATTEMPTS, MAX_TIMEOUT_S,
    MIN_MEMORY_MB, Problems,
};
use crate::{Protocol, ReadyCheck, Task};

/// A task name becomes a directory name and a qemu `-name`: keep it to a
/// charset that needs no escaping anywhere and cannot climb out of a
/// directory.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("is longer than {MAX_NAME_LEN} characters"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "contains {bad:?}; use letters, digits, '-', '_' and '.' only"
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err("must not start with '.' or '-'".into());
    }
    Ok(())
}

/// Checks everything a task must satisfy to be launched. Pure: the same
/// checks apply to a task file and to the output of a policy chain.
pub fn validate(task: &Task) -> Result<(), FieldErrors> {
    let mut p = Problems::default();

    if let Err(e) = check_name(&task.name) {
        p.push("name", e);
    }
    if let Err(e) = check_image_source(&task.image_source) {
        p.push("image_source", e);
    }
    let c = &task.checksum;
    if c.digest.len() != c.algorithm.hex_len()
        || !c
            .digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        p.push(
            "checksum",
            format!(
                "a {} digest is {} lower-case hex digits",
                c.algorithm,
                c.algorithm.hex_len()
            ),
        );
    }

    if task.ports.is_empty() {
        p.push("ports", "at least one port forward is required");
    }
    for (i, port) in task.ports.iter().enumerate() {
        let field = |name: &str| format!("ports[{i}].{name}");
        if port.host == 0 {
            p.push(field("host"), "0 is not a port (1 to 65535)");
        }
        if port.guest == 0 {
            p.push(field("guest"), "0 is not a port (1 to 65535)");
        }
        if port.host_ip.parse::<Ipv4Addr>().is_err() {
            p.push(
                field("host_ip"),
                format!("{:?} is not an IPv4 address", port.host_ip),
            );
        }
        if !port.http_path.starts_with('/')
            || port
                .http_path
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            p.push(
                field("http_path"),
                "must start with '/' and hold no spaces or control characters",
            );
        }
        if port.protocol == Protocol::Udp && port.check != ReadyCheck::None {
            p.push(
                field("check"),
                "a udp port cannot be checked; use check = \"none\"",
            );
        }
        let clash = task.ports[..i].iter().position(|q| {
            q.host == port.host && q.protocol == port.protocol && q.host_ip == port.host_ip
        });
        if let Some(j) = clash {
            p.push(
                field("host"),
                format!(
                    "{} {}:{} is already forwarded by ports[{j}]",
                    port.protocol, port.host_ip, port.host
                ),
            );
        }
    }

    let ranges: [(&str, u32, i64, i64); 4] = [
        ("memory_mb", task.memory_mb, MIN_MEMORY_MB, MAX_MEMORY_MB),
        ("cpus", task.cpus, 1, MAX_CPUS),
        ("kill_timeout_s", task.kill_timeout_s, 0, MAX_TIMEOUT_S),
        ("ready_timeout_s", task.ready_timeout_s, 1, MAX_TIMEOUT_S),
    ];
    for (field, value, min, max) in ranges {
        let v = i64::from(value);
        if v < min || v > max {
            p.push(field, format!("{v} is out of range ({min} to {max})"));
        }
    }
    if task.restart.attempts > MAX_RESTART_ATTEMPTS as u32 {
        p.push(
            "restart.attempts",
            format!("is at most {MAX_RESTART_ATTEMPTS}"),
        );
    }
    if task.restart.interval_s == 0 {
        p.push("restart.interval_s", "must be at least 1");
    }

    if let Some(pattern) = &task.ready_serial
        && (pattern.is_empty() || pattern.contains(char::is_control))
    {
        p.push(
            "ready_serial",
            "must be one non-empty line without control characters",
        );
    }
    if task.machine_type.is_empty()
        || !task
            .machine_type
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        p.push(
            "machine_type",
            format!(
                "{:?} is not a qemu machine name (letters, digits, '-', '_', '.')",
                task.machine_type
            ),
        );
    }
    for (i, arg) in task.args.iter().enumerate() {
        if arg.contains(char::is_control) {
            p.push(format!("args[{i}]"), CONTROL);
        }
    }

    if p.0.is_empty() {
        Ok(())
    } else {
        Err(FieldErrors(p.0))
    }
}

/// What every string field of a task is refused for when it holds a control
/// character (C0, DEL or C1): the URL parser would drop a newline silently,
/// and messages and logs would carry it raw.
const CONTROL: &str = "must not contain control characters";

fn check_image_source(source: &str) -> Result<(), String> {
    if source.contains(char::is_control) {
        return Err(format!("{source:?} {CONTROL}"));
    }
    let url = url::Url::parse(source).map_err(|e| format!("{source:?} is not a URL: {e}"))?;
    match url.scheme() {
        "http" | "https" => {
            if url.host_str().is_none_or(str::is_empty) {
                return Err(format!("{source:?} has no host"));
            }
            Ok(())
        }
        "file" => {
            if url.path().is_empty() || url.path() == "/" {
                return Err(format!("{source:?} names no file"));
            }
            Ok(())
        }
        other => Err(format!(
            "scheme {other:?} is not supported; use http, https or file"
        )),
    }
}
