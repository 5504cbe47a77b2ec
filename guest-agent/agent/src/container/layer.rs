//! A container's writable layer: its state directory as a tmpfs of its own
//! (the layer cannot fill the guest) and the overlay of the image under it.

use std::path::{Path, PathBuf};

use super::mounts::mount_raw as mount;
use super::registry::ContainerError;

fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerError {
    let what = what.into();
    move |source| ContainerError::Os { what, source }
}

/// Mounts the overlay of `lower` with its upper and work directories in
/// `dir`; returns the merged directory (`dir/rootfs`).
pub fn mount_overlay(lower: &Path, dir: &Path) -> Result<PathBuf, ContainerError> {
    let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).map_err(os(format!("create {}", d.display())))?;
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount("overlay", &merged, "overlay", 0, &data).map_err(os("mount overlay"))?;
    Ok(merged)
}

/// tmpfs's size option for a limit of `size_mib` (0: tmpfs's default, half
/// the RAM).
fn size_option(size_mib: u32) -> String {
    if size_mib == 0 {
        "size=50%".into()
    } else {
        format!("size={size_mib}m")
    }
}

/// The container's state directory as its own tmpfs, limited to `size_mib`
/// (0: tmpfs's default, half the RAM): the writable layer cannot fill the guest.
pub fn mount_state_tmpfs(dir: &Path, size_mib: u32) -> Result<(), ContainerError> {
    std::fs::create_dir_all(dir).map_err(os(format!("create {}", dir.display())))?;
    let data = format!("mode=0700,{}", size_option(size_mib));
    if let Err(e) = mount(
        "tmpfs",
        dir,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        &data,
    ) {
        let _ = std::fs::remove_dir(dir);
        return Err(os("mount the writable layer's tmpfs")(e));
    }
    Ok(())
}

/// Gives the state tmpfs at `dir` a new size limit.
pub fn resize_state_tmpfs(dir: &Path, size_mib: u32) -> Result<(), ContainerError> {
    mount(
        "tmpfs",
        dir,
        "tmpfs",
        libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV,
        &size_option(size_mib),
    )
    .map_err(os("resize the writable layer's tmpfs"))
}

/// Detaches the overlay and the tmpfs at `dir` and removes the directory.
pub fn unmount_and_remove(dir: &Path) {
    for target in [dir.join("rootfs"), dir.to_path_buf()] {
        if let Ok(c) = std::ffi::CString::new(target.to_string_lossy().as_bytes()) {
            // SAFETY: a valid path string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
