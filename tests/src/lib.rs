//! Helpers shared by the integration tests in `tests/`.
//!
//! The VM tests need the guest kernel and image (`hack/guest-image`). When they
//! are missing the tests fail with instructions, unless `ZYGOTE_ALLOW_SKIP=1`
//! says a skip is acceptable (never in CI).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Real-VM tests take this lock: guest kernel work is slow on PVM, and two
/// VMs at once on two cores would only make each slower.
pub fn vm_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether the guest kernel and image exist; panics with instructions if not
/// (or returns false when skipping is explicitly allowed).
pub fn guest_available() -> bool {
    let kernel = zygote::paths::kernel();
    let image = zygote::paths::initramfs();
    if kernel.exists() && image.exists() {
        return true;
    }
    let msg = format!(
        "guest kernel {} or image {} missing: run hack/guest-image (hack/test does)",
        kernel.display(),
        image.display()
    );
    if std::env::var_os("ZYGOTE_ALLOW_SKIP").is_some_and(|v| v == "1") {
        eprintln!("SKIP: {msg}");
        return false;
    }
    panic!("{msg}");
}

/// The busybox variant of the guest image (`hack/guest-image --busybox`).
pub fn busybox_initramfs() -> PathBuf {
    zygote::paths::initramfs().with_file_name("initramfs-busybox.cpio")
}

/// Entries of the run root that belong to this process (`vm-<pid>-*`).
pub fn own_run_dirs() -> Vec<PathBuf> {
    let prefix = format!("vm-{}-", std::process::id());
    std::fs::read_dir(zygote::paths::run_root())
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Threads of this process that the VMM started (named `zygote-*`: vCPUs and
/// device threads). The test harness's own threads come and go, so they are not counted.
pub fn vmm_thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("zygote-"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Open file descriptors of this process right now.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|rd| rd.count())
        .unwrap_or(0)
}

/// A temporary file with `bytes`, removed on drop.
#[derive(Debug)]
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// Creates it.
    pub fn new(name: &str, bytes: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("zygote-test-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).expect("write temp file");
        TempFile(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
