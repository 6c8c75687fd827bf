//! `accel-fallback`: a task that asks for kvm on a host whose KVM is not
//! usable runs under tcg instead, with the reason; every other task is left
//! alone.
//!
//! A task that forbids the fallback (`kvm_fallback = false`) cannot run on
//! such a host at all and is rejected, saying why. No settings.

use policy_sdk::{Accelerator, Decision, HostFacts, KvmStatus, Policy, Task};
use serde::Deserialize;

pub struct AccelFallback;

/// This policy takes no settings; anything given is refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {}

impl Policy for AccelFallback {
    type Settings = Settings;
    const NAME: &'static str = "accel-fallback";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const REWRITES: bool = true;

    fn evaluate(task: &Task, facts: &HostFacts, _settings: &Settings) -> Decision {
        if task.accelerator != Accelerator::Kvm || facts.kvm.is_usable() {
            return Decision::Accept;
        }
        let why = match &facts.kvm {
            KvmStatus::Absent => "this host has no KVM (/dev/kvm is absent)".to_string(),
            KvmStatus::Unusable(reason) => format!("KVM is unusable on this host: {reason}"),
            KvmStatus::Usable => unreachable!("handled above"),
        };
        if !task.kvm_fallback {
            return Decision::reject(format!(
                "the task asks for kvm and forbids falling back to tcg, but {why}"
            ));
        }
        let mut tcg = task.clone();
        tcg.accelerator = Accelerator::Tcg;
        Decision::rewrite(tcg, format!("{why}; running under tcg instead of kvm"))
    }
}

policy_sdk::export_policy!(AccelFallback);

#[cfg(test)]
mod tests {
    use policy_sdk::testing::{self, default_facts};

    use super::*;

    fn kvm_task() -> Task {
        let mut task = testing::parse_cases(
            "[[case]]\nname = \"t\"\nexpect = \"accept\"\ntask = { host_port = 18080, guest_port = 80, accelerator = \"kvm\" }\n",
        )
        .unwrap()
        .remove(0)
        .task;
        task.kvm_fallback = true;
        task
    }

    #[test]
    fn kvm_on_a_kvm_host_is_left_alone() {
        let decision = policy_sdk::evaluate::<AccelFallback>(&kvm_task(), &default_facts(), "{}");
        assert_eq!(decision, Decision::Accept);
    }

    #[test]
    fn kvm_without_usable_kvm_becomes_tcg() {
        let mut facts = default_facts();
        facts.kvm = KvmStatus::Unusable("emulation failure".into());
        let Decision::Rewrite { task, reason } =
            policy_sdk::evaluate::<AccelFallback>(&kvm_task(), &facts, "")
        else {
            panic!("expected a rewrite");
        };
        assert_eq!(task.accelerator, Accelerator::Tcg);
        assert_eq!(
            Task {
                accelerator: Accelerator::Kvm,
                ..*task
            },
            kvm_task(),
            "nothing else changes"
        );
        assert!(reason.contains("emulation failure"), "{reason}");
    }

    #[test]
    fn no_fallback_allowed_means_reject() {
        let mut task = kvm_task();
        task.kvm_fallback = false;
        let mut facts = default_facts();
        facts.kvm = KvmStatus::Absent;
        let decision = policy_sdk::evaluate::<AccelFallback>(&task, &facts, "{}");
        assert_eq!(decision.kind(), "reject");
    }

    #[test]
    fn settings_are_refused() {
        assert!(policy_sdk::check_settings::<AccelFallback>("{}").is_ok());
        let err = policy_sdk::check_settings::<AccelFallback>(r#"{"force":true}"#).unwrap_err();
        assert!(err.contains("force"), "{err}");
    }

    #[test]
    fn cases() {
        testing::assert_cases::<AccelFallback>(concat!(env!("CARGO_MANIFEST_DIR"), "/CASES.toml"));
    }
}
