//! The plugin's log lines on stderr, in the JSON shape Nomad's plugin
//! loader re-emits at their level (go-hclog's): `@level`, `@message` and
//! `@timestamp` (microseconds, UTC), plus the event's fields. Anything else
//! on stderr would reach the agent's log at debug level only.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats each event as one hclog JSON line.
pub struct HclogFormat;

impl<S, N> FormatEvent<S, N> for HclogFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        // Span fields (the task id) first, so the event's own win.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let formatted = extensions.get::<tracing_subscriber::fmt::FormattedFields<N>>();
                if let Some(f) = formatted.filter(|f| !f.fields.is_empty()) {
                    fields
                        .map
                        .insert(span.name().to_string(), f.fields.clone().into());
                }
            }
        }
        event.record(&mut fields);
        let line = line(
            *event.metadata().level(),
            std::time::SystemTime::now(),
            fields.message.unwrap_or_default(),
            fields.map,
        );
        writeln!(writer, "{line}")
    }
}

/// One log line: hclog's three keys and the fields.
pub fn line(
    level: Level,
    at: std::time::SystemTime,
    message: String,
    fields: serde_json::Map<String, serde_json::Value>,
) -> String {
    let mut map = fields;
    map.insert("@level".into(), level_name(level).into());
    map.insert("@message".into(), message.into());
    map.insert(
        "@timestamp".into(),
        humantime::format_rfc3339_micros(at).to_string().into(),
    );
    map.insert("@module".into(), "qemu-executor".into());
    serde_json::Value::Object(map).to_string()
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warn",
        Level::ERROR => "error",
    }
}

#[derive(Default)]
struct Fields {
    message: Option<String>,
    map: serde_json::Map<String, serde_json::Value>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = Some(text);
        } else {
            self.map.insert(field.name().into(), text.into());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = Some(value.into());
        } else {
            self.map.insert(field.name().into(), value.into());
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.map.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.map.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.map.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_hclog_keys_and_go_timestamps() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_795_940_000_123_456);
        let mut fields = serde_json::Map::new();
        fields.insert("task".into(), "a1/web/0badcafe".into());
        let text = line(Level::WARN, at, "VM adopted".into(), fields);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["@level"], "warn");
        assert_eq!(v["@message"], "VM adopted");
        assert_eq!(v["task"], "a1/web/0badcafe");
        // Go's layout 2006-01-02T15:04:05.000000Z07:00, in UTC.
        assert_eq!(v["@timestamp"], "2026-11-29T08:13:20.123456Z");
    }
}
