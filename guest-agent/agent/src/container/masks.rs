//! The spec's `linux.readonlyPaths` and `linux.maskedPaths`, applied as runc
//! applies them, inside the container's root once it is `/`: a read-only
//! path is bound onto itself and remounted read-only (keeping the flags of
//! the mount it is on); a masked directory gets an empty read-only tmpfs, a
//! masked file `/dev/null` bound over it. A path that does not exist is
//! skipped.

use std::path::Path;

use super::mounts::mount_raw;

fn skippable(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

/// The flags of the mount `path` is on that a read-only remount must keep
/// (`nosuid`, `nodev`, `noexec`).
fn kept_flags(path: &Path) -> libc::c_ulong {
    let c = super::init::cstr(path);
    // SAFETY: statvfs is plain data; all zeros is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid path string and a statvfs we own.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    flags
}

/// Makes `path` (and what is mounted below it) read-only.
pub fn readonly(path: &Path) -> Result<(), String> {
    let p = path.to_string_lossy();
    match mount_raw(&p, path, "", libc::MS_BIND | libc::MS_REC, "") {
        Ok(()) => {}
        Err(e) if skippable(&e) => return Ok(()),
        Err(e) => return Err(format!("read-only path {p}: {e}")),
    }
    let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | kept_flags(path);
    mount_raw(&p, path, "", flags, "").map_err(|e| format!("read-only path {p}: {e}"))
}

/// Hides `path`: an empty read-only tmpfs on a directory, `/dev/null` on
/// anything else.
pub fn mask(path: &Path) -> Result<(), String> {
    let p = path.to_string_lossy();
    let done = match std::fs::metadata(path) {
        Err(e) if skippable(&e) => return Ok(()),
        Err(e) => return Err(format!("masked path {p}: {e}")),
        Ok(m) if m.is_dir() => mount_raw("tmpfs", path, "tmpfs", libc::MS_RDONLY, ""),
        Ok(_) => mount_raw("/dev/null", path, "", libc::MS_BIND, ""),
    };
    match done {
        Err(e) if !skippable(&e) => Err(format!("masked path {p}: {e}")),
        _ => Ok(()),
    }
}
