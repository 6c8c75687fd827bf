//! A probe of `/dev/kvm` with the ioctls qemu itself relies on.
//!
//! The probe can prove KVM absent or broken, never that guests will run: on
//! some hosts every ioctl answers and real guests still fail. That verdict
//! comes from watching a guest (see `supervisor`) and is remembered in
//! [`super::verdict`].

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use policy_sdk::KvmStatus;

const KVM_API_VERSION: i32 = 12;

/// Capabilities qemu refuses to start without on x86 (its
/// `kvm_required_capabilites` plus the x86 arch list).
const REQUIRED_CAPS: [(u64, &str); 7] = [
    (3, "KVM_CAP_USER_MEMORY"),
    (4, "KVM_CAP_SET_TSS_ADDR"),
    (7, "KVM_CAP_EXT_CPUID"),
    (14, "KVM_CAP_MP_STATE"),
    (21, "KVM_CAP_DESTROY_MEMORY_REGION_WORKS"),
    (30, "KVM_CAP_JOIN_MEMORY_REGIONS_WORKS"),
    (36, "KVM_CAP_IOEVENTFD"),
];

mod ioctls {
    const KVMIO: u8 = 0xAE;
    nix::ioctl_none_bad!(
        kvm_get_api_version,
        nix::request_code_none!(super::ioctls::KVMIO, 0x00)
    );
    nix::ioctl_write_int_bad!(
        kvm_create_vm,
        nix::request_code_none!(super::ioctls::KVMIO, 0x01)
    );
    nix::ioctl_write_int_bad!(
        kvm_check_extension,
        nix::request_code_none!(super::ioctls::KVMIO, 0x03)
    );
}

/// Probes the KVM device at `path` (normally `/dev/kvm`).
pub fn probe(path: &Path) -> KvmStatus {
    let device = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return KvmStatus::Absent,
        Err(e) => {
            return KvmStatus::Unusable(format!("cannot open {}: {e}", path.display()));
        }
    };
    let fd = device.as_raw_fd();

    // SAFETY: `fd` is an open KVM device for the duration of the call and
    // KVM_GET_API_VERSION takes no argument.
    match unsafe { ioctls::kvm_get_api_version(fd) } {
        Ok(KVM_API_VERSION) => {}
        Ok(other) => {
            return KvmStatus::Unusable(format!(
                "KVM API version {other}, qemu needs {KVM_API_VERSION}"
            ));
        }
        Err(e) => return KvmStatus::Unusable(format!("KVM_GET_API_VERSION failed: {e}")),
    }

    for (cap, name) in REQUIRED_CAPS {
        // SAFETY: KVM_CHECK_EXTENSION takes the capability number by value
        // and only reads it; `fd` is open.
        match unsafe { ioctls::kvm_check_extension(fd, cap as i32) } {
            Ok(n) if n > 0 => {}
            Ok(_) => return KvmStatus::Unusable(format!("{name} is not supported")),
            Err(e) => return KvmStatus::Unusable(format!("KVM_CHECK_EXTENSION({name}): {e}")),
        }
    }

    // SAFETY: KVM_CREATE_VM takes the machine type by value (0: default)
    // and returns a new file descriptor or an error; `fd` is open.
    match unsafe { ioctls::kvm_create_vm(fd, 0) } {
        // SAFETY: on success the ioctl returned a fresh descriptor that
        // nothing else owns; wrapping it closes the VM when dropped.
        Ok(vm_fd) => drop(unsafe { OwnedFd::from_raw_fd(vm_fd) }),
        Err(e) => return KvmStatus::Unusable(format!("KVM_CREATE_VM failed: {e}")),
    }
    KvmStatus::Usable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_absent() {
        assert_eq!(probe(Path::new("/nonexistent/kvm")), KvmStatus::Absent);
    }

    #[test]
    fn a_file_that_is_not_kvm_is_unusable() {
        // /dev/null opens, but answers no KVM ioctl.
        match probe(Path::new("/dev/null")) {
            KvmStatus::Unusable(reason) => {
                assert!(reason.contains("KVM_GET_API_VERSION"), "{reason}")
            }
            other => panic!("expected unusable, got {other:?}"),
        }
    }
}
