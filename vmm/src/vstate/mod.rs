//! KVM state: the system handle, the VM, its vCPUs, and guest memory.

pub mod kvm;
pub mod kvm_stats;
pub mod memory;
pub mod persist;
pub mod vcpu;
pub mod vm;
