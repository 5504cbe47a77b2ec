//! What the agent's container tests share: a busybox root file system
//! made on the host, a spec, a container run to completion.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use zygote_agent::container::{launch, ready_pipe, spec::launch_config};

pub const AGENT: &str = env!("CARGO_BIN_EXE_zygote-agent");

/// A busybox root file system in a fresh directory.
pub fn busybox_rootfs(tag: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("zygote-rootfs-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "proc", "dev", "tmp", "etc", "sys"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static on the host");
    for applet in [
        "sh", "echo", "id", "pwd", "hostname", "grep", "sleep", "cat", "ls", "stty", "head",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    root
}

pub fn spec(args: &[&str], process: serde_json::Value) -> Vec<u8> {
    let mut v = serde_json::json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
    });
    for (k, val) in process.as_object().unwrap() {
        v["process"][k] = val.clone();
    }
    serde_json::to_vec(&v).unwrap()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            std::env::var_os("ZYGOTE_ALLOW_SKIP").is_some_and(|v| v == "1"),
            "container tests need root (namespaces, mounts, pivot_root)"
        );
        eprintln!("SKIP: not root");
    }
    root
}

/// Runs a spec to completion: (exit code, stdout, stderr).
pub fn run(root: &Path, json: &[u8]) -> (i32, String, String) {
    let config = launch_config(json, root).unwrap();
    let (_ready, ready_w) = ready_pipe().unwrap();
    let mut child = launch(
        &config,
        Path::new(AGENT),
        Stdio::null(),
        Stdio::piped(),
        Stdio::piped(),
        &ready_w,
    )
    .unwrap();
    let mut out = String::new();
    let mut err = String::new();
    child
        .inner
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .inner
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    (status.code().unwrap_or(-1), out, err)
}
