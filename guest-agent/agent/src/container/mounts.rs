//! The container's mounts, made by its init before `pivot_root`: the root
//! bound on itself and a slave of the agent's tree, the spec's mounts in
//! order (each target resolved inside the root, `super::resolve`), the
//! minimal device nodes of a fresh `/dev`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use super::init::{check, cstr};
use super::resolve::{Make, fd_path, open_in_root, open_root};
use super::spec::MountSpec;

/// mount(2); an empty `fstype` or `data` is passed as none.
pub(super) fn mount_raw(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> std::io::Result<()> {
    let (s, t, f, d) = (cstr(source), cstr(target), cstr(fstype), cstr(data));
    // SAFETY: valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            if fstype.is_empty() {
                std::ptr::null()
            } else {
                f.as_ptr()
            },
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                d.as_ptr().cast()
            },
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub(super) fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    mount_raw(source, target, fstype, flags, data).map_err(|e| {
        // A bind is named by its source, another mount by its type.
        let what = if fstype.is_empty() { source } else { fstype };
        format!("mount {what} on {}: {e}", target.display())
    })
}

/// Splits OCI mount options into mount flags and file-system data.
fn mount_flags(options: &[String]) -> (libc::c_ulong, String) {
    let mut flags = 0;
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= libc::MS_RDONLY,
            "rw" => {}
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "relatime" => flags |= libc::MS_RELATIME,
            "strictatime" => flags |= libc::MS_STRICTATIME,
            "bind" => flags |= libc::MS_BIND,
            "rbind" => flags |= libc::MS_BIND | libc::MS_REC,
            "private" | "rprivate" | "slave" | "rslave" | "shared" | "rshared" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

fn mount_one(root: &OwnedFd, m: &MountSpec) -> Result<(), String> {
    let (flags, data) = mount_flags(&m.options);
    let bind = m.fstype == "bind" || flags & libc::MS_BIND != 0;
    let make = if bind && Path::new(&m.source).is_file() {
        Make::File
    } else {
        Make::Dir
    };
    // The destination resolved inside the root; the mount made on it by fd.
    let at = open_in_root(root, &m.destination, make)?;
    let target = fd_path(&at);
    let named = |r: Result<(), String>| r.map_err(|e| format!("{e} ({})", m.destination.display()));
    if bind {
        named(mount(&m.source, &target, "", flags | libc::MS_BIND, ""))?;
        if flags & libc::MS_RDONLY != 0 {
            let at = open_in_root(root, &m.destination, Make::Nothing)?;
            named(mount(
                "",
                &fd_path(&at),
                "",
                flags | libc::MS_BIND | libc::MS_REMOUNT,
                "",
            ))?;
        }
        Ok(())
    } else {
        let fstype = m.fstype.as_str();
        let source = if m.source.is_empty() {
            fstype
        } else {
            m.source.as_str()
        };
        named(mount(source, &target, fstype, flags, &data))
    }
}

/// Minimal devices when the spec mounts a tmpfs on /dev (as OCI specs do):
/// the standard character devices made with mknod, as runc makes them
/// (no mount each to make, and to tear down when the container ends);
/// where mknod is refused, bind mounts of the guest's own nodes.
fn populate_dev(root: &OwnedFd) -> Result<(), String> {
    let dev = open_in_root(root, Path::new("/dev"), Make::Nothing)?;
    let dev_fd = dev.as_raw_fd();
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let name_c = cstr(name);
        // SAFETY: a directory fd and a valid name; mknodat creates nothing else.
        let made = unsafe {
            libc::mknodat(
                dev_fd,
                name_c.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            )
        } == 0;
        if made {
            // The umask took bits off: the mode runc gives them.
            // SAFETY: a directory fd and the name of the node just made.
            unsafe { libc::fchmodat(dev_fd, name_c.as_ptr(), 0o666, 0) };
        } else if let Ok(node) = open_in_root(root, &Path::new("/dev").join(name), Make::File) {
            mount(
                &format!("/dev/{name}"),
                &fd_path(&node),
                "",
                libc::MS_BIND,
                "",
            )?;
        }
    }
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let (link, to) = (cstr(link), cstr(to));
        // SAFETY: valid strings and a directory fd; makes one link in it.
        unsafe { libc::symlinkat(to.as_ptr(), dev_fd, link.as_ptr()) };
    }
    Ok(())
}

/// Makes the mount tree a slave of the agent's (runc's default: nothing
/// made in the container reaches the agent; the VM's shared file system,
/// mounted by the agent after a fork, reaches a container staged before)
/// and binds the container's root on itself (a mount point, as
/// `pivot_root` needs).
pub(super) fn prepare_root(root: &Path) -> Result<(), String> {
    mount("", Path::new("/"), "", libc::MS_REC | libc::MS_SLAVE, "")?;
    mount(
        &root.to_string_lossy(),
        root,
        "",
        libc::MS_BIND | libc::MS_REC,
        "",
    )
}

/// Makes `mounts` in order below `root`; then, with `populate`, the
/// minimal device nodes in its /dev.
pub(super) fn make_mounts(root: &Path, mounts: &[MountSpec], populate: bool) -> Result<(), String> {
    let root = open_root(root)?;
    for m in mounts {
        mount_one(&root, m)?;
    }
    if populate {
        populate_dev(&root)?;
    }
    Ok(())
}

/// Whether `mounts` put a file system on /dev (whose nodes the init makes).
pub(super) fn mounts_dev(mounts: &[MountSpec]) -> bool {
    mounts.iter().any(|m| m.destination == Path::new("/dev"))
}

/// Detaches the mount at `destination` below `root` (and all below it).
pub(super) fn unmount(root: &Path, destination: &Path) -> Result<(), String> {
    let at = open_in_root(&open_root(root)?, destination, Make::Nothing)?;
    let target = cstr(fd_path(&at));
    // SAFETY: a valid path string.
    let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    check(rc, &format!("unmount {}", destination.display()))
}
