//! Which accelerator a task gets on this host: what it asked for, unless
//! this host cannot give it. This honours the task; rewriting it is the
//! `accel-fallback` policy's business, and a run-time fallback the
//! launch's.

use policy_sdk::{Accelerator, HostFacts, Task};

use super::LaunchError;

/// The accelerator, and why when it is not the one the task asked for.
pub fn choose(
    task: &Task,
    facts: &HostFacts,
) -> Result<(Accelerator, Option<String>), LaunchError> {
    if !facts.qemu_found {
        return Err(LaunchError::NoQemu);
    }
    let offered = |a: Accelerator| facts.accelerators.iter().any(|x| x == a.as_str());
    let choice = match task.accelerator {
        Accelerator::Kvm if facts.kvm.is_usable() && offered(Accelerator::Kvm) => {
            (Accelerator::Kvm, None)
        }
        Accelerator::Kvm if task.kvm_fallback => {
            let why = if offered(Accelerator::Kvm) {
                format!("KVM is {}", facts.kvm)
            } else {
                "this qemu has no kvm accelerator".to_string()
            };
            (
                Accelerator::Tcg,
                Some(format!("kvm requested, {why}; using tcg")),
            )
        }
        Accelerator::Kvm => return Err(LaunchError::KvmUnavailable(facts.kvm.clone())),
        Accelerator::Tcg => (Accelerator::Tcg, None),
    };
    if !offered(choice.0) {
        return Err(LaunchError::AcceleratorMissing(
            choice.0,
            facts.accelerators.join(", "),
        ));
    }
    Ok(choice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_sdk::KvmStatus;

    fn facts(kvm: KvmStatus, accels: &[&str]) -> HostFacts {
        HostFacts {
            qemu_found: true,
            qemu_version: Some("7.2.22".into()),
            accelerators: accels.iter().map(|s| s.to_string()).collect(),
            kvm,
            host_cpus: 2,
            host_memory_mb: 1024,
        }
    }

    fn task(accelerator: Accelerator, kvm_fallback: bool) -> Task {
        let text = format!(
            "name = \"t\"\nimage_source = \"http://h/x\"\nchecksum = \"{}\"\nhost_port = 1\nguest_port = 2\naccelerator = \"{accelerator}\"\nkvm_fallback = {kvm_fallback}\n",
            "0".repeat(32)
        );
        crate::task::parse_toml(&text).unwrap().into_task().unwrap()
    }

    #[test]
    fn kvm_where_it_works() {
        let chosen = choose(
            &task(Accelerator::Kvm, true),
            &facts(KvmStatus::Usable, &["tcg", "kvm"]),
        );
        assert_eq!(chosen.unwrap(), (Accelerator::Kvm, None));
    }

    #[test]
    fn tcg_where_kvm_lies_and_the_task_allows_it() {
        let (accel, why) = choose(
            &task(Accelerator::Kvm, true),
            &facts(
                KvmStatus::Unusable("emulation failure".into()),
                &["tcg", "kvm"],
            ),
        )
        .unwrap();
        assert_eq!(accel, Accelerator::Tcg);
        assert_eq!(
            why.unwrap(),
            "kvm requested, KVM is unusable: emulation failure; using tcg"
        );
        let (accel, why) = choose(
            &task(Accelerator::Kvm, true),
            &facts(KvmStatus::Usable, &["tcg"]),
        )
        .unwrap();
        assert_eq!(accel, Accelerator::Tcg);
        assert!(why.unwrap().contains("no kvm accelerator"));
    }

    #[test]
    fn refusals() {
        assert!(matches!(
            choose(
                &task(Accelerator::Kvm, false),
                &facts(KvmStatus::Absent, &["tcg", "kvm"])
            ),
            Err(LaunchError::KvmUnavailable(KvmStatus::Absent))
        ));
        assert!(matches!(
            choose(
                &task(Accelerator::Tcg, true),
                &facts(KvmStatus::Usable, &["kvm"])
            ),
            Err(LaunchError::AcceleratorMissing(Accelerator::Tcg, _))
        ));
        let mut no_qemu = facts(KvmStatus::Usable, &["tcg", "kvm"]);
        no_qemu.qemu_found = false;
        assert!(matches!(
            choose(&task(Accelerator::Tcg, true), &no_qemu),
            Err(LaunchError::NoQemu)
        ));
    }
}
