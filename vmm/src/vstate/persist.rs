//! Saved state of the VM (interrupt controllers, PIT, kvmclock) and of each vCPU.
//!
//! These are KVM ioctls that can fail on the way out as well as on the way in,
//! so they are fallible functions beside [`crate::persist::Persist`] rather than
//! implementations of it. The restore order follows what KVM needs: CPUID before
//! anything that depends on it, special registers (APIC base) before the LAPIC,
//! the LAPIC before the MSRs (the TSC deadline lives in the LAPIC), events last.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::Cap;
use serde::{Deserialize, Serialize};

use super::kvm::KvmHandle;
use super::vcpu::{Vcpu, VcpuError};
use super::vm::{Vm, VmError};

/// `MSR_KVM_WALL_CLOCK` and `MSR_KVM_WALL_CLOCK_NEW`.
const MSR_KVM_WALL_CLOCK: u32 = 0x11;
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;

/// Whether an MSR that KVM lists is left out of a snapshot.
///
/// Everything KVM lists is saved except:
/// - the kvmclock wall-clock MSRs: writing one makes KVM write the host's boot
///   wall time into guest memory at the address written; the guest reads it only
///   while booting, and after a fork the wall clock is the reconcile's job (the
///   restore must not scribble on the template's memory behind the guest's back).
fn msr_is_skipped(index: u32) -> bool {
    matches!(index, MSR_KVM_WALL_CLOCK | MSR_KVM_WALL_CLOCK_NEW)
}

/// The VM-wide state.
/// Compared in tests through their serialized bytes (KVM's structs have no `PartialEq`).
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The i8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock at the snapshot.
    pub clock: kvm_clock_data,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
}

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU index (its APIC id).
    pub index: u8,
    /// CPUID as configured at boot.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (`KVM_GET_XSAVE`: 4 KiB, enough because the VMM never
    /// grants the guest dynamically sized features such as AMX).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0), if KVM has them.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists, minus those [`msr_is_skipped`] leaves out.
    pub msrs: Vec<kvm_msr_entry>,
    /// Running, halted, waiting for SIPI.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// TSC frequency in kHz, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

fn vm_kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

fn irqchip(chip_id: u32) -> kvm_irqchip {
    kvm_irqchip {
        chip_id,
        ..Default::default()
    }
}

impl Vm {
    /// Saves the interrupt controllers, the PIT and kvmclock. The vCPUs must be stopped.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let fd = self.fd();
        let pit = fd.get_pit2().map_err(vm_kvm("KVM_GET_PIT2"))?;
        let clock = fd.get_clock().map_err(vm_kvm("KVM_GET_CLOCK"))?;
        let mut irqchips = Vec::with_capacity(3);
        for id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = irqchip(id);
            fd.get_irqchip(&mut chip)
                .map_err(vm_kvm("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        Ok(VmState {
            pit,
            clock,
            irqchips,
        })
    }

    /// Restores what [`Vm::save_state`] saved, before any vCPU runs.
    ///
    /// kvmclock is restored *frozen*: the guest's monotonic clock continues from
    /// the snapshot's value instead of jumping by the time the template was
    /// stored (no timer storm, no soft-lockup reports); the wall clock is stepped
    /// by the guest agent. That is why the flags KVM returned (e.g.
    /// `KVM_CLOCK_REALTIME`, which asks KVM to advance the clock by the real time
    /// elapsed) are not passed back.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let fd = self.fd();
        fd.set_pit2(&state.pit).map_err(vm_kvm("KVM_SET_PIT2"))?;
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        fd.set_clock(&clock).map_err(vm_kvm("KVM_SET_CLOCK"))?;
        for chip in &state.irqchips {
            fd.set_irqchip(chip).map_err(vm_kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

impl Vcpu {
    /// Saves the vCPU's state. The vCPU must not be running, and a port or MMIO
    /// exit it last took must have been completed (see [`Vcpu::complete_pending_io`]).
    pub fn save_state(&self, kvm: &KvmHandle) -> Result<VcpuState, VcpuError> {
        let fd = self.fd();
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(self.kvm_err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let regs = fd.get_regs().map_err(self.kvm_err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(self.kvm_err("KVM_GET_XSAVE"))?;
        let xcrs = if kvm.kvm.check_extension(Cap::Xcrs) {
            Some(fd.get_xcrs().map_err(self.kvm_err("KVM_GET_XCRS"))?)
        } else {
            None
        };
        let debug_regs = fd
            .get_debug_regs()
            .map_err(self.kvm_err("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?;
        let msrs = self.save_msrs(kvm)?;
        let mp_state = fd
            .get_mp_state()
            .map_err(self.kvm_err("KVM_GET_MP_STATE"))?;
        let events = fd
            .get_vcpu_events()
            .map_err(self.kvm_err("KVM_GET_VCPU_EVENTS"))?;
        let tsc_khz = if kvm.kvm.check_extension(Cap::GetTscKhz) {
            Some(fd.get_tsc_khz().map_err(self.kvm_err("KVM_GET_TSC_KHZ"))?)
        } else {
            None
        };
        Ok(VcpuState {
            index: self.index(),
            cpuid,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            mp_state,
            events,
            tsc_khz,
        })
    }

    /// Reads every listed MSR. One KVM refuses to read (e.g. a feature the vCPU
    /// does not have) is dropped with a debug line: it cannot be restored either.
    fn save_msrs(&self, kvm: &KvmHandle) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let list = kvm
            .kvm
            .get_msr_index_list()
            .map_err(self.kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let mut wanted: Vec<kvm_msr_entry> = list
            .as_slice()
            .iter()
            .filter(|&&index| !msr_is_skipped(index))
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut saved = Vec::with_capacity(wanted.len());
        while !wanted.is_empty() {
            let mut msrs = Msrs::from_entries(&wanted).expect("fewer MSRs than the FAM limit");
            let read = self
                .fd()
                .get_msrs(&mut msrs)
                .map_err(self.kvm_err("KVM_GET_MSRS"))?;
            saved.extend_from_slice(&msrs.as_slice()[..read]);
            if read < wanted.len() {
                tracing::debug!(
                    vcpu = self.index(),
                    msr = format_args!("{:#x}", wanted[read].index),
                    "KVM cannot read this MSR; not saved"
                );
                wanted.drain(..=read);
            } else {
                wanted.clear();
            }
        }
        Ok(saved)
    }

    /// Restores `state` into this freshly created vCPU. `kvmclock_ctrl` tells the
    /// guest it was paused (so its watchdogs do not report soft lockups); PVM and
    /// older KVMs may refuse it, which is logged and tolerated.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        let fd = self.fd();
        if let Some(khz) = state.tsc_khz {
            let current = fd.get_tsc_khz().map_err(self.kvm_err("KVM_GET_TSC_KHZ"))?;
            if current != khz {
                fd.set_tsc_khz(khz)
                    .map_err(self.kvm_err("KVM_SET_TSC_KHZ"))?;
            }
        }
        let cpuid = kvm_bindings::CpuId::from_entries(&state.cpuid)
            .map_err(|_| self.kvm_err("KVM_SET_CPUID2")(kvm_ioctls::Error::new(libc::E2BIG)))?;
        fd.set_cpuid2(&cpuid)
            .map_err(self.kvm_err("KVM_SET_CPUID2"))?;
        fd.set_mp_state(state.mp_state)
            .map_err(self.kvm_err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&state.regs)
            .map_err(self.kvm_err("KVM_SET_REGS"))?;
        fd.set_sregs(&state.sregs)
            .map_err(self.kvm_err("KVM_SET_SREGS"))?;
        // SAFETY: the buffer is a whole `kvm_xsave` as KVM_GET_XSAVE returned it; the
        // guest never gets permission for dynamically sized xsave features (AMX), so
        // the state KVM expects fits in it.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(self.kvm_err("KVM_SET_XSAVE"))?;
        if let Some(xcrs) = &state.xcrs {
            fd.set_xcrs(xcrs).map_err(self.kvm_err("KVM_SET_XCRS"))?;
        }
        fd.set_debug_regs(&state.debug_regs)
            .map_err(self.kvm_err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&state.lapic)
            .map_err(self.kvm_err("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&state.msrs)
            .map_err(|_| self.kvm_err("KVM_SET_MSRS")(kvm_ioctls::Error::new(libc::E2BIG)))?;
        let set = fd.set_msrs(&msrs).map_err(self.kvm_err("KVM_SET_MSRS"))?;
        if set != state.msrs.len() {
            return Err(VcpuError::MsrRefused {
                index: self.index(),
                msr: state.msrs[set].index,
            });
        }
        fd.set_vcpu_events(&state.events)
            .map_err(self.kvm_err("KVM_SET_VCPU_EVENTS"))?;
        if let Err(e) = fd.kvmclock_ctrl() {
            tracing::debug!(vcpu = self.index(), error = %e, "KVM_KVMCLOCK_CTRL refused");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::Bus;
    use crate::exit::ExitSignal;
    use crate::snapshot::memory_file::write_memory;
    use crate::vstate::memory::GuestRam;
    use crate::vstate::vcpu::stop_threads;
    use crate::vstate::vcpu::tests::tiny_vm;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};

    const COUNTER: u64 = 0x5000;

    /// Runs `vcpu` for a while on its own thread and gives it back stopped.
    fn run_for(vcpu: Vcpu, time: Duration) -> Vcpu {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let exit = ExitSignal::default();
        let e = exit.clone();
        let mut threads = vec![std::thread::spawn(move || {
            vcpu.run(Bus::default(), Bus::default(), e, s, Arc::default())
        })];
        std::thread::sleep(time);
        let mut vcpu = stop_threads(&mut threads, &stop).pop().unwrap();
        assert_eq!(exit.reason(), None, "the guest must still be running");
        vcpu.complete_pending_io().unwrap();
        vcpu
    }

    fn bytes<T: Serialize>(v: &T) -> Vec<u8> {
        postcard::to_stdvec(v).unwrap()
    }

    #[test]
    fn a_running_guest_continues_in_a_restored_vm_with_its_own_memory() {
        // loop: inc dword [COUNTER]; jmp loop
        let (kvm, ram, vm, vcpu) = tiny_vm(&[0xff, 0x05, 0x00, 0x50, 0x00, 0x00, 0xeb, 0xf8]);
        let vcpu = run_for(vcpu, Duration::from_millis(100));
        let at_snapshot: u32 = ram.memory.read_obj(GuestAddress(COUNTER)).unwrap();
        assert!(at_snapshot > 0, "the guest ran");

        // Save, serialize, decode.
        let vcpu_state = vcpu.save_state(&kvm).unwrap();
        let vm_state = vm.save_state().unwrap();
        assert!(!vcpu_state.msrs.is_empty());
        let vcpu_state: VcpuState = postcard::from_bytes(&bytes(&vcpu_state)).unwrap();
        let vm_state: VmState = postcard::from_bytes(&bytes(&vm_state)).unwrap();

        // Restore into a new VM over a copy-on-write mapping of the memory file.
        let dir = std::env::temp_dir().join(format!("zygote-vstate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let info = write_memory(&ram, &dir.join("memory")).unwrap();
        let file = std::fs::File::open(dir.join("memory")).unwrap();
        let fork_ram = GuestRam::map_private(&file, info.size).unwrap();
        let fork_vm = Vm::new(&kvm, &fork_ram.memory).unwrap();
        let fork = Vcpu::new(&fork_vm, 0).unwrap();
        fork_vm.restore_state(&vm_state).unwrap();
        fork.restore_state(&vcpu_state).unwrap();

        // What was restored reads back the same (the TSC moves on, the rest must not).
        let again = fork.save_state(&kvm).unwrap();
        assert_eq!(bytes(&again.regs), bytes(&vcpu_state.regs));
        assert_eq!(bytes(&again.sregs), bytes(&vcpu_state.sregs));
        assert_eq!(bytes(&again.xsave), bytes(&vcpu_state.xsave));
        assert_eq!(bytes(&again.debug_regs), bytes(&vcpu_state.debug_regs));
        assert_eq!(bytes(&again.mp_state), bytes(&vcpu_state.mp_state));
        assert_eq!(again.cpuid.len(), vcpu_state.cpuid.len());
        let indices = |s: &VcpuState| s.msrs.iter().map(|m| m.index).collect::<Vec<_>>();
        assert_eq!(indices(&again), indices(&vcpu_state));
        for (a, b) in again.msrs.iter().zip(&vcpu_state.msrs) {
            if a.index != 0x10 {
                assert_eq!(a.data, b.data, "MSR {:#x}", a.index);
            }
        }
        let vm_again = fork_vm.save_state().unwrap();
        assert_eq!(bytes(&vm_again.irqchips), bytes(&vm_state.irqchips));

        // The fork continues counting from the snapshot; the template does not move.
        let _fork = run_for(fork, Duration::from_millis(100));
        let in_fork: u32 = fork_ram.memory.read_obj(GuestAddress(COUNTER)).unwrap();
        assert!(in_fork > at_snapshot, "{in_fork} > {at_snapshot}");
        let in_template: u32 = ram.memory.read_obj(GuestAddress(COUNTER)).unwrap();
        assert_eq!(in_template, at_snapshot);
        crate::snapshot::memory_file::verify_memory(&dir.join("memory"), info.size, info.crc32)
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
