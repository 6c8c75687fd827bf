//! Conversions between the SDK's wire types and the types a WIT binding
//! generator makes of `wit/policy.wit`.
//!
//! The host (wasmtime's `bindgen!`) and the guest (wit-bindgen's
//! `generate!`) each generate their own copy of the contract's types, with
//! the same names and fields. One macro writes the conversions for both, so
//! the contract is mapped in exactly one place. The conversions are
//! exhaustive (no `..`): a field added to one side only does not compile.

/// Writes `From` conversions both ways for `Task` and `HostFacts` between
/// [`crate::types`] and the generated `types` module at the given path.
#[doc(hidden)]
#[macro_export]
macro_rules! __wire_conversions {
    ($($wit:tt)+) => {
        const _: () = {
            use $($wit)+ as wit;
            use $crate::types as sdk;

            $crate::__wire_enum!(sdk::Accelerator, wit::Accelerator: Kvm, Tcg);
            $crate::__wire_enum!(sdk::Protocol, wit::Protocol: Tcp, Udp);
            $crate::__wire_enum!(sdk::ReadyCheck, wit::ReadyCheck: Http, Banner, None);
            $crate::__wire_enum!(sdk::ChecksumAlgorithm, wit::ChecksumAlgorithm: Md5, Sha256, Sha512);
            $crate::__wire_enum!(sdk::RestartMode, wit::RestartMode: Fail, Delay);
            $crate::__wire_enum!(sdk::DriveInterface, wit::DriveInterface: Ide, Virtio);

            $crate::__wire_record!(sdk::PortMapping, wit::PortMapping:
                host, guest, protocol.into(), host_ip, check.into(), http_path);
            $crate::__wire_record!(sdk::Checksum, wit::Checksum: algorithm.into(), digest);
            $crate::__wire_record!(sdk::RestartPolicy, wit::RestartPolicy:
                attempts, interval_s, delay_s, mode.into());

            impl From<sdk::Task> for wit::Task {
                fn from(t: sdk::Task) -> Self {
                    $crate::__wire_task!(t, wit::Task)
                }
            }

            impl From<wit::Task> for sdk::Task {
                fn from(t: wit::Task) -> Self {
                    $crate::__wire_task!(t, sdk::Task)
                }
            }

            impl From<sdk::KvmStatus> for wit::KvmStatus {
                fn from(k: sdk::KvmStatus) -> Self {
                    match k {
                        sdk::KvmStatus::Usable => wit::KvmStatus::Usable,
                        sdk::KvmStatus::Absent => wit::KvmStatus::Absent,
                        sdk::KvmStatus::Unusable(reason) => wit::KvmStatus::Unusable(reason),
                    }
                }
            }

            impl From<wit::KvmStatus> for sdk::KvmStatus {
                fn from(k: wit::KvmStatus) -> Self {
                    match k {
                        wit::KvmStatus::Usable => sdk::KvmStatus::Usable,
                        wit::KvmStatus::Absent => sdk::KvmStatus::Absent,
                        wit::KvmStatus::Unusable(reason) => sdk::KvmStatus::Unusable(reason),
                    }
                }
            }

            $crate::__wire_record!(sdk::HostFacts, wit::HostFacts:
                qemu_found, qemu_version, accelerators, kvm.into(), host_cpus, host_memory_mb);

            impl From<&sdk::HostFacts> for wit::HostFacts {
                fn from(f: &sdk::HostFacts) -> Self {
                    f.clone().into()
                }
            }
        };
    };
}

/// The task record, field by field, into the type `$to`.
#[doc(hidden)]
#[macro_export]
macro_rules! __wire_task {
    ($t:ident, $($to:tt)+) => {
        $($to)+ {
            name: $t.name,
            image_source: $t.image_source,
            checksum: $t.checksum.into(),
            accelerator: $t.accelerator.into(),
            kvm_fallback: $t.kvm_fallback,
            ports: $t.ports.into_iter().map(Into::into).collect(),
            memory_mb: $t.memory_mb,
            cpus: $t.cpus,
            kill_timeout_s: $t.kill_timeout_s,
            ready_timeout_s: $t.ready_timeout_s,
            ready_serial: $t.ready_serial,
            machine_type: $t.machine_type,
            drive_interface: $t.drive_interface.into(),
            graceful_shutdown: $t.graceful_shutdown,
            args: $t.args,
            restart: $t.restart.into(),
        }
    };
}

/// A C-like enum with the same variants on both sides.
#[doc(hidden)]
#[macro_export]
macro_rules! __wire_enum {
    ($a:ident :: $an:ident, $b:ident :: $bn:ident: $($v:ident),+) => {
        impl From<$a::$an> for $b::$bn {
            fn from(v: $a::$an) -> Self {
                match v { $($a::$an::$v => $b::$bn::$v,)+ }
            }
        }
        impl From<$b::$bn> for $a::$an {
            fn from(v: $b::$bn) -> Self {
                match v { $($b::$bn::$v => $a::$an::$v,)+ }
            }
        }
    };
}

/// A record with the same fields on both sides; `field.into()` marks the
/// fields that need converting themselves.
#[doc(hidden)]
#[macro_export]
macro_rules! __wire_record {
    ($a:ident :: $an:ident, $b:ident :: $bn:ident: $($f:ident $(. $into:ident ())?),+) => {
        impl From<$a::$an> for $b::$bn {
            fn from(r: $a::$an) -> Self {
                $b::$bn { $($f: r.$f $(. $into())?,)+ }
            }
        }
        impl From<$b::$bn> for $a::$an {
            fn from(r: $b::$bn) -> Self {
                $a::$an { $($f: r.$f $(. $into())?,)+ }
            }
        }
    };
}
