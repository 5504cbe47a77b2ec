//! What the shim gives up before it serves: `no_new_privs`, and the
//! capabilities none of its work needs, from every set and the bounding
//! set, before any thread exists (capabilities are per thread); and the
//! seccomp mode its VMM's vCPU and device threads take
//! (`zygote_vmm::jail`).
//!
//! Kept: what running VMs, their devices and pods takes — file ownership
//! and access (virtio-fs acts for the guest's ids), network and namespace
//! administration (taps, the pod's netns), cgroups and limits, signals,
//! memory locking, reading other processes' namespaces.

/// Capabilities the shim never uses (numbers as in `linux/capability.h`).
pub const DROPPED: &[(u32, &str)] = &[
    (9, "CAP_LINUX_IMMUTABLE"),
    (11, "CAP_NET_BROADCAST"),
    (15, "CAP_IPC_OWNER"),
    (16, "CAP_SYS_MODULE"),
    (17, "CAP_SYS_RAWIO"),
    (20, "CAP_SYS_PACCT"),
    (22, "CAP_SYS_BOOT"),
    (25, "CAP_SYS_TIME"),
    (26, "CAP_SYS_TTY_CONFIG"),
    (27, "CAP_MKNOD"),
    (28, "CAP_LEASE"),
    (30, "CAP_AUDIT_CONTROL"),
    (32, "CAP_MAC_OVERRIDE"),
    (33, "CAP_MAC_ADMIN"),
    (34, "CAP_SYSLOG"),
    (35, "CAP_WAKE_ALARM"),
    (36, "CAP_BLOCK_SUSPEND"),
    (37, "CAP_AUDIT_READ"),
    (38, "CAP_PERFMON"),
    (39, "CAP_BPF"),
    (40, "CAP_CHECKPOINT_RESTORE"),
];

const CAP_SETPCAP: u32 = 8;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const VERSION_3: u32 = 0x2008_0522;

/// Gives up what [`DROPPED`] names (and, last, CAP_SETPCAP) and sets
/// `no_new_privs`; call before any thread is started. Capabilities the
/// process does not have are not an error (a shim run without them).
pub fn restrict() -> std::io::Result<()> {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    let drops = DROPPED
        .iter()
        .map(|&(n, _)| n)
        .chain([CAP_SETPCAP])
        .filter(|&n| n <= last);
    let mut header = CapHeader {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: a v3 header and two data structs, as capget expects.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    for cap in drops {
        // SAFETY: prctl with integer arguments; EINVAL for a capability
        // this kernel does not know, EPERM without CAP_SETPCAP: both leave
        // the bounding set as it was.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        let (word, bit) = ((cap / 32) as usize, 1u32 << (cap % 32));
        data[word].effective &= !bit;
        data[word].permitted &= !bit;
        data[word].inheritable &= !bit;
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    // SAFETY: the header and data read above, with bits only taken away.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_field(name: &str) -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix(name)).unwrap();
        u64::from_str_radix(line.trim(), 16).unwrap()
    }

    #[test]
    fn restricting_takes_the_listed_capabilities_from_every_set() {
        // On a thread of its own (capabilities and no_new_privs are per thread).
        std::thread::spawn(|| {
            let before = status_field("CapBnd:");
            restrict().unwrap();
            let (bnd, eff, prm) = (
                status_field("CapBnd:"),
                status_field("CapEff:"),
                status_field("CapPrm:"),
            );
            for &(cap, name) in DROPPED {
                assert_eq!(bnd & (1 << cap), 0, "{name} in the bounding set");
                assert_eq!(eff & (1 << cap), 0, "{name} effective");
                assert_eq!(prm & (1 << cap), 0, "{name} permitted");
            }
            if before & (1 << 21) != 0 {
                assert_ne!(bnd & (1 << 21), 0, "CAP_SYS_ADMIN kept");
            }
            assert_eq!(status_field("NoNewPrivs:"), 1);
        })
        .join()
        .unwrap();
    }
}
