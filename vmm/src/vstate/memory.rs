//! Guest memory: RAM backed by a file descriptor from the start.
//!
//! The RAM is one memfd, mapped `MAP_SHARED` into the VMM and registered with KVM
//! region by region. Because the backing is a file, a snapshot can write it out
//! without copying it through the VMM's heap, and a fork can map a template's
//! memory file `MAP_PRIVATE` with the same layout.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// The guest memory type used throughout the VMM.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// The smallest guest the VMM accepts, in MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// The largest guest the VMM accepts, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Errors of guest memory set-up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is outside what the VMM supports.
    #[error("guest memory of {mib} MiB is out of range ({MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} MiB)")]
    InvalidSize {
        /// The requested size.
        mib: u64,
    },
    /// `memfd_create` failed.
    #[error("cannot create the guest memory file")]
    Memfd(#[source] std::io::Error),
    /// Sizing the memory file failed (the host may be out of memory).
    #[error("cannot size the guest memory file to {bytes} bytes")]
    Truncate {
        /// The requested size.
        bytes: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Mapping the memory failed.
    #[error("cannot map guest memory")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
    /// Pre-faulting the mapping failed.
    #[error("cannot pre-fault guest memory")]
    Prefault(#[source] std::io::Error),
    /// A memory file is shorter than the guest RAM it must back (mapping it would
    /// end in SIGBUS when the guest touches the missing part).
    #[error("memory file holds {found} bytes, the guest needs {needed}")]
    FileTooShort {
        /// Bytes needed.
        needed: u64,
        /// Bytes in the file.
        found: u64,
    },
    /// The memory file could not be examined.
    #[error("cannot examine the memory file")]
    Stat(#[source] std::io::Error),
}

/// Guest RAM regions `(guest address, length, offset in the memory file)` for a
/// guest of `size` bytes: one region below the MMIO gap, the rest above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size, 0)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START, 0),
            (
                GuestAddress(MMIO_GAP_END),
                size - MMIO_GAP_START,
                MMIO_GAP_START,
            ),
        ]
    }
}

/// Guest RAM together with the file that backs it.
#[derive(Debug)]
pub struct GuestRam {
    /// The mapping the VMM and its devices use.
    pub memory: GuestMemoryMmap,
    /// The backing file (a memfd).
    pub file: File,
    /// Total size in bytes.
    pub size: u64,
    /// Mapped `MAP_PRIVATE` from a template: the guest's writes are its own
    /// copies and `file` does not hold them.
    pub private: bool,
}

impl GuestRam {
    /// Creates `mib` MiB of guest RAM backed by a fresh memfd.
    ///
    /// With `prefault`, every page is allocated and mapped now (`MADV_POPULATE_WRITE`)
    /// instead of on the guest's first touch.
    pub fn new(mib: u64, prefault: bool) -> Result<Self, MemoryError> {
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
            return Err(MemoryError::InvalidSize { mib });
        }
        let size = mib << 20;
        // SAFETY: the name is a valid NUL-terminated string; the return value is checked.
        let fd = unsafe { libc::memfd_create(c"zygote-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(|source| MemoryError::Truncate {
            bytes: size,
            source,
        })?;
        let ranges = ram_regions(size)
            .into_iter()
            .map(|(addr, len, offset)| {
                let fd = file.try_clone().map_err(MemoryError::Memfd)?;
                Ok((addr, len as usize, Some(FileOffset::new(fd, offset))))
            })
            .collect::<Result<Vec<_>, MemoryError>>()?;
        let memory = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Mmap)?;
        let ram = GuestRam {
            memory,
            file,
            size,
            private: false,
        };
        if prefault {
            ram.prefault()?;
        }
        Ok(ram)
    }

    /// Maps a template's memory file copy-on-write (`MAP_PRIVATE`) as `size` bytes
    /// of guest RAM. The file's length is checked first: every region must be
    /// backed. Nothing is read: pages come from the page cache when touched.
    pub fn map_private(file: &File, size: u64) -> Result<Self, MemoryError> {
        if !(MIN_MEMORY_MIB << 20..=MAX_MEMORY_MIB << 20).contains(&size) {
            return Err(MemoryError::InvalidSize { mib: size >> 20 });
        }
        let found = file.metadata().map_err(MemoryError::Stat)?.len();
        if found < size {
            return Err(MemoryError::FileTooShort {
                needed: size,
                found,
            });
        }
        let regions = ram_regions(size)
            .into_iter()
            .map(|(addr, len, offset)| {
                let fd = file.try_clone().map_err(MemoryError::Memfd)?;
                let mapping = vm_memory::MmapRegion::build(
                    Some(FileOffset::new(fd, offset)),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                )
                .map_err(|e| MemoryError::Mmap(vm_memory::mmap::FromRangesError::MmapRegion(e)))?;
                Ok(vm_memory::GuestRegionMmap::new(mapping, addr)
                    .expect("regions of ram_regions do not overflow"))
            })
            .collect::<Result<Vec<_>, MemoryError>>()?;
        let memory = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::Mmap(vm_memory::mmap::FromRangesError::Collection(e)))?;
        Ok(GuestRam {
            memory,
            file: file.try_clone().map_err(MemoryError::Memfd)?,
            size,
            private: true,
        })
    }

    /// The parts of the memory file that hold data, as `(offset, len)`: the guest
    /// never touched the holes between them, which read as zeros. A private
    /// mapping's writes are not in the file, so all of it counts as data.
    pub fn data_ranges(&self) -> Result<Vec<(u64, u64)>, MemoryError> {
        if self.private {
            return Ok(vec![(0, self.size)]);
        }
        file_data_ranges(&self.file, self.size).map_err(MemoryError::Stat)
    }

    /// Allocates and maps every page of guest RAM in the VMM's page tables.
    pub fn prefault(&self) -> Result<(), MemoryError> {
        for region in self.memory.iter() {
            let host = self
                .memory
                .get_host_address(region.start_addr())
                .map_err(|e| MemoryError::Prefault(std::io::Error::other(e)))?;
            // SAFETY: `host` and `len` describe exactly one live mapping owned by
            // `self.memory`; MADV_POPULATE_WRITE only faults pages in.
            let rc = unsafe {
                libc::madvise(
                    host.cast(),
                    region.len() as usize,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if rc != 0 {
                return Err(MemoryError::Prefault(std::io::Error::last_os_error()));
            }
        }
        Ok(())
    }

    /// The end of the last RAM region (exclusive).
    pub fn end(&self) -> GuestAddress {
        self.memory.last_addr().unchecked_add(1)
    }

    /// The raw fd of the backing file.
    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

/// The data (non-hole) ranges of the first `len` bytes of `file`, from
/// `SEEK_DATA`/`SEEK_HOLE`; a file system without them reports all of it as data.
pub fn file_data_ranges(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence: i32| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on an fd we own; it only moves the file offset.
        let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(r as u64))
    };
    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < len {
        let Some(start) = seek(pos, libc::SEEK_DATA)? else {
            break;
        };
        if start >= len {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        ranges.push((start, end - start));
        pos = end;
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(
            ram_regions(128 << 20),
            vec![(GuestAddress(0), 128 << 20, 0)]
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let r = ram_regions(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
        assert_eq!(r[1].2, MMIO_GAP_START);
    }

    #[test]
    fn sizes_out_of_range_are_refused() {
        assert!(matches!(
            GuestRam::new(1, false),
            Err(MemoryError::InvalidSize { mib: 1 })
        ));
        assert!(matches!(
            GuestRam::new(MAX_MEMORY_MIB + 1, false),
            Err(MemoryError::InvalidSize { .. })
        ));
    }

    #[test]
    fn ram_is_backed_by_its_file() {
        let ram = GuestRam::new(16, true).unwrap();
        ram.memory
            .write_obj(0xfeed_u32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        ram.file.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xfeed);
        assert_eq!(ram.end(), GuestAddress(16 << 20));
    }
}
