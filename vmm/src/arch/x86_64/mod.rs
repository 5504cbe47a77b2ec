//! x86-64 specifics: memory layout, boot protocols, CPUID, MSRs, MP table, registers.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
