//! A container process's capabilities (`process.capabilities`), applied as
//! runc does: the bounding set reduced while still root, the permitted set
//! kept across the uid change, then effective, permitted and inheritable
//! set, then the ambient ones raised, just before the exec.

use serde::{Deserialize, Serialize};

/// Capability names and numbers (linux/capability.h).
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The five sets, as bit masks (bit N: capability N).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Bounding set.
    pub bounding: u64,
    /// Effective set.
    pub effective: u64,
    /// Inheritable set.
    pub inheritable: u64,
    /// Permitted set.
    pub permitted: u64,
    /// Ambient set.
    pub ambient: u64,
}

/// The mask of capability names (a name this table lacks is left out: the
/// guest kernel would not know it either).
pub fn mask<'a>(names: impl IntoIterator<Item = &'a str>) -> u64 {
    names
        .into_iter()
        .filter_map(|n| NAMES.iter().position(|k| *k == n))
        .fold(0, |m, bit| m | 1 << bit)
}

fn check(rc: libc::c_long, what: &str) -> Result<(), String> {
    if rc < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// While still root, before the uid changes: the bounding set reduced, and
/// the permitted set kept across the change.
pub fn before_setuid(c: &Capabilities) -> Result<(), String> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    for cap in 0..=last.min(63) {
        if c.bounding & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            check(
                rc.into(),
                &format!("drop {} from the bounding set", name(cap)),
            )?;
        }
    }
    // SAFETY: prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    check(rc.into(), "keep capabilities across setuid")
}

fn name(cap: u32) -> &'static str {
    NAMES
        .get(cap as usize)
        .copied()
        .unwrap_or("an unnamed capability")
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// After the uid change: the effective, permitted and inheritable sets,
/// then the ambient capabilities raised.
pub fn after_setuid(c: &Capabilities) -> Result<(), String> {
    const VERSION_3: u32 = 0x2008_0522;
    let header = CapHeader {
        version: VERSION_3,
        pid: 0,
    };
    let half = |m: u64, hi: bool| (if hi { m >> 32 } else { m & 0xffff_ffff }) as u32;
    let data: [CapData; 2] = [false, true].map(|hi| CapData {
        effective: half(c.effective, hi),
        permitted: half(c.permitted, hi),
        inheritable: half(c.inheritable, hi),
    });
    // SAFETY: capset with a version-3 header and two data structs.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    check(rc, "set the capabilities")?;
    for cap in 0..64u32 {
        if c.ambient & (1 << cap) != 0 {
            // SAFETY: prctl with integer arguments.
            let rc = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    cap as libc::c_ulong,
                    0,
                    0,
                )
            };
            check(rc.into(), &format!("raise ambient {}", name(cap)))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_make_masks() {
        assert_eq!(mask(["CAP_CHOWN", "CAP_NET_BIND_SERVICE"]), 1 | 1 << 10);
        assert_eq!(mask(["CAP_CHECKPOINT_RESTORE"]), 1 << 40);
        assert_eq!(mask(["CAP_NOT_A_THING"]), 0);
        assert_eq!(name(21), "CAP_SYS_ADMIN");
    }
}
