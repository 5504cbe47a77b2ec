//! KVM's per-vCPU binary statistics (`KVM_GET_STATS_FD`): how long a vCPU
//! waited halted inside `KVM_RUN` (`halt_wait_ns`), so that guest-side work
//! can be told from a guest that is idle, waiting for the host.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;

/// `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae_ce;
/// `struct kvm_stats_header`: flags, name_size, num_desc, id_offset, desc_offset, data_offset.
const HEADER_LEN: usize = 24;
/// `struct kvm_stats_desc` without its name: flags, exponent, size, offset, bucket_size.
const DESC_LEN: usize = 16;

/// One vCPU's statistics file, and where `halt_wait_ns` is in it (found on
/// first use: opening is one ioctl on the fork path, parsing is not).
#[derive(Debug)]
pub struct VcpuKvmStats {
    file: File,
    halt_wait_at: std::sync::OnceLock<Option<u64>>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl VcpuKvmStats {
    /// Opens the statistics of the vCPU `vcpu_fd`; None if this KVM has no
    /// binary statistics.
    pub fn open(vcpu_fd: RawFd) -> Option<Self> {
        // SAFETY: an ioctl without argument on a vCPU fd; it returns a new fd or -1.
        let fd = unsafe { libc::ioctl(vcpu_fd, KVM_GET_STATS_FD as _) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just returned by KVM and is owned by nothing else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Some(VcpuKvmStats {
            file,
            halt_wait_at: std::sync::OnceLock::new(),
        })
    }

    /// Where `halt_wait_ns` is in the file, from its header and descriptors.
    fn find_halt_wait(file: &File) -> Option<u64> {
        let mut header = [0u8; HEADER_LEN];
        file.read_exact_at(&mut header, 0).ok()?;
        let (name_size, num_desc) = (u32_at(&header, 4) as usize, u32_at(&header, 8) as usize);
        let (desc_offset, data_offset) = (u32_at(&header, 16) as u64, u32_at(&header, 20) as u64);
        if name_size == 0 || name_size > 1024 || num_desc > 4096 {
            return None;
        }
        let desc_len = DESC_LEN + name_size;
        let mut descs = vec![0u8; desc_len * num_desc];
        file.read_exact_at(&mut descs, desc_offset).ok()?;
        descs.chunks_exact(desc_len).find_map(|d| {
            let name = &d[DESC_LEN..];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            (name == b"halt_wait_ns").then(|| data_offset + u64::from(u32_at(d, 8)))
        })
    }

    /// Nanoseconds the vCPU has waited halted so far (0 where KVM does not
    /// count them).
    pub fn halt_wait_ns(&self) -> u64 {
        let Some(at) = *self
            .halt_wait_at
            .get_or_init(|| Self::find_halt_wait(&self.file))
        else {
            return 0;
        };
        let mut v = [0u8; 8];
        match self.file.read_exact_at(&mut v, at) {
            Ok(()) => u64::from_ne_bytes(v),
            Err(_) => 0,
        }
    }

    /// The file's descriptor (for tests).
    pub fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
