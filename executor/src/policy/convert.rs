//! Conversions between the types `bindgen!` generates for the WIT contract
//! and the SDK's wire types, which the rest of the executor uses: the same
//! macro writes the guest side's, so the contract is mapped in one place.

policy_sdk::__wire_conversions!(super::host::wit);

#[cfg(test)]
mod tests {
    use super::super::host::wit;
    use policy_sdk as sdk;

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
