//! The `zygote` binary as an operator runs it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn zygote() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zygote"))
}

#[test]
fn doctor_names_what_is_missing_and_fails() {
    let out = zygote()
        .arg("doctor")
        .env("ZYGOTE_KERNEL", "/nonexistent/vmlinux")
        .env("ZYGOTE_INITRAMFS", "/nonexistent/initramfs.cpio")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAIL kernel") && text.contains("hack/guest-kernel"),
        "{text}"
    );
    assert!(
        text.contains("FAIL image") && text.contains("hack/guest-image"),
        "{text}"
    );
    assert!(text.contains("ok   kvm"), "{text}");
}

#[test]
fn boot_with_a_missing_kernel_fails_clearly() {
    let run = std::env::temp_dir().join(format!("zygote-cli-run-{}", std::process::id()));
    let out = zygote()
        .args(["boot", "--kernel", "/nonexistent/vmlinux"])
        .env("ZYGOTE_RUN", &run)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot open kernel /nonexistent/vmlinux"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(&run)
        .map(|d| d.filter_map(Result::ok).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&run);
}

/// A `zygote boot` killed while its VM runs removes its run directory (socket,
/// console log) and exits; the VM dies with the process.
#[test]
fn a_killed_boot_leaves_nothing() {
    let kernel = zygote::paths::kernel();
    let image = zygote::paths::initramfs();
    if !(kernel.exists() && image.exists()) {
        assert!(
            std::env::var_os("ZYGOTE_ALLOW_SKIP").is_some_and(|v| v == "1"),
            "guest kernel/image missing: run hack/guest-image"
        );
        return;
    }
    let run: PathBuf = std::env::temp_dir().join(format!("zygote-cli-kill-{}", std::process::id()));
    let mut child = zygote()
        .arg("boot")
        .env("ZYGOTE_RUN", &run)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let dir = run.join(format!("vm-{}-0", child.id()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.join("vsock.sock").exists() {
        assert!(Instant::now() < deadline, "the VM never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert!(!dir.exists(), "run directory left behind");
    let _ = std::fs::remove_dir_all(&run);
}
