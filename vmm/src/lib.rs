//! zygote-vmm: the KVM virtual machine monitor of zygote.
//!
//! A library with a typed Rust API; it knows nothing of containerd. Built on the
//! rust-vmm crates (kvm-ioctls, vm-memory, linux-loader, vm-superio, virtio-queue).
//!
//! - [`vstate`]: the KVM handle and its kind (hardware or PVM), guest memory
//!   (memfd-backed from the start), the VM and its vCPUs.
//! - [`arch`]: x86-64 layout, boot protocols (PVH and Linux 64-bit), CPUID, MSRs,
//!   MP table.
//! - [`devices`]: the port/MMIO buses, the 8250 console and i8042 reset line,
//!   virtio-mmio with the rng and vsock devices.
//! - [`builder`]: [`Machine::boot`] puts it together; [`exit`] says why a VM stopped.
//! - [`jail`]: the seccomp allowlists vCPU and device threads run under.

pub mod arch;
pub mod builder;
pub mod devices;
pub mod exit;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod jail;
pub mod persist;
pub mod snapshot;
pub mod vstate;

pub use builder::{BuildError, GuestTimes, Machine, VmConfig};
pub use exit::ExitReason;
pub use vstate::kvm::KvmKind;
