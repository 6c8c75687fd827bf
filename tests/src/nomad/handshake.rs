//! What a Nomad client reads from a plugin's output: the go-plugin
//! handshake line on stdout, and log lines on stderr that hclog re-emits
//! at their own level only when they are JSON of a precise shape.
//! Pure functions, checked more strictly than go-plugin does (it trims
//! whitespace and accepts four fields or more): the contract names one
//! exact line, and a plugin that relies on the client's leniency would
//! break with the next client.

use std::path::PathBuf;

use nomad_proto::handshake::{APP_PROTOCOL_VERSION, CORE_PROTOCOL_VERSION};

/// A valid handshake: where the plugin serves gRPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// The Unix socket, an absolute path.
    pub socket: PathBuf,
}

/// Parses the first stdout line, newline included, as
/// `1|2|unix|<absolute path>|grpc|`.
pub fn parse_handshake(line: &[u8]) -> Result<Handshake, String> {
    let text =
        std::str::from_utf8(line).map_err(|e| format!("the handshake is not UTF-8 ({e})"))?;
    let Some(text) = text.strip_suffix('\n') else {
        return Err(format!("the handshake line has no newline: {text:?}"));
    };
    if text.trim() != text {
        return Err(format!("the handshake line has stray whitespace: {text:?}"));
    }
    let fields: Vec<&str> = text.split('|').collect();
    let [core, app, network, address, protocol, cert] = fields[..] else {
        return Err(format!(
            "the handshake has {} fields, not 6 (core|app|network|address|protocol|cert): {text:?}",
            fields.len()
        ));
    };
    if core != CORE_PROTOCOL_VERSION.to_string() {
        return Err(format!(
            "core protocol version {core:?}, not {CORE_PROTOCOL_VERSION}: {text:?}"
        ));
    }
    if app != APP_PROTOCOL_VERSION.to_string() {
        return Err(format!(
            "app protocol version {app:?}, not {APP_PROTOCOL_VERSION}: {text:?}"
        ));
    }
    if network != "unix" {
        return Err(format!("network {network:?}, not \"unix\": {text:?}"));
    }
    let socket = PathBuf::from(address);
    if !socket.is_absolute() {
        return Err(format!("socket path {address:?} is not absolute"));
    }
    if protocol != "grpc" {
        return Err(format!("protocol {protocol:?}, not \"grpc\": {text:?}"));
    }
    if !cert.is_empty() {
        return Err(format!(
            "a server certificate {cert:?}: Nomad asks for none (no AutoMTLS)"
        ));
    }
    Ok(Handshake { socket })
}

/// The levels hclog knows; a line at another level is logged at debug.
const LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

/// Checks that a stderr line is what go-plugin's log forwarding re-emits
/// at its level: a JSON object with string `@level` (one hclog knows),
/// `@message`, and `@timestamp` in Go's `2006-01-02T15:04:05.000000Z07:00`.
pub fn check_hclog_line(line: &str) -> Result<(), String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON ({e}): {line:?}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("not a JSON object: {line:?}"))?;
    let field = |k: &str| {
        obj.get(k)
            .and_then(|v| v.as_str())
            .ok_or_else(|| format!("no string {k}: {line:?}"))
    };
    let level = field("@level")?;
    if !LEVELS.contains(&level) {
        return Err(format!(
            "@level {level:?} is not one of hclog's {LEVELS:?}: {line:?}"
        ));
    }
    field("@message")?;
    let ts = field("@timestamp")?;
    if !is_go_timestamp(ts) {
        return Err(format!(
            "@timestamp {ts:?} is not in the shape 2006-01-02T15:04:05.000000Z07:00: {line:?}"
        ));
    }
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SS.ffffff` followed by `Z` or `±HH:MM`.
fn is_go_timestamp(ts: &str) -> bool {
    let b = ts.as_bytes();
    if b.len() < 27 {
        return false;
    }
    let digits = |range: std::ops::Range<usize>| b[range].iter().all(u8::is_ascii_digit);
    let fixed = digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..26);
    let zone = &b[26..];
    let zone_ok = zone == b"Z"
        || (zone.len() == 6
            && matches!(zone[0], b'+' | b'-')
            && zone[1..3].iter().all(u8::is_ascii_digit)
            && zone[3] == b':'
            && zone[4..6].iter().all(u8::is_ascii_digit));
    fixed && zone_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_line_go_plugin_prints() {
        let h = parse_handshake(b"1|2|unix|/tmp/plugin123/plugin.sock|grpc|\n").unwrap();
        assert_eq!(h.socket, PathBuf::from("/tmp/plugin123/plugin.sock"));
    }

    #[test]
    fn refuses_every_deviation_with_the_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"1|2|unix|/s|grpc|", "no newline"),
            (b"1|2|unix|/s|grpc|\r\n", "stray whitespace"),
            (b" 1|2|unix|/s|grpc|\n", "stray whitespace"),
            (b"1|2|unix|/s|grpc\n", "5 fields"),
            (b"1|2|unix|/s|grpc||true\n", "7 fields"),
            (b"2|2|unix|/s|grpc|\n", "core protocol version \"2\""),
            (b"1|1|unix|/s|grpc|\n", "app protocol version \"1\""),
            (b"1|2|tcp|127.0.0.1:5000|grpc|\n", "network \"tcp\""),
            (b"1|2|unix|plugin.sock|grpc|\n", "not absolute"),
            (b"1|2|unix|/s|netrpc|\n", "protocol \"netrpc\""),
            (b"1|2|unix|/s|grpc|MIIB\n", "server certificate"),
            (b"\xff|2|unix|/s|grpc|\n", "not UTF-8"),
            (b"listening on /s\n", "1 fields"),
        ];
        for (line, reason) in cases {
            let err = parse_handshake(line).unwrap_err();
            assert!(
                err.contains(reason),
                "{:?}: {err}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn an_hclog_line_has_level_message_and_go_timestamp() {
        let ok = r#"{"@level":"info","@message":"Serving","@timestamp":"2026-11-27T08:23:20.123456Z","task":"a/b/c"}"#;
        check_hclog_line(ok).unwrap();
        let offset =
            r#"{"@level":"warn","@message":"x","@timestamp":"2026-11-27T08:23:20.123456+01:00"}"#;
        check_hclog_line(offset).unwrap();
        let cases = [
            ("INFO Serving", "not JSON"),
            ("[1]", "not a JSON object"),
            (
                r#"{"@message":"x","@timestamp":"2026-11-27T08:23:20.123456Z"}"#,
                "no string @level",
            ),
            (
                r#"{"@level":"INFO","@message":"x","@timestamp":"2026-11-27T08:23:20.123456Z"}"#,
                "is not one of hclog's",
            ),
            (
                r#"{"@level":"info","@message":1,"@timestamp":"2026-11-27T08:23:20.123456Z"}"#,
                "no string @message",
            ),
            (
                r#"{"@level":"info","@message":"x","@timestamp":"2026-11-27T08:23:20.123Z"}"#,
                "not in the shape",
            ),
            (
                r#"{"@level":"info","@message":"x","@timestamp":"2026-11-27T08:23:20.123456789Z"}"#,
                "not in the shape",
            ),
            (
                r#"{"@level":"info","@message":"x","@timestamp":"2026-11-27 08:23:20.123456Z"}"#,
                "not in the shape",
            ),
            (
                r#"{"@level":"info","@message":"x","@timestamp":"2026-11-27T08:23:20.123456+0100"}"#,
                "not in the shape",
            ),
        ];
        for (line, reason) in cases {
            let err = check_hclog_line(line).unwrap_err();
            assert!(err.contains(reason), "{line}: {err}");
        }
    }
}
