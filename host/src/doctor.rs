//! `zygote doctor`: is this node ready to run zygote VMs?

use std::path::{Path, PathBuf};

use serde::Serialize;
use zygote_vmm::KvmKind;
use zygote_vmm::vstate::kvm::KvmHandle;

use crate::paths;

/// One check's outcome.
#[derive(Debug, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Whether it passed.
    pub ok: bool,
    /// What was found, or what is missing and how to get it.
    pub detail: String,
}

fn file_check(name: &'static str, path: &Path, fix: &str) -> Check {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() > 0 => Check {
            name,
            ok: true,
            detail: format!("{} ({} bytes)", path.display(), m.len()),
        },
        Ok(_) => Check {
            name,
            ok: false,
            detail: format!("{} is empty or not a file; {fix}", path.display()),
        },
        Err(e) => Check {
            name,
            ok: false,
            detail: format!("{}: {e}; {fix}", path.display()),
        },
    }
}

/// Runs every check.
pub fn run(kernel: &Path, initramfs: &Path) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(match KvmHandle::open() {
        Ok(h) => Check {
            name: "kvm",
            ok: true,
            detail: match h.kind {
                KvmKind::Pvm => {
                    "/dev/kvm is PVM (kvm_pvm): guest kernel code is emulated, slow but works"
                        .into()
                }
                KvmKind::Hardware => "/dev/kvm is hardware-assisted".into(),
            },
        },
        Err(e) => Check {
            name: "kvm",
            ok: false,
            detail: format!("{e}: load kvm_intel/kvm_amd (or kvm_pvm) and run as root"),
        },
    });
    checks.push(file_check(
        "kernel",
        kernel,
        "build it with hack/guest-kernel (or hack/guest-image)",
    ));
    checks.push(file_check(
        "image",
        initramfs,
        "build it with hack/guest-image",
    ));
    let run_root: PathBuf = paths::run_root();
    checks.push(match std::fs::create_dir_all(&run_root) {
        Ok(()) => Check {
            name: "run-dir",
            ok: true,
            detail: run_root.display().to_string(),
        },
        Err(e) => Check {
            name: "run-dir",
            ok: false,
            detail: format!("{}: {e}", run_root.display()),
        },
    });
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_fail_with_a_fix() {
        let checks = run(
            Path::new("/nonexistent/vmlinux"),
            Path::new("/nonexistent/initramfs"),
        );
        let kernel = checks.iter().find(|c| c.name == "kernel").unwrap();
        assert!(!kernel.ok);
        assert!(
            kernel.detail.contains("hack/guest-kernel"),
            "{}",
            kernel.detail
        );
        let image = checks.iter().find(|c| c.name == "image").unwrap();
        assert!(!image.ok);
        assert!(
            checks.iter().find(|c| c.name == "kvm").unwrap().ok,
            "/dev/kvm must work for the tests"
        );
    }
}
