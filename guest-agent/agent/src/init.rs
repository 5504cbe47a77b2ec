//! What PID 1 does before serving: mount the pseudo-filesystems.

use std::ffi::CString;

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).expect("no NUL in mount arguments");
    let (source, target_c, fstype, data) = (c(source), c(target), c(fstype), c(data));
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            eprintln!("zygote-agent: mount {target}: {e}");
        }
    }
}

/// Mounts /proc, /sys, the cgroup2 hierarchy (and the workload cgroup), /dev, /tmp and /run.
pub fn setup() {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", nosuid_nodev_noexec, "");
    mount("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, "");
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
    // Terminals for containers run with `-t` (/dev/ptmx finds this instance).
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    );
    mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
    mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nosuid_nodev_noexec,
        "",
    );
    crate::workload::setup_cgroup();
    if let Err(e) = crate::net::loopback_up() {
        eprintln!("zygote-agent: {e}");
    }
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    );
    // Where the agent mounts for a pod after a fork (the VM's shared file
    // system; a memory emptyDir's tmpfs in the pod's directory): mount
    // points of their own, shared, so that those mounts reach the
    // namespaces of containers made before (a template's staged
    // container; each container's tree is a slave of the agent's, as
    // runc's default makes it).
    let pod_dir = format!(
        "{}/{}",
        crate::container::registry::STATE_DIR,
        crate::container::registry::POD_DIR
    );
    for dir in [zygote_agent_api::volumes::SHARE_MOUNT, pod_dir.as_str()] {
        mount(dir, dir, "", libc::MS_BIND, "");
        mount("", dir, "", libc::MS_SHARED, "");
    }
}

/// Syncs and stops the guest: a restart, which with the kernel's
/// `reboot=k` pulses the i8042 reset line, a device write the VMM acts on
/// (a console line saying "Power down" is text any guest program may print,
/// so the VMM stops a VM on the device, never on its console).
pub fn power_off() -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    // SAFETY: reboot with a valid command; as PID 1 with CAP_SYS_BOOT this does not return.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    // Not PID 1 or not permitted: nothing else to do.
    std::process::exit(1)
}
