//! Loading a kernel and an initramfs, and writing what the kernel reads at entry:
//! the PVH start info (ELF `vmlinux` with a PVH note) or the Linux zero page
//! (bzImage, or an ELF without the note, entered in 64-bit mode).

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader, load_cmdline};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, PVH_INFO_START,
    PVH_MEMMAP_START, ZERO_PAGE_START,
};
use super::regs::EntryMode;

const E820_RAM: u32 = 1;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Highest address an initramfs may end at when the kernel does not say.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 4096;
/// Offset of the 64-bit entry point in a loaded bzImage.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors loading the kernel and boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}")]
    KernelOpen {
        /// The path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither a loadable ELF nor a bzImage.
    #[error("{path} is not a loadable kernel (ELF: {elf}; bzImage: {bzimage})")]
    KernelFormat {
        /// The path given.
        path: PathBuf,
        /// Why the ELF loader refused it.
        elf: linux_loader::loader::Error,
        /// Why the bzImage loader refused it.
        bzimage: linux_loader::loader::Error,
    },
    /// The initramfs could not be opened or read.
    #[error("cannot read initramfs {path}")]
    InitramfsRead {
        /// The path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the top of low memory.
    #[error("initramfs of {size} bytes does not fit in guest memory below {limit:#x}")]
    InitramfsTooLarge {
        /// Its size.
        size: u64,
        /// The highest usable address.
        limit: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line into guest memory failed.
    #[error("cannot write the kernel command line")]
    CmdlineWrite(#[source] linux_loader::loader::Error),
    /// Writing boot structures into guest memory failed.
    #[error("cannot write boot data at {addr:#x}")]
    Write {
        /// Where.
        addr: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// A kernel loaded into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The first instruction to run.
    pub entry: GuestAddress,
    /// How to enter it.
    pub mode: EntryMode,
    /// The bzImage setup header, for the zero page.
    pub setup_header: Option<setup_header>,
    /// First byte after the loaded image.
    pub end: GuestAddress,
}

/// An initramfs loaded into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedInitramfs {
    /// Where it starts.
    pub addr: GuestAddress,
    /// Its length.
    pub size: u64,
}

/// Loads `path` (ELF vmlinux or bzImage) into `mem` at 1 MiB or above.
pub fn load_kernel<M: GuestMemoryBackend>(mem: &M, path: &Path) -> Result<LoadedKernel, BootError> {
    let open = || {
        File::open(path).map_err(|source| BootError::KernelOpen {
            path: path.into(),
            source,
        })
    };
    let mut file = open()?;
    let himem = Some(GuestAddress(HIMEM_START));
    let elf = match Elf::load(mem, None, &mut file, himem) {
        Ok(r) => {
            let end = GuestAddress(r.kernel_end);
            return Ok(match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => LoadedKernel {
                    entry,
                    mode: EntryMode::Pvh,
                    setup_header: None,
                    end,
                },
                _ => LoadedKernel {
                    entry: r.kernel_load,
                    mode: EntryMode::Linux64,
                    setup_header: None,
                    end,
                },
            });
        }
        Err(e) => e,
    };
    let mut file = open()?;
    match BzImage::load(mem, None, &mut file, himem) {
        Ok(r) => Ok(LoadedKernel {
            entry: r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
            mode: EntryMode::Linux64,
            setup_header: r.setup_header,
            end: GuestAddress(r.kernel_end),
        }),
        Err(bzimage) => Err(BootError::KernelFormat {
            path: path.into(),
            elf,
            bzimage,
        }),
    }
}

/// The top of RAM below the MMIO gap.
fn low_ram_end<M: GuestMemoryBackend>(mem: &M) -> u64 {
    let first = mem.iter().next().expect("guest memory has a region");
    (first.start_addr().raw_value() + first.len()).min(MMIO_GAP_START)
}

/// Loads the initramfs as high in low memory as the kernel allows, page aligned.
pub fn load_initramfs<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<LoadedInitramfs, BootError> {
    let read_err = |source| BootError::InitramfsRead {
        path: path.into(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let limit = low_ram_end(mem).min(max + 1);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|a| *a >= kernel.end.raw_value())
        .ok_or(BootError::InitramfsTooLarge { size, limit })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| read_err(std::io::Error::other(e)))?;
    Ok(LoadedInitramfs {
        addr: GuestAddress(addr),
        size,
    })
}

/// The guest's RAM map, as `(start, length)` pairs.
fn ram_map<M: GuestMemoryBackend>(mem: &M) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push((start, end - start));
        }
    }
    map
}

/// Builds a command line from parts, each appended with a space.
pub fn build_cmdline(parts: &[&str]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    for part in parts.iter().filter(|p| !p.trim().is_empty()) {
        cmdline
            .insert_str(part.trim())
            .map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Writes the command line and the boot-protocol structures the kernel reads at entry.
pub fn write_boot_data<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initramfs: Option<LoadedInitramfs>,
) -> Result<(), BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::CmdlineWrite)?;
    let cmdline_size = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes_with_nul()
        .len();
    let write = |addr: u64, f: &dyn Fn() -> Result<(), vm_memory::GuestMemoryError>| {
        f().map_err(|source| BootError::Write { addr, source })
    };
    match kernel.mode {
        EntryMode::Pvh => {
            let mut info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC,
                version: 1,
                cmdline_paddr: CMDLINE_START,
                memmap_paddr: PVH_MEMMAP_START,
                ..Default::default()
            };
            let memmap: Vec<hvm_memmap_table_entry> = ram_map(mem)
                .into_iter()
                .map(|(addr, size)| hvm_memmap_table_entry {
                    addr,
                    size,
                    type_: E820_RAM,
                    reserved: 0,
                })
                .collect();
            info.memmap_entries = memmap.len() as u32;
            if let Some(initrd) = initramfs {
                let modlist = PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64;
                let module = hvm_modlist_entry {
                    paddr: initrd.addr.raw_value(),
                    size: initrd.size,
                    ..Default::default()
                };
                write(modlist, &|| mem.write_obj(module, GuestAddress(modlist)))?;
                info.nr_modules = 1;
                info.modlist_paddr = modlist;
            }
            for (i, entry) in memmap.iter().enumerate() {
                let addr =
                    PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
                write(addr, &|| mem.write_obj(*entry, GuestAddress(addr)))?;
            }
            write(PVH_INFO_START, &|| {
                mem.write_obj(info, GuestAddress(PVH_INFO_START))
            })?;
        }
        EntryMode::Linux64 => {
            let mut params = boot_params::default();
            if let Some(hdr) = kernel.setup_header {
                params.hdr = hdr;
            }
            params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.cmd_line_ptr = CMDLINE_START as u32;
            params.hdr.cmdline_size = cmdline_size as u32;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            if let Some(initrd) = initramfs {
                params.hdr.ramdisk_image = initrd.addr.raw_value() as u32;
                params.hdr.ramdisk_size = initrd.size as u32;
            }
            let map = ram_map(mem);
            for (i, (addr, size)) in map.iter().enumerate() {
                params.e820_table[i].addr = *addr;
                params.e820_table[i].size = *size;
                params.e820_table[i].r#type = E820_RAM;
            }
            params.e820_entries = map.len() as u8;
            write(ZERO_PAGE_START, &|| {
                mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::GuestMemoryMmap;
    use std::io::Write;

    fn mem(mib: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("zygote-boot-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    #[test]
    fn missing_kernel_is_named() {
        let err = load_kernel(&mem(16), Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(err, BootError::KernelOpen { .. }));
        assert!(err.to_string().contains("/nonexistent/vmlinux"));
    }

    #[test]
    fn garbage_kernel_is_refused_by_both_loaders() {
        let path = temp_file("garbage", &[0x42; 8192]);
        let err = load_kernel(&mem(16), &path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, BootError::KernelFormat { .. }), "{err}");
    }

    #[test]
    fn initramfs_goes_high_and_page_aligned() {
        let m = mem(16);
        let path = temp_file("initrd", &[7u8; 5000]);
        let kernel = LoadedKernel {
            entry: GuestAddress(HIMEM_START),
            mode: EntryMode::Pvh,
            setup_header: None,
            end: GuestAddress(2 << 20),
        };
        let initrd = load_initramfs(&m, &path, &kernel).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(initrd.addr.raw_value() % PAGE_SIZE, 0);
        assert!(initrd.addr.raw_value() + initrd.size <= 16 << 20);
        assert_eq!(m.read_obj::<u8>(initrd.addr).unwrap(), 7);

        let cmdline = build_cmdline(&["console=ttyS0", "", "quiet"]).unwrap();
        write_boot_data(&m, &kernel, &cmdline, Some(initrd)).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(
            (info.magic, info.nr_modules, info.memmap_entries),
            (XEN_HVM_START_MAGIC, 1, 2)
        );
        let mut text = [0u8; 20];
        m.read_slice(&mut text, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&text, b"console=ttyS0 quiet\0");
    }

    #[test]
    fn initramfs_larger_than_memory_is_refused() {
        let m = mem(16);
        let path = temp_file("bigrd", &vec![0u8; 15 << 20]);
        let kernel = LoadedKernel {
            entry: GuestAddress(HIMEM_START),
            mode: EntryMode::Pvh,
            setup_header: None,
            end: GuestAddress(4 << 20),
        };
        let err = load_initramfs(&m, &path, &kernel).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, BootError::InitramfsTooLarge { .. }));
    }
}
