//! What a container's bundle directory holds for zygote: its rootfs mount
//! point (mounted only while its image disk is built) and a file naming the
//! pod VM's run directory, so that `delete` after a killed shim can clean up.

use std::path::{Path, PathBuf};

/// A file in the bundle naming the pod VM's run directory.
pub const RUN_DIR_FILE: &str = "zygote-vm-run-dir";

/// Records the pod VM's run directory in `bundle`.
pub fn record_run_dir(bundle: &Path, run_dir: &Path) -> std::io::Result<()> {
    std::fs::write(
        bundle.join(RUN_DIR_FILE),
        run_dir.to_string_lossy().as_bytes(),
    )
}

/// The bundle's part of a container's removal: its rootfs unmounted, the
/// run directory record gone.
pub fn release(bundle: &Path) {
    unmount(&bundle.join("rootfs"));
    let _ = std::fs::remove_file(bundle.join(RUN_DIR_FILE));
}

/// After a shim died: unmounts the bundle's rootfs and removes the pod VM's
/// run directory that the dead shim recorded there (only under zygote's run
/// root). Returns the directory removed.
pub fn cleanup(bundle: &Path) -> Option<PathBuf> {
    unmount(&bundle.join("rootfs"));
    let recorded = std::fs::read_to_string(bundle.join(RUN_DIR_FILE)).ok();
    let _ = std::fs::remove_file(bundle.join(RUN_DIR_FILE));
    let dir = PathBuf::from(recorded?.trim());
    if !dir.starts_with(crate::paths::run_root()) || !dir.exists() {
        return None;
    }
    std::fs::remove_dir_all(&dir).ok()?;
    Some(dir)
}

/// Unmounts `target` (lazily; not mounted is not an error).
pub fn unmount(target: &Path) {
    if let Ok(c) = std::ffi::CString::new(target.to_string_lossy().as_bytes()) {
        // SAFETY: a valid path string; failure (not mounted) is ignored.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}
