//! The `zygote` and `containerd-shim-zygote-v2` binaries as an operator and
//! containerd run them.

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

/// containerd asks a shim binary for its version (`-v`) and, from 2.0 on,
/// for its `RuntimeInfo` protobuf (`-info`, options on stdin).
#[test]
fn the_shim_binary_answers_version_and_info() {
    let shim = env!("CARGO_BIN_EXE_containerd-shim-zygote-v2");
    let out = Command::new(shim).arg("-v").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("containerd-shim-zygote-v2 {}", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(shim)
        .arg("-info")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // RuntimeInfo: field 1 (name), then field 2 (version) holding field 1 (version).
    let name = b"io.containerd.zygote.v2";
    let version = env!("CARGO_PKG_VERSION").as_bytes();
    let mut want = vec![0x0a, name.len() as u8];
    want.extend_from_slice(name);
    want.extend_from_slice(&[0x12, version.len() as u8 + 2, 0x0a, version.len() as u8]);
    want.extend_from_slice(version);
    assert_eq!(out.stdout, want);
}
