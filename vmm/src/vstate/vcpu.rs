//! vCPUs: configuration at boot and the run loop.
//!
//! Each vCPU runs on its own thread. Port and MMIO exits are dispatched to the
//! buses on that thread; everything that ends the VM is reported to the
//! [`ExitSignal`]. To stop a vCPU the machine sets its stop flag and sends the
//! thread [`vcpu_kick_signal`], which makes `KVM_RUN` return `EINTR`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::register_signal_handler;

use super::kvm::KvmHandle;
use super::memory::GuestMemoryMmap;
use super::vm::Vm;
use crate::arch::x86_64::boot::LoadedKernel;
use crate::arch::x86_64::{cpuid, msr, regs};
use crate::devices::bus::Bus;
use crate::exit::{ExitReason, ExitSignal};

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl on the vCPU failed.
    #[error("KVM {op} on vCPU {index} failed")]
    Kvm {
        /// Which operation.
        op: &'static str,
        /// The vCPU.
        index: u8,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Boot tables could not be written.
    #[error("cannot set up vCPU {index}'s boot registers")]
    Regs {
        /// The vCPU.
        index: u8,
        /// Cause.
        #[source]
        source: regs::RegsError,
    },
}

/// The real-time signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn vcpu_kick_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

/// Installs the (empty) handler for [`vcpu_kick_signal`]; idempotent.
pub fn install_kick_handler() -> std::io::Result<()> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(vcpu_kick_signal(), on_kick).map_err(|e| e.errno()))
        .map_err(std::io::Error::from_raw_os_error)
}

/// Counters a vCPU thread keeps for the machine's timeline.
#[derive(Debug, Default)]
pub struct VcpuStats {
    /// Nanoseconds spent inside `KVM_RUN` (guest-side work).
    pub run_ns: AtomicU64,
    /// Number of exits to userspace.
    pub exits: AtomicU64,
}

/// One vCPU.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
}

impl Vcpu {
    /// Creates vCPU `index` of `vm`.
    pub fn new(vm: &Vm, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Kvm { op: "KVM_CREATE_VCPU", index, source })?;
        Ok(Vcpu { fd, index })
    }

    fn kvm_err(&self, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError + '_ {
        move |source| VcpuError::Kvm { op, index: self.index, source }
    }

    /// Sets CPUID, MSRs and the local APIC; the boot vCPU also gets the entry registers.
    pub fn configure(
        &self,
        kvm: &KvmHandle,
        mem: &GuestMemoryMmap,
        kernel: &LoadedKernel,
        count: u8,
    ) -> Result<(), VcpuError> {
        let mut cpuid = kvm
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(self.kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        cpuid::configure(&mut cpuid, self.index, count);
        self.fd.set_cpuid2(&cpuid).map_err(self.kvm_err("KVM_SET_CPUID2"))?;

        let supported = kvm.kvm.get_msr_index_list().map_err(self.kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let msrs = msr::boot_msrs(supported.as_slice());
        let set = self.fd.set_msrs(&msrs).map_err(self.kvm_err("KVM_SET_MSRS"))?;
        if set != msrs.as_slice().len() {
            let index = msrs.as_slice()[set].index;
            tracing::warn!(vcpu = self.index, msr = format_args!("{index:#x}"), "KVM refused a boot MSR");
        }

        let mut lapic = self.fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?;
        regs::configure_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(self.kvm_err("KVM_SET_LAPIC"))?;

        self.fd.set_fpu(&regs::boot_fpu()).map_err(self.kvm_err("KVM_SET_FPU"))?;
        if self.index == 0 {
            let mut sregs = self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?;
            regs::setup_sregs(mem, kernel.mode, &mut sregs)
                .map_err(|source| VcpuError::Regs { index: self.index, source })?;
            self.fd.set_sregs(&sregs).map_err(self.kvm_err("KVM_SET_SREGS"))?;
            let r = regs::boot_regs(kernel.mode, kernel.entry.0);
            self.fd.set_regs(&r).map_err(self.kvm_err("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    /// Runs the vCPU until the VM stops. Returns when `stop` is set (after a kick)
    /// or when this vCPU raised an exit.
    pub fn run(mut self, pio: Bus, mmio: Bus, exit: ExitSignal, stop: Arc<AtomicBool>, stats: Arc<VcpuStats>) {
        let index = self.index;
        while !stop.load(Ordering::Acquire) {
            let entered = Instant::now();
            let result = self.fd.run();
            stats.run_ns.fetch_add(entered.elapsed().as_nanos() as u64, Ordering::Relaxed);
            stats.exits.fetch_add(1, Ordering::Relaxed);
            let reason = match result {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    None
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    pio.write(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !mmio.read(addr, data) {
                        data.fill(0);
                    }
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    mmio.write(addr, data);
                    None
                }
                Ok(VcpuExit::Hlt) => Some(ExitReason::PowerOff),
                Ok(VcpuExit::Shutdown) => Some(ExitReason::TripleFault),
                Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                    _ => ExitReason::PowerOff,
                }),
                Ok(VcpuExit::InternalError) => {
                    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member is the one KVM filled.
                    let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    Some(ExitReason::InternalError { suberror, vcpu: index, rip })
                }
                Ok(VcpuExit::FailEntry(reason, _cpu)) => Some(ExitReason::FailEntry { reason, vcpu: index }),
                Ok(other) => Some(ExitReason::UnhandledExit { vcpu: index, exit: format!("{other:?}") }),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(ExitReason::RunFailed { vcpu: index, errno: e.errno() }),
            };
            if let Some(reason) = reason {
                tracing::debug!(vcpu = index, ?reason, "vCPU stops the VM");
                exit.raise(reason);
                return;
            }
        }
    }
}
