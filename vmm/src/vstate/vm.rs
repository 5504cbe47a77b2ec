//! The KVM VM: its memory slots, in-kernel interrupt controllers and PIT, irqfds.

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::kvm::KvmHandle;
use super::memory::GuestMemoryMmap;
use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl on the VM failed.
    #[error("KVM {op} failed")]
    Kvm {
        /// Which operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// A VM with interrupt controllers and memory set up.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
}

impl Vm {
    /// Creates the VM and registers `mem` with it.
    pub fn new(kvm_handle: &KvmHandle, mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        let fd = kvm_handle.kvm.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .expect("region start is in memory");
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the caller
            // keeps alive for as long as the VM (the machine owns both).
            unsafe { fd.set_user_memory_region(region) }
                .map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(Vm { fd })
    }

    /// Makes writes to `evt` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(kvm("KVM_IRQFD"))
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}
