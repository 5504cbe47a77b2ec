//! KVM state: the system handle, the VM, its vCPUs, and guest memory.

pub mod kvm;
pub mod memory;
pub mod persist;
pub mod vcpu;
pub mod vm;
