//! The node attributes the plugin fingerprints: Nomad's qemu driver's
//! (`driver.qemu`, `driver.qemu.version`, `driver.qemu.emulators`), so jobs
//! constrained on them place here too, and ours, which say what a task
//! really gets on this host (`driver.qemu-executor.*`).

use std::collections::HashMap;

use nomad_proto::driver::FingerprintResponse;
use nomad_proto::driver::fingerprint_response::HealthState;
use nomad_proto::structs::{Attribute, attribute::Value};
use policy_sdk::HostFacts;

pub fn fingerprint(facts: &HostFacts, policies: usize) -> FingerprintResponse {
    if !facts.qemu_found {
        return FingerprintResponse {
            attributes: HashMap::new(),
            health: HealthState::Undetected as i32,
            health_description: format!(
                "{} was not found (set [qemu] binary in the executor config, or install it)",
                crate::host::probe::QEMU_BINARY
            ),
            err: String::new(),
        };
    }
    let string = |s: String| Attribute {
        value: Some(Value::StringVal(s)),
        unit: String::new(),
    };
    let usable: Vec<&str> = facts
        .accelerators
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "kvm" || facts.kvm.is_usable())
        .collect();
    let mut attributes = HashMap::from([
        (
            "driver.qemu".to_string(),
            Attribute {
                value: Some(Value::BoolVal(true)),
                unit: String::new(),
            },
        ),
        ("driver.qemu.emulators".to_string(), string("x86_64".into())),
        (
            "driver.qemu-executor.version".to_string(),
            string(env!("CARGO_PKG_VERSION").into()),
        ),
        (
            "driver.qemu-executor.accelerators".to_string(),
            string(usable.join(",")),
        ),
        (
            "driver.qemu-executor.kvm".to_string(),
            string(facts.kvm.to_string()),
        ),
        (
            "driver.qemu-executor.policies".to_string(),
            Attribute {
                value: Some(Value::IntVal(i64::try_from(policies).unwrap_or(i64::MAX))),
                unit: String::new(),
            },
        ),
    ]);
    if let Some(version) = &facts.qemu_version {
        attributes.insert("driver.qemu.version".into(), string(version.clone()));
    }
    FingerprintResponse {
        attributes,
        health: HealthState::Healthy as i32,
        health_description: "Healthy".into(),
        err: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_sdk::KvmStatus;

    fn facts(kvm: KvmStatus) -> HostFacts {
        HostFacts {
            qemu_found: true,
            qemu_version: Some("7.2.22".into()),
            accelerators: vec!["kvm".into(), "tcg".into()],
            kvm,
            host_cpus: 2,
            host_memory_mb: 24_000,
        }
    }

    fn text(f: &FingerprintResponse, key: &str) -> String {
        match &f.attributes[key].value {
            Some(Value::StringVal(s)) => s.clone(),
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn a_lying_kvm_is_not_offered() {
        let f = fingerprint(&facts(KvmStatus::Unusable("emulation failure".into())), 2);
        assert_eq!(f.health, HealthState::Healthy as i32);
        assert_eq!(
            f.attributes["driver.qemu"].value,
            Some(Value::BoolVal(true))
        );
        assert_eq!(text(&f, "driver.qemu.version"), "7.2.22");
        assert_eq!(text(&f, "driver.qemu-executor.accelerators"), "tcg");
        assert_eq!(
            text(&f, "driver.qemu-executor.kvm"),
            "unusable: emulation failure"
        );
        assert_eq!(
            f.attributes["driver.qemu-executor.policies"].value,
            Some(Value::IntVal(2))
        );
        let f = fingerprint(&facts(KvmStatus::Usable), 0);
        assert_eq!(text(&f, "driver.qemu-executor.accelerators"), "kvm,tcg");
    }

    #[test]
    fn no_qemu_is_undetected_with_a_reason() {
        let mut f = facts(KvmStatus::Absent);
        f.qemu_found = false;
        let r = fingerprint(&f, 0);
        assert_eq!(r.health, HealthState::Undetected as i32);
        assert!(r.health_description.contains("not found"));
        assert!(r.attributes.is_empty());
    }
}
