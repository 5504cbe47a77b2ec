//! The guest's memory size. A template boots with the node's largest memory
//! mapped but only `mem=` of it in use (the rest is RAM the kernel does not
//! know yet, so the template never touches it); a pod's VM hot-adds the
//! blocks its pod asks for (`/sys/devices/system/memory/probe`) and brings
//! them online, so `MemTotal` inside says the pod's size. Blocks never
//! touched stay copy-on-write holes of the template: they cost the host
//! nothing until the pod uses them.

use std::path::Path;

/// Why memory could not be added.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The kernel has no memory hotplug (or no probe interface).
    #[error("this guest kernel cannot add memory ({0})")]
    Unsupported(String),
    /// The kernel refused.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
}

fn hex(text: &str) -> Option<u64> {
    u64::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// Adds and onlines memory blocks under `sys` (`/sys/devices/system/memory`)
/// until the kernel has at least `want` bytes (rounded up to a block), never
/// past `ram_end` (the end of the VM's RAM). Returns how many bytes it added.
pub fn grow_to(sys: &Path, want: u64, ram_end: u64) -> Result<u64, MemoryError> {
    let block = std::fs::read_to_string(sys.join("block_size_bytes"))
        .ok()
        .and_then(|t| hex(&t))
        .filter(|b| *b > 0)
        .ok_or_else(|| MemoryError::Unsupported("no memory block size".into()))?;
    // The blocks the kernel has: memoryN for block N.
    let present = std::fs::read_dir(sys)
        .map_err(|e| MemoryError::Unsupported(e.to_string()))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("memory")?
                .parse::<u64>()
                .ok()
        })
        .max()
        .map_or(0, |n| n + 1);
    let mut added = 0;
    for addr in plan(block, present, want, ram_end) {
        let probe = sys.join("probe");
        std::fs::write(&probe, format!("0x{addr:x}")).map_err(|source| MemoryError::Os {
            what: format!("add memory at 0x{addr:x}"),
            source,
        })?;
        let state = sys.join(format!("memory{}/state", addr / block));
        std::fs::write(&state, "online").map_err(|source| MemoryError::Os {
            what: format!("online {}", state.display()),
            source,
        })?;
        added += block;
    }
    Ok(added)
}

/// The addresses of the blocks to add: after the `present` ones, until
/// `want` bytes (rounded up to a block) or `ram_end`, whichever is less.
fn plan(block: u64, present: u64, want: u64, ram_end: u64) -> Vec<u64> {
    let end = want.div_ceil(block).saturating_mul(block).min(ram_end);
    let mut addrs = Vec::new();
    let mut next = present * block;
    while next + block <= end {
        addrs.push(next);
        next += block;
    }
    addrs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_added_after_the_present_ones_up_to_the_size_asked() {
        let (mib, block) = (|m: u64| m << 20, 128 << 20);
        // 200 MiB asked of a 512 MiB VM that uses 128: one more block.
        assert_eq!(plan(block, 1, mib(200), mib(512)), [mib(128)]);
        assert_eq!(
            plan(block, 1, mib(512), mib(512)),
            [mib(128), mib(256), mib(384)]
        );
        // Never past the VM's RAM; nothing when it has enough.
        assert_eq!(plan(block, 1, mib(1024), mib(256)), [mib(128)]);
        assert!(plan(block, 2, mib(64), mib(512)).is_empty());
        assert!(plan(block, 2, mib(256), mib(512)).is_empty());
    }

    #[test]
    fn a_kernel_without_hotplug_is_said_so() {
        let sys = std::env::temp_dir().join(format!("zygote-mem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&sys);
        std::fs::create_dir_all(&sys).unwrap();
        assert!(matches!(
            grow_to(&sys, 1 << 30, 1 << 30),
            Err(MemoryError::Unsupported(_))
        ));
        std::fs::remove_dir_all(&sys).unwrap();
    }
}
