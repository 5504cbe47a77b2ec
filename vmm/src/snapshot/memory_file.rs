//! The memory file: guest RAM as a sparse file, and its checksum.
//!
//! Written in 1 MiB chunks read through the guest mapping (never all of RAM in
//! the heap); pages the guest never touched stay holes, and all-zero chunks are
//! not written either. The CRC-32 covers the whole file, holes included (as
//! zeros), so [`verify_memory`] can check a template without trusting its holes.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::{GuestRam, MemoryError, file_data_ranges, ram_regions};

const CHUNK: u64 = 1 << 20;

/// Errors writing or checking a memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// The file could not be written or read.
    #[error("cannot {op} memory file {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The guest memory could not be read.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The file does not match the checksum recorded when it was written.
    #[error("memory file {path} is corrupt: checksum {found:#010x}, expected {expected:#010x}")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Recorded.
        expected: u32,
        /// Computed.
        found: u32,
    },
    /// The file is shorter than the guest RAM.
    #[error("memory file {path} holds {found} bytes, the guest has {expected}")]
    Length {
        /// The file.
        path: PathBuf,
        /// Guest RAM size.
        expected: u64,
        /// File length.
        found: u64,
    },
}

/// What was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFileInfo {
    /// Length of the file (= guest RAM).
    pub size: u64,
    /// CRC-32 of the whole file.
    pub crc32: u32,
    /// Bytes actually written (the rest are holes).
    pub data_bytes: u64,
}

/// Extends `hasher` by `len` zero bytes without hashing them one by one.
struct Zeros {
    mib: crc32fast::Hasher,
}

impl Zeros {
    fn new() -> Self {
        let mut mib = crc32fast::Hasher::new();
        mib.update(&vec![0u8; CHUNK as usize]);
        Zeros { mib }
    }

    fn extend(&self, hasher: &mut crc32fast::Hasher, mut len: u64) {
        while len >= CHUNK {
            hasher.combine(&self.mib);
            len -= CHUNK;
        }
        if len > 0 {
            hasher.update(&vec![0u8; len as usize]);
        }
    }
}

/// The guest address of byte `offset` of the memory file.
fn offset_to_gpa(size: u64, offset: u64) -> GuestAddress {
    ram_regions(size)
        .into_iter()
        .find(|&(_, len, start)| (start..start + len).contains(&offset))
        .map(|(addr, _, start)| GuestAddress(addr.0 + (offset - start)))
        .expect("offset inside guest RAM")
}

/// Writes guest RAM to a new file at `path`, sparse, and flushes it to disk.
/// On error the partial file is removed.
pub fn write_memory(ram: &GuestRam, path: &Path) -> Result<MemoryFileInfo, MemoryFileError> {
    let io = |op| {
        move |source| MemoryFileError::Io {
            op,
            path: path.into(),
            source,
        }
    };
    let file = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io("create"))?;
    let result = (|| {
        file.set_len(ram.size).map_err(io("size"))?;
        let zeros = Zeros::new();
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = vec![0u8; CHUNK as usize];
        let mut pos = 0;
        let mut data_bytes = 0;
        for (start, len) in ram.data_ranges()? {
            zeros.extend(&mut hasher, start - pos);
            let end = start + len;
            let mut off = start;
            while off < end {
                // Chunks never cross a region boundary: both are MiB-aligned.
                let n = (end - off).min(CHUNK - off % CHUNK) as usize;
                let chunk = &mut buf[..n];
                ram.memory
                    .read_slice(chunk, offset_to_gpa(ram.size, off))
                    .map_err(|e| io("read guest RAM for")(std::io::Error::other(e)))?;
                hasher.update(chunk);
                if chunk.iter().any(|&b| b != 0) {
                    file.write_all_at(chunk, off).map_err(io("write"))?;
                    data_bytes += n as u64;
                }
                off += n as u64;
            }
            pos = end;
        }
        zeros.extend(&mut hasher, ram.size - pos);
        file.sync_all().map_err(io("flush"))?;
        Ok(MemoryFileInfo {
            size: ram.size,
            crc32: hasher.finalize(),
            data_bytes,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Reads the whole memory file and compares it with the recorded checksum.
pub fn verify_memory(path: &Path, size: u64, expected: u32) -> Result<(), MemoryFileError> {
    let io = |op| {
        move |source| MemoryFileError::Io {
            op,
            path: path.into(),
            source,
        }
    };
    let file = File::open(path).map_err(io("open"))?;
    let found_len = file.metadata().map_err(io("examine"))?.len();
    if found_len < size {
        return Err(MemoryFileError::Length {
            path: path.into(),
            expected: size,
            found: found_len,
        });
    }
    let zeros = Zeros::new();
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    for (start, len) in file_data_ranges(&file, size).map_err(io("examine"))? {
        zeros.extend(&mut hasher, start - pos);
        let mut off = start;
        while off < start + len {
            let n = (start + len - off).min(CHUNK) as usize;
            file.read_exact_at(&mut buf[..n], off).map_err(io("read"))?;
            hasher.update(&buf[..n]);
            off += n as u64;
        }
        pos = start + len;
    }
    zeros.extend(&mut hasher, size - pos);
    let found = hasher.finalize();
    if found != expected {
        return Err(MemoryFileError::Checksum {
            path: path.into(),
            expected,
            found,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_write_checksum_and_private_mapping() {
        let dir = std::env::temp_dir().join(format!("zygote-memfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ram = GuestRam::new(16, false).unwrap();
        ram.memory
            .write_obj(0x1234_u64, GuestAddress(0x3000))
            .unwrap();
        ram.memory
            .write_obj(0x5678_u64, GuestAddress(0xa0_0000))
            .unwrap();
        let path = dir.join("memory");
        let info = write_memory(&ram, &path).unwrap();
        assert_eq!(info.size, 16 << 20);
        assert!(info.data_bytes <= 2 << 20, "holes stay holes: {info:?}");
        let on_disk = std::fs::metadata(&path).unwrap();
        assert_eq!(on_disk.len(), 16 << 20);
        // The checksum is the plain CRC-32 of the whole file.
        let whole = std::fs::read(&path).unwrap();
        assert_eq!(crc32fast::hash(&whole), info.crc32);
        verify_memory(&path, info.size, info.crc32).unwrap();
        assert!(matches!(
            verify_memory(&path, info.size, info.crc32 ^ 1),
            Err(MemoryFileError::Checksum { .. })
        ));
        assert!(matches!(
            write_memory(&ram, &path),
            Err(MemoryFileError::Io { op: "create", .. })
        ));

        // A fork sees the template's bytes, and its writes stay its own.
        let file = File::open(&path).unwrap();
        let fork = GuestRam::map_private(&file, info.size).unwrap();
        assert_eq!(
            fork.memory.read_obj::<u64>(GuestAddress(0x3000)).unwrap(),
            0x1234
        );
        fork.memory
            .write_obj(0x9999_u64, GuestAddress(0x3000))
            .unwrap();
        let other = GuestRam::map_private(&file, info.size).unwrap();
        assert_eq!(
            other.memory.read_obj::<u64>(GuestAddress(0x3000)).unwrap(),
            0x1234
        );
        verify_memory(&path, info.size, info.crc32).unwrap();
        // A fork's own pages are what a snapshot of the fork writes.
        let again = write_memory(&fork, &dir.join("fork-memory")).unwrap();
        assert_ne!(again.crc32, info.crc32);

        // A short file is refused before mapping.
        let short = dir.join("short");
        std::fs::copy(&path, &short).unwrap();
        File::options()
            .write(true)
            .open(&short)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        assert!(matches!(
            GuestRam::map_private(&File::open(&short).unwrap(), info.size),
            Err(MemoryError::FileTooShort { .. })
        ));
        assert!(matches!(
            verify_memory(&short, info.size, info.crc32),
            Err(MemoryFileError::Length { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
