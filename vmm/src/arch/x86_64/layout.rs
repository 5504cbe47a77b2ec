//! Guest physical memory layout (x86-64).
//!
//! ```text
//! 0x0000_0500  boot GDT                 0x0000_9000  page tables (64-bit boot)
//! 0x0000_6000  PVH hvm_start_info       0x0002_0000  kernel command line
//! 0x0000_7000  zero page / PVH memmap   0x0009_fc00  MP table (end of base RAM)
//! 0x0010_0000  kernel (HIMEM_START)     ...          initramfs at the top of low RAM
//! 0xd000_0000  virtio-mmio devices, 4 KiB each (in the 3..4 GiB MMIO gap)
//! 0xfec0_0000  IOAPIC                   0xfee0_0000  LAPIC
//! ```

/// Start of the boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) boot IDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// Linux zero page (`boot_params`) or, for PVH, the memory map table.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// PVH memory map table (follows the start info page).
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Identity-mapped page tables for the 64-bit Linux boot protocol.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum length of the kernel command line, including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Boot stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// End of the base (conventional) RAM; the EBDA and MP table sit just below it.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the MP table is written.
pub const MPTABLE_START: u64 = EBDA_START;
/// Kernels are loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap: guest RAM above this address continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of each virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC base address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC base address.
pub const APIC_START: u64 = 0xfee0_0000;
/// First interrupt line given to virtio devices (0-4 are the PIT, keyboard, cascade, COM2, COM1).
pub const IRQ_BASE: u32 = 5;
/// Last usable IOAPIC pin.
pub const IRQ_MAX: u32 = 23;
/// The serial console's interrupt line.
pub const SERIAL_IRQ: u32 = 4;
/// Address of the TSS KVM needs on Intel (3 pages just below the IOAPIC gap end).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
