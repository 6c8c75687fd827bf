//! Field-by-field differences between two tasks, as an operator reads them:
//! `ports[0].host: 80 -> 8080`. Pure, over the tasks' serde form, so a field
//! added to the task is diffed without touching this file.

use std::fmt;

use policy_sdk::Task;
use serde::Serialize;
use serde_json::Value;

/// One field that a rewrite changed. `before` is absent for an added list
/// entry or field, `after` for a removed one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    /// Path in the task-file form: `memory_mb`, `ports[1].host`, `checksum`.
    pub field: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
}

impl fmt::Display for FieldChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: &Option<Value>| match v {
            Some(v) => v.to_string(),
            None => "(none)".to_string(),
        };
        write!(
            f,
            "{}: {} -> {}",
            self.field,
            show(&self.before),
            show(&self.after)
        )
    }
}

/// Every field that differs between `before` and `after`, in a stable
/// order (object keys sorted, list entries by index).
pub fn diff(before: &Task, after: &Task) -> Vec<FieldChange> {
    let mut changes = Vec::new();
    // A Task always serializes; should that ever change, no diff is better
    // than a panic in the middle of a chain.
    if let (Ok(a), Ok(b)) = (serde_json::to_value(before), serde_json::to_value(after)) {
        walk("", &a, &b, &mut changes);
    }
    changes
}

fn walk(path: &str, before: &Value, after: &Value, out: &mut Vec<FieldChange>) {
    match (before, after) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let field = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => walk(&field, x, y, out),
                    (x, y) => out.push(FieldChange {
                        field,
                        before: x.cloned(),
                        after: y.cloned(),
                    }),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for i in 0..a.len().max(b.len()) {
                let field = format!("{path}[{i}]");
                match (a.get(i), b.get(i)) {
                    (Some(x), Some(y)) => walk(&field, x, y, out),
                    (x, y) => out.push(FieldChange {
                        field,
                        before: x.cloned(),
                        after: y.cloned(),
                    }),
                }
            }
        }
        (a, b) if a != b => out.push(FieldChange {
            field: path.to_string(),
            before: Some(a.clone()),
            after: Some(b.clone()),
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Task {
        serde_json::from_value(serde_json::json!({
            "name": "web",
            "image_source": "http://h/x.iso",
            "checksum": "md5:0123456789abcdef0123456789abcdef",
            "accelerator": "kvm",
            "kvm_fallback": true,
            "ports": [{"host": 80, "guest": 8080, "protocol": "tcp", "host_ip": "127.0.0.1",
                       "check": "http", "http_path": "/"}],
            "memory_mb": 512, "cpus": 1, "kill_timeout_s": 30, "ready_timeout_s": 300,
            "machine_type": "pc", "drive_interface": "ide", "graceful_shutdown": true,
            "restart": {"attempts": 2, "interval_s": 1800, "delay_s": 15, "mode": "fail"}
        }))
        .unwrap()
    }

    fn lines(changes: &[FieldChange]) -> Vec<String> {
        changes.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn same_task_has_no_diff() {
        assert!(diff(&task(), &task()).is_empty());
    }

    #[test]
    fn nested_fields_are_named_by_path() {
        let mut after = task();
        after.ports[0].host = 8080;
        after.accelerator = policy_sdk::Accelerator::Tcg;
        after.restart.attempts = 5;
        assert_eq!(
            lines(&diff(&task(), &after)),
            [
                "accelerator: \"kvm\" -> \"tcg\"",
                "ports[0].host: 80 -> 8080",
                "restart.attempts: 2 -> 5",
            ]
        );
    }

    #[test]
    fn added_and_removed_entries() {
        let mut after = task();
        after.args.push("-nographic".into());
        let mut extra = after.ports[0].clone();
        extra.host = 81;
        after.ports.push(extra);
        let changes = diff(&task(), &after);
        assert_eq!(changes[0].to_string(), "args[0]: (none) -> \"-nographic\"");
        assert_eq!(changes[1].field, "ports[1]");
        assert_eq!(changes[1].before, None);
        assert_eq!(changes[1].after.as_ref().unwrap()["host"], 81);

        let back = diff(&after, &task());
        assert_eq!(back[0].to_string(), "args[0]: \"-nographic\" -> (none)");
    }

    #[test]
    fn optional_field_appearing() {
        let mut after = task();
        after.ready_serial = Some("login:".into());
        assert_eq!(
            lines(&diff(&task(), &after)),
            ["ready_serial: (none) -> \"login:\""]
        );
    }

    #[test]
    fn checksum_is_one_field() {
        let mut after = task();
        after.checksum = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let changes = diff(&task(), &after);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].field, "checksum");
    }

    #[test]
    fn serializes_for_the_cli() {
        let mut after = task();
        after.memory_mb = 256;
        let json = serde_json::to_value(diff(&task(), &after)).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{"field": "memory_mb", "before": 512, "after": 256}])
        );
    }
}
