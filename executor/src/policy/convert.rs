//! Conversions between the types `bindgen!` generates for the WIT contract
//! and the SDK's wire types, which the rest of the executor uses. Kept
//! exhaustive (no `..`), so that a field added to one side and not the
//! other does not compile.

use policy_sdk as sdk;

use super::host::wit;

impl From<&sdk::HostFacts> for wit::HostFacts {
    fn from(f: &sdk::HostFacts) -> Self {
        wit::HostFacts {
            qemu_found: f.qemu_found,
            qemu_version: f.qemu_version.clone(),
            accelerators: f.accelerators.clone(),
            kvm: match &f.kvm {
                sdk::KvmStatus::Usable => wit::KvmStatus::Usable,
                sdk::KvmStatus::Absent => wit::KvmStatus::Absent,
                sdk::KvmStatus::Unusable(reason) => wit::KvmStatus::Unusable(reason.clone()),
            },
            host_cpus: f.host_cpus,
            host_memory_mb: f.host_memory_mb,
        }
    }
}

impl From<wit::Task> for sdk::Task {
    fn from(t: wit::Task) -> Self {
        sdk::Task {
            name: t.name,
            image_source: t.image_source,
            checksum: sdk::Checksum {
                algorithm: match t.checksum.algorithm {
                    wit::ChecksumAlgorithm::Md5 => sdk::ChecksumAlgorithm::Md5,
                    wit::ChecksumAlgorithm::Sha256 => sdk::ChecksumAlgorithm::Sha256,
                    wit::ChecksumAlgorithm::Sha512 => sdk::ChecksumAlgorithm::Sha512,
                },
                digest: t.checksum.digest,
            },
            accelerator: match t.accelerator {
                wit::Accelerator::Kvm => sdk::Accelerator::Kvm,
                wit::Accelerator::Tcg => sdk::Accelerator::Tcg,
            },
            kvm_fallback: t.kvm_fallback,
            ports: t
                .ports
                .into_iter()
                .map(|p| sdk::PortMapping {
                    host: p.host,
                    guest: p.guest,
                    protocol: match p.protocol {
                        wit::Protocol::Tcp => sdk::Protocol::Tcp,
                        wit::Protocol::Udp => sdk::Protocol::Udp,
                    },
                    host_ip: p.host_ip,
                    check: match p.check {
                        wit::ReadyCheck::Http => sdk::ReadyCheck::Http,
                        wit::ReadyCheck::Banner => sdk::ReadyCheck::Banner,
                        wit::ReadyCheck::None => sdk::ReadyCheck::None,
                    },
                    http_path: p.http_path,
                })
                .collect(),
            memory_mb: t.memory_mb,
            cpus: t.cpus,
            kill_timeout_s: t.kill_timeout_s,
            ready_timeout_s: t.ready_timeout_s,
            ready_serial: t.ready_serial,
            machine_type: t.machine_type,
            drive_interface: match t.drive_interface {
                wit::DriveInterface::Ide => sdk::DriveInterface::Ide,
                wit::DriveInterface::Virtio => sdk::DriveInterface::Virtio,
            },
            graceful_shutdown: t.graceful_shutdown,
            args: t.args,
            restart: sdk::RestartPolicy {
                attempts: t.restart.attempts,
                interval_s: t.restart.interval_s,
                delay_s: t.restart.delay_s,
                mode: match t.restart.mode {
                    wit::RestartMode::Fail => sdk::RestartMode::Fail,
                    wit::RestartMode::Delay => sdk::RestartMode::Delay,
                },
            },
        }
    }
}

impl From<sdk::Task> for wit::Task {
    fn from(t: sdk::Task) -> Self {
        wit::Task {
            name: t.name,
            image_source: t.image_source,
            checksum: wit::Checksum {
                algorithm: match t.checksum.algorithm {
                    sdk::ChecksumAlgorithm::Md5 => wit::ChecksumAlgorithm::Md5,
                    sdk::ChecksumAlgorithm::Sha256 => wit::ChecksumAlgorithm::Sha256,
                    sdk::ChecksumAlgorithm::Sha512 => wit::ChecksumAlgorithm::Sha512,
                },
                digest: t.checksum.digest,
            },
            accelerator: match t.accelerator {
                sdk::Accelerator::Kvm => wit::Accelerator::Kvm,
                sdk::Accelerator::Tcg => wit::Accelerator::Tcg,
            },
            kvm_fallback: t.kvm_fallback,
            ports: t
                .ports
                .into_iter()
                .map(|p| wit::PortMapping {
                    host: p.host,
                    guest: p.guest,
                    protocol: match p.protocol {
                        sdk::Protocol::Tcp => wit::Protocol::Tcp,
                        sdk::Protocol::Udp => wit::Protocol::Udp,
                    },
                    host_ip: p.host_ip,
                    check: match p.check {
                        sdk::ReadyCheck::Http => wit::ReadyCheck::Http,
                        sdk::ReadyCheck::Banner => wit::ReadyCheck::Banner,
                        sdk::ReadyCheck::None => wit::ReadyCheck::None,
                    },
                    http_path: p.http_path,
                })
                .collect(),
            memory_mb: t.memory_mb,
            cpus: t.cpus,
            kill_timeout_s: t.kill_timeout_s,
            ready_timeout_s: t.ready_timeout_s,
            ready_serial: t.ready_serial,
            machine_type: t.machine_type,
            drive_interface: match t.drive_interface {
                sdk::DriveInterface::Ide => wit::DriveInterface::Ide,
                sdk::DriveInterface::Virtio => wit::DriveInterface::Virtio,
            },
            graceful_shutdown: t.graceful_shutdown,
            args: t.args,
            restart: wit::RestartPolicy {
                attempts: t.restart.attempts,
                interval_s: t.restart.interval_s,
                delay_s: t.restart.delay_s,
                mode: match t.restart.mode {
                    sdk::RestartMode::Fail => wit::RestartMode::Fail,
                    sdk::RestartMode::Delay => wit::RestartMode::Delay,
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_survives_the_round_trip() {
        let mut task = crate::task::parse_toml(
            "name = \"web\"\nimage_source = \"file:///x.iso\"\n\
             checksum = \"sha512:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"\n\
             accelerator = \"kvm\"\nkvm_fallback = false\nready_serial = \"login:\"\n\
             drive_interface = \"virtio\"\ngraceful_shutdown = false\nargs = [\"-nographic\"]\n\
             [[ports]]\nhost = 5353\nguest = 53\nprotocol = \"udp\"\nhost_ip = \"0.0.0.0\"\n\
             [[ports]]\nhost = 2222\nguest = 22\ncheck = \"banner\"\n\
             [restart]\nmode = \"delay\"\nattempts = 7\n",
        )
        .unwrap()
        .into_task()
        .unwrap();
        task.ports[1].http_path = "/health".into();
        let back = sdk::Task::from(wit::Task::from(task.clone()));
        assert_eq!(back, task);
    }

    #[test]
    fn facts_keep_the_kvm_reason() {
        let facts = sdk::HostFacts {
            qemu_found: false,
            qemu_version: None,
            accelerators: vec![],
            kvm: sdk::KvmStatus::Unusable("no vmx".into()),
            host_cpus: 3,
            host_memory_mb: 1 << 40,
        };
        let wit_facts = wit::HostFacts::from(&facts);
        assert!(matches!(&wit_facts.kvm, wit::KvmStatus::Unusable(r) if r == "no vmx"));
        assert_eq!(wit_facts.host_memory_mb, 1 << 40);
    }
}
