//! The component side, compiled only for `wasm32`: wit-bindgen's bindings of
//! `wit/policy.wit` and the conversions between its types and the SDK's, so
//! that policies only ever see [`crate::types`]. Used by
//! [`crate::export_policy!`]; not an API of its own.

pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "policy",
        pub_export_macro: true,
        export_macro_name: "__export_policy_component",
        default_bindings_module: "policy_sdk::guest::bindings",
    });
}

pub use bindings::exports::qemu_executor::policy::evaluator::Guest;
pub use bindings::qemu_executor::policy::types as wit;

use crate::types as sdk;

pub fn metadata<P: crate::Policy>() -> wit::PolicyMetadata {
    let m = crate::metadata::<P>();
    wit::PolicyMetadata {
        name: m.name,
        version: m.version,
        rewrites: m.rewrites,
    }
}

pub fn evaluate<P: crate::Policy>(
    task: wit::Task,
    facts: wit::HostFacts,
    settings: &str,
) -> wit::Decision {
    let task = sdk::Task::from(task);
    let facts = sdk::HostFacts::from(facts);
    match crate::evaluate::<P>(&task, &facts, settings) {
        sdk::Decision::Accept => wit::Decision::Accept,
        sdk::Decision::Reject { reason } => wit::Decision::Reject(reason),
        sdk::Decision::Rewrite { task, reason } => wit::Decision::Rewrite(wit::Rewrite {
            task: (*task).into(),
            reason,
        }),
    }
}

impl From<wit::HostFacts> for sdk::HostFacts {
    fn from(f: wit::HostFacts) -> Self {
        sdk::HostFacts {
            qemu_found: f.qemu_found,
            qemu_version: f.qemu_version,
            accelerators: f.accelerators,
            kvm: match f.kvm {
                wit::KvmStatus::Usable => sdk::KvmStatus::Usable,
                wit::KvmStatus::Absent => sdk::KvmStatus::Absent,
                wit::KvmStatus::Unusable(reason) => sdk::KvmStatus::Unusable(reason),
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
