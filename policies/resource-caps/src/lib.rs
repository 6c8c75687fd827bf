//! `resource-caps`: caps on a task's memory and cpus.
//!
//! Settings (all optional):
//! - `max_memory_mb`: default the host's memory (`host.memory_mb`);
//! - `max_cpus`: default the host's cpus (`host.cpus`);
//! - `mode` (default `"reject"`): `"reject"` refuses a task above a cap,
//!   `"clamp"` lowers it to the cap.

use policy_sdk::{Decision, HostFacts, Policy, Task};
use serde::Deserialize;

/// The smallest memory a task may have (the executor's own minimum): a cap
/// below it could only produce invalid tasks.
const MIN_MEMORY_MB: u32 = 16;

pub struct ResourceCaps;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Reject,
    Clamp,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub max_memory_mb: Option<u32>,
    #[serde(default)]
    pub max_cpus: Option<u32>,
    #[serde(default = "default_mode")]
    pub mode: Mode,
}

fn default_mode() -> Mode {
    Mode::Reject
}

impl Policy for ResourceCaps {
    type Settings = Settings;
    const NAME: &'static str = "resource-caps";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const REWRITES: bool = true;

    fn check_settings(s: &Settings) -> Result<(), String> {
        if let Some(mb) = s.max_memory_mb
            && mb < MIN_MEMORY_MB
        {
            return Err(format!(
                "max_memory_mb ({mb}) is below the smallest task memory ({MIN_MEMORY_MB})"
            ));
        }
        if s.max_cpus == Some(0) {
            return Err("max_cpus must be at least 1".into());
        }
        Ok(())
    }

    fn evaluate(task: &Task, facts: &HostFacts, s: &Settings) -> Decision {
        let host_memory = u32::try_from(facts.host_memory_mb).unwrap_or(u32::MAX);
        let (memory_cap, memory_from) = match s.max_memory_mb {
            Some(mb) => (mb, "max_memory_mb"),
            None => (host_memory, "the host's memory"),
        };
        let (cpu_cap, cpu_from) = match s.max_cpus {
            Some(n) => (n, "max_cpus"),
            None => (facts.host_cpus, "the host's cpus"),
        };
        // A host reporting less than a task can have would make clamping
        // produce an invalid task; refusing says more.
        let memory_cap = memory_cap.max(MIN_MEMORY_MB);
        let cpu_cap = cpu_cap.max(1);

        let mut over = Vec::new();
        if task.memory_mb > memory_cap {
            over.push(format!(
                "memory_mb {} is above {memory_cap} ({memory_from})",
                task.memory_mb
            ));
        }
        if task.cpus > cpu_cap {
            over.push(format!(
                "cpus {} is above {cpu_cap} ({cpu_from})",
                task.cpus
            ));
        }
        if over.is_empty() {
            return Decision::Accept;
        }
        match s.mode {
            Mode::Reject => Decision::reject(over.join("; ")),
            Mode::Clamp => {
                let mut capped = task.clone();
                capped.memory_mb = task.memory_mb.min(memory_cap);
                capped.cpus = task.cpus.min(cpu_cap);
                Decision::rewrite(capped, format!("lowered to the caps: {}", over.join("; ")))
            }
        }
    }
}

policy_sdk::export_policy!(ResourceCaps);

#[cfg(test)]
mod tests {
    use policy_sdk::testing::{self, default_facts};

    use super::*;

    fn task(memory_mb: u32, cpus: u32) -> Task {
        let text = format!(
            "[[case]]\nname = \"t\"\nexpect = \"accept\"\ntask = {{ host_port = 1, guest_port = 2, memory_mb = {memory_mb}, cpus = {cpus} }}\n"
        );
        testing::parse_cases(&text).unwrap().remove(0).task
    }

    #[test]
    fn within_caps_is_accepted() {
        let d = policy_sdk::evaluate::<ResourceCaps>(
            &task(1024, 2),
            &default_facts(),
            r#"{"max_memory_mb":1024,"max_cpus":2}"#,
        );
        assert_eq!(d, Decision::Accept);
    }

    #[test]
    fn reject_names_both_caps() {
        let Decision::Reject { reason } = policy_sdk::evaluate::<ResourceCaps>(
            &task(4096, 8),
            &default_facts(),
            r#"{"max_memory_mb":1024,"max_cpus":2}"#,
        ) else {
            panic!("expected a reject")
        };
        assert_eq!(
            reason,
            "memory_mb 4096 is above 1024 (max_memory_mb); cpus 8 is above 2 (max_cpus)"
        );
    }

    #[test]
    fn clamp_lowers_only_what_is_over() {
        let Decision::Rewrite { task: t, .. } = policy_sdk::evaluate::<ResourceCaps>(
            &task(4096, 1),
            &default_facts(),
            r#"{"max_memory_mb":1024,"mode":"clamp"}"#,
        ) else {
            panic!("expected a rewrite")
        };
        assert_eq!((t.memory_mb, t.cpus), (1024, 1));
    }

    #[test]
    fn default_caps_are_the_host() {
        let mut facts = default_facts();
        facts.host_cpus = 2;
        let d = policy_sdk::evaluate::<ResourceCaps>(&task(512, 4), &facts, "{}");
        assert_eq!(d.kind(), "reject");
    }

    #[test]
    fn bad_settings() {
        let check = policy_sdk::check_settings::<ResourceCaps>;
        assert!(
            check(r#"{"max_memory_mb":8}"#)
                .unwrap_err()
                .contains("below")
        );
        assert!(check(r#"{"max_cpus":0}"#).is_err());
        assert!(check(r#"{"max_memory_mb":-1}"#).is_err());
        assert!(check(r#"{"memory":1}"#).unwrap_err().contains("memory"));
    }

    #[test]
    fn cases() {
        testing::assert_cases::<ResourceCaps>(concat!(env!("CARGO_MANIFEST_DIR"), "/CASES.toml"));
    }
}
