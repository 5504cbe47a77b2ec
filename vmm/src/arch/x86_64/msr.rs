//! Model-specific registers set at boot.

use kvm_bindings::{Msrs, kvm_msr_entry};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// The boot values: the syscall MSRs cleared (the kernel sets them), the TSC at
/// zero, fast strings on. Only MSRs that `supported` lists are set: PVM and
/// hardware KVM report different lists, and a write of an unknown MSR fails.
pub fn boot_msrs(supported: &[u32]) -> Msrs {
    let wanted = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ];
    let entries: Vec<kvm_msr_entry> = wanted
        .iter()
        .filter(|(index, _)| supported.contains(index))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).expect("fewer MSRs than the FAM limit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_supported_msrs_are_set() {
        let msrs = boot_msrs(&[MSR_LSTAR, MSR_IA32_MISC_ENABLE, 0x1234]);
        let set: Vec<_> = msrs.as_slice().iter().map(|e| (e.index, e.data)).collect();
        assert_eq!(
            set,
            vec![
                (MSR_LSTAR, 0),
                (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING)
            ]
        );
    }
}
