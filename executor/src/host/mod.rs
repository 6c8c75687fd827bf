//! This host, as every front end sees it: what it offers (`probe`: qemu,
//! its accelerators, cpus and memory; `kvm`: whether KVM answers; `verdict`:
//! whether KVM has failed a real guest), how VMs are confined on it
//! (`isolation`: cgroups, an unprivileged user, chroot, mount namespace),
//! and what a VM uses of it (`usage`).

pub mod isolation;
pub mod kvm;
pub mod probe;
pub mod usage;
pub mod verdict;
