//! What a container's bundle directory holds for zygote: its rootfs mount
//! point (mounted only while its image disk is built) and a file naming the
//! pod VM's run directory and one naming the network namespace it is wired
//! into, so that `delete` after a killed shim can clean up.

use std::path::{Path, PathBuf};

/// A file in the bundle naming the pod VM's run directory.
pub const RUN_DIR_FILE: &str = "zygote-vm-run-dir";
/// A file in the bundle naming the network namespace the pod VM is wired into.
pub const NETNS_FILE: &str = "zygote-netns";
/// A file in the bundle of the container whose cgroup the shim joined (the
/// pod's sandbox, or a lone `ctr` container): the pod's containers, one id a
/// line, for OOM events after the host killed the VM.
pub const MEMBERS_FILE: &str = "zygote-pod-members";

/// Adds container `id` to the pod's members recorded in `owner` (the
/// bundle of the container whose cgroup holds the VM).
pub fn record_member(owner: &Path, id: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(owner.join(MEMBERS_FILE))?;
    writeln!(f, "{id}")
}

/// What `cleanup` found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// The pod VM's run directory, removed.
    pub run_dir: Option<PathBuf>,
    /// The pod's containers, when the host's OOM killer killed the VM in
    /// this bundle's cgroup: each gets a TaskOOM.
    pub oom_killed: Vec<String>,
}

/// Records the pod's network namespace in `bundle`.
pub fn record_netns(bundle: &Path, netns: &Path) -> std::io::Result<()> {
    std::fs::write(bundle.join(NETNS_FILE), netns.to_string_lossy().as_bytes())
}

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
    let _ = std::fs::remove_file(bundle.join(NETNS_FILE));
    let _ = std::fs::remove_file(bundle.join(MEMBERS_FILE));
}

/// After a shim died: unmounts the bundle's rootfs, removes the pod's
/// cgroup (if this bundle's is the one the shim joined; first noting
/// whether the host's OOM killer struck there) and the pod VM's run
/// directory that the dead shim recorded (only under zygote's run root).
pub fn cleanup(bundle: &Path) -> Cleaned {
    let mut cleaned = Cleaned::default();
    cleanup_into(bundle, &mut cleaned);
    cleaned
}

fn cleanup_into(bundle: &Path, cleaned: &mut Cleaned) -> Option<()> {
    unmount(&bundle.join("rootfs"));
    // The dead shim's tap went with its fds; its filters are undone here.
    if let Ok(netns) = std::fs::read_to_string(bundle.join(NETNS_FILE)) {
        let netns = PathBuf::from(netns.trim());
        if !crate::net::is_own_namespace(&netns) {
            if let Err(e) = crate::net::detach(&netns) {
                tracing::warn!("detach the pod network in {}: {e}", netns.display());
            }
        }
        let _ = std::fs::remove_file(bundle.join(NETNS_FILE));
    }
    // The pod's cgroup, which the dead shim was in.
    if let Some(path) = std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|j| serde_json::from_slice::<serde_json::Value>(&j).ok())
        .and_then(|spec| spec["linux"]["cgroupsPath"].as_str().map(String::from))
    {
        if let Ok(members) = std::fs::read_to_string(bundle.join(MEMBERS_FILE)) {
            if super::cgroup::oom_kills(&path) > 0 {
                cleaned.oom_killed = members
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect();
            }
        }
        super::cgroup::remove_dead(&path);
    }
    let _ = std::fs::remove_file(bundle.join(MEMBERS_FILE));
    let recorded = std::fs::read_to_string(bundle.join(RUN_DIR_FILE)).ok();
    let _ = std::fs::remove_file(bundle.join(RUN_DIR_FILE));
    let dir = PathBuf::from(recorded?.trim());
    if !dir.starts_with(crate::paths::run_root()) || !dir.exists() {
        return None;
    }
    std::fs::remove_dir_all(&dir).ok()?;
    cleaned.run_dir = Some(dir);
    Some(())
}

/// Unmounts `target` (lazily; not mounted is not an error).
pub fn unmount(target: &Path) {
    if let Ok(c) = std::ffi::CString::new(target.to_string_lossy().as_bytes()) {
        // SAFETY: a valid path string; failure (not mounted) is ignored.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}
