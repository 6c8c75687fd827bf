//! `port-range`: forwarded host ports must lie inside the operator's range.
//!
//! Settings (all optional):
//! - `min`, `max` (default 1024 and 65535): the range, inclusive;
//! - `mode` (default `"reject"`): `"reject"` refuses a task with a host port
//!   outside the range, `"clamp"` moves such a port to the nearest free port
//!   inside it;
//! - `allow_privileged` (default false): host ports below 1024 are refused in
//!   either mode unless this is true (and a range reaching below 1024 is a
//!   settings error without it).

use policy_sdk::{Decision, HostFacts, Policy, Task};
use serde::Deserialize;

/// Ports below this need privileges to bind.
const FIRST_UNPRIVILEGED: u16 = 1024;

pub struct PortRange;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Reject,
    Clamp,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default = "default_min")]
    pub min: u16,
    #[serde(default = "default_max")]
    pub max: u16,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    #[serde(default)]
    pub allow_privileged: bool,
}

fn default_min() -> u16 {
    FIRST_UNPRIVILEGED
}

fn default_max() -> u16 {
    u16::MAX
}

fn default_mode() -> Mode {
    Mode::Reject
}

impl Policy for PortRange {
    type Settings = Settings;
    const NAME: &'static str = "port-range";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const REWRITES: bool = true;

    fn check_settings(s: &Settings) -> Result<(), String> {
        if s.min == 0 {
            return Err("min must be at least 1".into());
        }
        if s.min > s.max {
            return Err(format!("min ({}) is greater than max ({})", s.min, s.max));
        }
        if s.min < FIRST_UNPRIVILEGED && !s.allow_privileged {
            return Err(format!(
                "min ({}) is a privileged port; set allow_privileged = true to allow ports below {FIRST_UNPRIVILEGED}",
                s.min
            ));
        }
        Ok(())
    }

    fn evaluate(task: &Task, _facts: &HostFacts, s: &Settings) -> Decision {
        let mut refused = Vec::new();
        let mut out_of_range = Vec::new();
        for (i, port) in task.ports.iter().enumerate() {
            if port.host < FIRST_UNPRIVILEGED && !s.allow_privileged {
                refused.push(format!(
                    "ports[{i}].host {} is a privileged port (below {FIRST_UNPRIVILEGED})",
                    port.host
                ));
            } else if !(s.min..=s.max).contains(&port.host) {
                out_of_range.push(i);
            }
        }
        if s.mode == Mode::Reject {
            refused.extend(out_of_range.iter().map(|&i| {
                format!(
                    "ports[{i}].host {} is outside the allowed range {}-{}",
                    task.ports[i].host, s.min, s.max
                )
            }));
        }
        if !refused.is_empty() {
            return Decision::reject(refused.join("; "));
        }
        if out_of_range.is_empty() {
            return Decision::Accept;
        }

        let mut rewritten = task.clone();
        let mut moves = Vec::new();
        for i in out_of_range {
            let Some(free) = free_port(&rewritten, i, s.min, s.max) else {
                return Decision::reject(format!(
                    "ports[{i}].host {} is outside the allowed range {}-{} and no port in it is free",
                    task.ports[i].host, s.min, s.max
                ));
            };
            moves.push(format!("ports[{i}].host {} -> {free}", task.ports[i].host));
            rewritten.ports[i].host = free;
        }
        Decision::rewrite(
            rewritten,
            format!(
                "moved into the allowed range {}-{}: {}",
                s.min,
                s.max,
                moves.join(", ")
            ),
        )
    }
}

/// The port inside `min..=max` nearest to `ports[i].host` (the bound it
/// crossed, then onwards, wrapping around) that no other forward of the same
/// protocol and address uses.
fn free_port(task: &Task, i: usize, min: u16, max: u16) -> Option<u16> {
    let port = &task.ports[i];
    let start = port.host.clamp(min, max);
    let taken = |candidate: u16| {
        task.ports.iter().enumerate().any(|(j, q)| {
            j != i
                && q.host == candidate
                && q.protocol == port.protocol
                && q.host_ip == port.host_ip
        })
    };
    let len = u32::from(max - min) + 1;
    // Downwards from max when the port was above the range, upwards from min
    // otherwise, so that the first candidate is the bound it crossed.
    let down = port.host > max;
    let first = u32::from(start - min);
    (0..len)
        .map(|k| {
            let offset = if down {
                (first + len - k % len) % len
            } else {
                (first + k) % len
            };
            // offset < len <= 65536 and min + offset <= max: fits in u16.
            min + offset as u16
        })
        .find(|&candidate| !taken(candidate))
}

policy_sdk::export_policy!(PortRange);

#[cfg(test)]
mod tests {
    use policy_sdk::testing::{self, default_facts};

    use super::*;

    fn task(ports: &[u16]) -> Task {
        let spec: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("[[case.task.ports]]\nhost = {p}\nguest = {}\n", 80 + i))
            .collect();
        let text = format!(
            "[[case]]\nname = \"t\"\nexpect = \"accept\"\n[case.task]\n{}",
            spec.join("")
        );
        testing::parse_cases(&text).unwrap().remove(0).task
    }

    fn eval(ports: &[u16], settings: &str) -> Decision {
        policy_sdk::evaluate::<PortRange>(&task(ports), &default_facts(), settings)
    }

    #[test]
    fn inside_the_range_is_accepted() {
        assert_eq!(
            eval(&[20000, 30000], r#"{"min":20000,"max":30000}"#),
            Decision::Accept
        );
    }

    #[test]
    fn reject_mode_names_every_port() {
        let Decision::Reject { reason } =
            eval(&[19999, 25000, 30001], r#"{"min":20000,"max":30000}"#)
        else {
            panic!("expected a reject");
        };
        assert!(reason.contains("ports[0].host 19999"), "{reason}");
        assert!(reason.contains("ports[2].host 30001"), "{reason}");
        assert!(!reason.contains("ports[1]"), "{reason}");
    }

    #[test]
    fn clamp_moves_to_the_crossed_bound_or_next_free() {
        let settings = r#"{"min":20000,"max":20002,"mode":"clamp"}"#;
        let Decision::Rewrite { task, reason } = eval(&[1080, 20000, 40000], settings) else {
            panic!("expected a rewrite");
        };
        let hosts: Vec<u16> = task.ports.iter().map(|p| p.host).collect();
        // 1080 would become 20000, taken: next is 20001; 40000 becomes 20002.
        assert_eq!(hosts, [20001, 20000, 20002]);
        assert!(reason.contains("ports[0].host 1080 -> 20001"), "{reason}");
    }

    #[test]
    fn clamp_with_no_room_rejects() {
        let settings = r#"{"min":20000,"max":20000,"mode":"clamp"}"#;
        assert_eq!(eval(&[20000, 30000], settings).kind(), "reject");
    }

    #[test]
    fn privileged_ports_need_permission_in_both_modes() {
        for mode in ["reject", "clamp"] {
            let settings = format!(r#"{{"min":1024,"max":65535,"mode":"{mode}"}}"#);
            let Decision::Reject { reason } = eval(&[80], &settings) else {
                panic!("expected a reject in {mode} mode");
            };
            assert!(reason.contains("privileged"), "{reason}");
        }
        let allowed = r#"{"min":1,"max":65535,"allow_privileged":true}"#;
        assert_eq!(eval(&[80], allowed), Decision::Accept);
    }

    #[test]
    fn defaults_allow_unprivileged_ports() {
        assert_eq!(eval(&[1024, 65535], "{}"), Decision::Accept);
        assert_eq!(eval(&[1023], "{}").kind(), "reject");
    }

    #[test]
    fn bad_settings() {
        let check = policy_sdk::check_settings::<PortRange>;
        assert!(
            check(r#"{"min":3000,"max":2000}"#)
                .unwrap_err()
                .contains("greater than")
        );
        assert!(
            check(r#"{"min":80}"#)
                .unwrap_err()
                .contains("allow_privileged")
        );
        assert!(check(r#"{"min":0,"allow_privileged":true}"#).is_err());
        assert!(check(r#"{"mode":"wrap"}"#).unwrap_err().contains("wrap"));
        assert!(check(r#"{"max":70000}"#).is_err());
        assert!(
            check(r#"{"minimum":2000}"#)
                .unwrap_err()
                .contains("minimum")
        );
    }

    #[test]
    fn cases() {
        testing::assert_cases::<PortRange>(concat!(env!("CARGO_MANIFEST_DIR"), "/CASES.toml"));
    }
}
