//! What the node installer's tests share: a scratch node root holding an
//! operator's containerd 1.6 config, the CLI, a restart command that runs a
//! real containerd on the installed config.

#![allow(dead_code, reason = "each test file uses its own part")]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn zygote() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zygote"))
}

/// An operator's containerd 1.6 config: comments, runc's options, a
/// sandbox image of its own.
pub const CONFIG: &str = r#"# This node's containerd (kept by hand: keep this comment).
version = 2
root = "ROOT/var/lib/containerd"
state = "ROOT/run/containerd"

[grpc]
  address = "ROOT/run/containerd/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.local/pause:3.9"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = true
"#;

pub struct Node {
    pub root: PathBuf,
    pub artefacts: PathBuf,
}

impl Node {
    pub fn new(name: &str) -> Node {
        let root = std::env::temp_dir().join(format!("zygote-node-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("etc/containerd")).unwrap();
        std::fs::write(
            root.join("etc/containerd/config.toml"),
            CONFIG.replace("ROOT", &root.to_string_lossy()),
        )
        .unwrap();
        let artefacts = root.with_extension("src");
        std::fs::create_dir_all(&artefacts).unwrap();
        for f in ["vmlinux", "initramfs.cpio"] {
            std::fs::write(artefacts.join(f), format!("{f} bytes")).unwrap();
        }
        // The "shim": a shell, so that the test can run one that looks
        // like a pod's shim to the installer (its exe, `-id POD`).
        std::fs::copy("/bin/sh", artefacts.join("containerd-shim-zygote-v2")).unwrap();
        Node { root, artefacts }
    }

    /// A scratch node whose shim artefact is the real one, and whose
    /// `/etc` has what a node's has for containerd's CRI (the host's files).
    pub fn with_real_shim(name: &str) -> Node {
        let node = Node::new(name);
        for f in ["hosts", "resolv.conf", "passwd", "group", "hostname"] {
            let _ = std::fs::copy(Path::new("/etc").join(f), node.root.join("etc").join(f));
        }
        std::fs::copy(
            env!("CARGO_BIN_EXE_containerd-shim-zygote-v2"),
            node.artefacts.join("containerd-shim-zygote-v2"),
        )
        .unwrap();
        node
    }

    pub fn run(&self, what: &str, restart: &str) -> std::process::Output {
        let mut c = zygote();
        c.args(["node", what, "--host-root"])
            .arg(&self.root)
            .args(["--restart", restart]);
        if what == "install" {
            c.arg("--shim")
                .arg(self.artefacts.join("containerd-shim-zygote-v2"))
                .arg("--kernel")
                .arg(self.artefacts.join("vmlinux"))
                .arg("--initramfs")
                .arg(self.artefacts.join("initramfs.cpio"));
        }
        c.output().unwrap()
    }

    pub fn config(&self) -> String {
        std::fs::read_to_string(self.root.join("etc/containerd/config.toml")).unwrap()
    }

    /// What containerd 1.6 makes of the config.
    pub fn dump(&self) -> String {
        let out = Command::new("containerd")
            .arg("--config")
            .arg(self.root.join("etc/containerd/config.toml"))
            .args(["config", "dump"])
            .output()
            .expect("containerd (hack/containerd installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Node {
    /// A restart command that (re)starts a real containerd on the node's
    /// config, and counts its runs in `restarted`. The containerd runs in
    /// a mount namespace of its own where the node's `/etc` is `/etc` and
    /// the node's `/usr/local/bin` leads its PATH, so that it and the shims
    /// it starts find the installed shim and its config at their node paths.
    pub fn restart_command(&self) -> String {
        let root = self.root.display();
        format!(
            "echo >> {root}/restarted; \
             if [ -f {root}/containerd.pid ]; then old=$(cat {root}/containerd.pid); kill $old; \
               while kill -0 $old 2>/dev/null; do sleep 0.1; done; fi; \
             PATH={root}/usr/local/bin:$PATH setsid unshare --mount --propagation private \
               sh -c 'mount --bind {root}/etc /etc && exec containerd --config /etc/containerd/config.toml' \
               </dev/null >>{root}/containerd.log 2>&1 & echo $! > {root}/containerd.pid"
        )
    }

    /// The node's containerd socket.
    pub fn socket(&self) -> PathBuf {
        self.root.join("run/containerd/containerd.sock")
    }

    pub fn restarts(&self) -> usize {
        std::fs::read_to_string(self.root.join("restarted")).map_or(0, |t| t.lines().count())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.root.join("containerd.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_dir_all(&self.artefacts);
    }
}

pub fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// hack/containerd's containerd socket (None only when skipping is allowed).
pub fn dev_containerd() -> Option<PathBuf> {
    let socket = std::env::var_os("ZYGOTE_CONTAINERD_SOCK").map(PathBuf::from);
    assert!(
        socket.is_some() || std::env::var_os("ZYGOTE_ALLOW_SKIP").is_some_and(|v| v == "1"),
        "no ZYGOTE_CONTAINERD_SOCK: run hack/containerd (hack/test does)"
    );
    socket
}

pub fn exists(root: &Path, p: &str) -> bool {
    root.join(p).exists()
}
