//! Putting zygote on a node and taking it off (`zygote node install |
//! uninstall | status`), against the node's root at `host_root` (`/`, or
//! where a DaemonSet mounts it; a scratch directory in tests).
//!
//! Install: take the node lock; check `/dev/kvm`; copy the artefacts (the
//! shim, the CLI, the guest kernel and image) each to a temporary name and
//! rename it over the old one, so a running shim keeps its old inode; write
//! the shim's config unless the operator has one; register the runtime in
//! containerd's config ([`containerd_config`]: in place for version 2, a
//! drop-in for version 3), keeping a backup of the file as it was first
//! found; restart containerd only if its config changed. Installing twice
//! changes nothing. Uninstall, in the safe order: refuse while a shim of
//! this installation runs (naming its pods), unregister, restart containerd
//! if that changed its config, then remove the artefacts. Running it twice
//! is harmless.

pub mod containerd_config;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use containerd_config::{ConfigError, template};

/// Where zygote's files go on the node (paths inside the node's root).
pub mod layout {
    /// The shim (containerd finds `containerd-shim-zygote-v2` on its PATH).
    pub const SHIM: &str = "usr/local/bin/containerd-shim-zygote-v2";
    /// The CLI.
    pub const CLI: &str = "usr/local/bin/zygote";
    /// The guest kernel.
    pub const KERNEL: &str = "opt/zygote/vmlinux";
    /// The guest image.
    pub const INITRAMFS: &str = "opt/zygote/initramfs.cpio";
    /// The shim's config (`options.ConfigPath`).
    pub const CONFIG: &str = "etc/zygote/config.toml";
    /// containerd 2.x's drop-in.
    pub const DROP_IN: &str = "etc/containerd/conf.d/zygote.toml";
    /// The node lock.
    pub const LOCK: &str = "run/zygote-node.lock";
}

/// How containerd is restarted after its config changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restart {
    /// Not at all (the operator does it; `status` says so).
    None,
    /// `systemctl restart containerd`.
    Systemd,
    /// This shell command.
    Command(String),
}

impl std::str::FromStr for Restart {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "none" => Restart::None,
            "systemd" => Restart::Systemd,
            other => Restart::Command(other.into()),
        })
    }
}

/// What to install, and where.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The node's root.
    pub host_root: PathBuf,
    /// containerd's main config, a path on the node (e.g.
    /// `/etc/containerd/config.toml`).
    pub containerd_config: PathBuf,
    /// How to restart containerd.
    pub restart: Restart,
    /// The artefacts to install, in this process's file system.
    pub shim: PathBuf,
    /// The CLI binary.
    pub cli: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The guest image.
    pub initramfs: PathBuf,
    /// The operator's shim config (e.g. from a Helm value): written over
    /// the node's, with the node paths it does not set. None: the node's is
    /// kept, and one is written only when it has none.
    pub config: Option<String>,
}

/// Why the node could not be changed. Nothing is left half-done by a
/// preflight or config error (they come before any change).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A file could not be read, written or removed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// containerd's config.
    #[error("{path}: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        source: ConfigError,
    },
    /// The node cannot run zygote.
    #[error("preflight: {0}")]
    Preflight(String),
    /// zygote pods still run.
    #[error("zygote pods still run on this node ({0}); remove them first")]
    InUse(String),
    /// containerd's restart failed.
    #[error("restarting containerd ({0}) failed: {1}")]
    Restart(String, String),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> NodeError {
    let path = path.to_path_buf();
    move |source| NodeError::Io { what, path, source }
}

/// What an install or uninstall did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// The KVM found (`hardware` or `pvm`; install only).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kvm: String,
    /// containerd's version, if its binary is on the PATH (install only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub containerd_version: Option<String>,
    /// containerd's config version: how zygote registered itself (install
    /// only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub containerd_config_version: Option<i64>,
    /// Files written or removed (node paths).
    pub changed_files: Vec<String>,
    /// Whether containerd's config changed.
    pub containerd_config_changed: bool,
    /// Whether containerd was restarted.
    pub restarted: bool,
    /// Whether containerd's CRI lists the handler after the install
    /// (checked by the CLI when containerd's socket is there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handler_live: Option<bool>,
}

/// `path` (absolute, on the node) inside `host_root`.
fn on_node(host_root: &Path, path: &Path) -> PathBuf {
    host_root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Holds the node lock (released when dropped).
struct NodeLock {
    _file: std::fs::File,
}

impl NodeLock {
    fn take(host_root: &Path) -> Result<NodeLock, NodeError> {
        let path = host_root.join(layout::LOCK);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        }
        let file = std::fs::File::create(&path).map_err(io("open", &path))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(NodeError::Preflight(format!(
                "another `zygote node` holds {}",
                path.display()
            )));
        }
        Ok(NodeLock { _file: file })
    }
}

/// Writes `bytes` to `path` by a temporary file renamed over it (a process
/// that has the old file open or mapped keeps it), unless it already holds
/// them. Returns whether it wrote.
fn replace(path: &Path, bytes: &[u8], mode: u32) -> Result<bool, NodeError> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let tmp = dir.join(format!(
        ".{}.zygote-new",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("write", path)(e));
    }
    Ok(true)
}

fn read(path: &Path) -> Result<Vec<u8>, NodeError> {
    std::fs::read(path).map_err(io("read", path))
}

/// The shim config an install writes: the node paths, then the
/// operator's settings (`operator`, TOML; a node path it sets is its own).
fn shim_config(operator: Option<&str>) -> Result<String, NodeError> {
    let theirs: toml_edit::DocumentMut = match operator {
        Some(text) => text.parse().map_err(|e| {
            NodeError::Preflight(format!("the shim config given is not valid TOML: {e}"))
        })?,
        None => toml_edit::DocumentMut::new(),
    };
    let mut out = String::from(if operator.is_some() {
        "# zygote shim settings (written by `zygote node install` from the operator's config).\n"
    } else {
        "# zygote shim settings (written by `zygote node install`; kept when present).\n"
    });
    for (key, path) in [
        ("kernel", format!("/{}", layout::KERNEL)),
        ("initramfs", format!("/{}", layout::INITRAMFS)),
        ("templates", "/var/lib/zygote/templates".into()),
        ("images", "/var/lib/zygote/images".into()),
    ] {
        if !theirs.contains_key(key) {
            out.push_str(&format!("{key} = \"{path}\"\n"));
        }
    }
    if let Some(text) = operator {
        out.push_str(text.trim_end());
        out.push('\n');
    }
    Ok(out)
}

/// Checks the node can run zygote: `/dev/kvm` (this process's: a
/// DaemonSet's pod is given the node's) opens as KVM; says which kind, and
/// containerd's version when its binary is found.
fn preflight(report: &mut Report) -> Result<(), NodeError> {
    let kvm = zygote_vmm::vstate::kvm::KvmHandle::open().map_err(|e| {
        NodeError::Preflight(format!(
            "/dev/kvm: {e} (zygote needs KVM: hardware virtualization, or PVM)"
        ))
    })?;
    report.kvm = kvm.kind.to_string();
    // "containerd github.com/containerd/containerd 1.6.20~ds1 <revision>"
    report.containerd_version = std::process::Command::new("containerd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.split_whitespace().nth(2).map(String::from)
        });
    Ok(())
}

/// The containerd config's new text (main file, and a drop-in for version
/// 3), from `text`; `register` or not.
fn containerd_texts(
    opts: &NodeOptions,
    text: &str,
    register: bool,
) -> Result<(String, Option<String>), NodeError> {
    let cfg = |source| NodeError::Config {
        path: opts.containerd_config.clone(),
        source,
    };
    let version = containerd_config::version(text).map_err(cfg)?;
    let config_path = format!("/{}", layout::CONFIG);
    let drop_in = format!("/{}", layout::DROP_IN);
    match (version, register) {
        (3.., true) => Ok((
            containerd_config::import(text, &drop_in).map_err(cfg)?,
            Some(containerd_config::drop_in(&config_path)),
        )),
        (_, true) => Ok((
            containerd_config::register_in_place(text, &config_path).map_err(cfg)?,
            None,
        )),
        (_, false) => {
            let text = containerd_config::unimport(text, &drop_in).map_err(cfg)?;
            Ok((containerd_config::unregister(&text).map_err(cfg)?, None))
        }
    }
}

fn restart(how: &Restart) -> Result<bool, NodeError> {
    let (what, mut command) = match how {
        Restart::None => return Ok(false),
        Restart::Systemd => {
            let mut c = std::process::Command::new("systemctl");
            c.args(["restart", "containerd"]);
            ("systemctl restart containerd".to_string(), c)
        }
        Restart::Command(cmd) => {
            let mut c = std::process::Command::new("sh");
            c.args(["-c", cmd]);
            (cmd.clone(), c)
        }
    };
    let out = command
        .output()
        .map_err(|e| NodeError::Restart(what.clone(), e.to_string()))?;
    if !out.status.success() {
        return Err(NodeError::Restart(
            what,
            format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(true)
}

/// Installs zygote on the node (see the module's text).
pub fn install(opts: &NodeOptions) -> Result<Report, NodeError> {
    let _lock = NodeLock::take(&opts.host_root)?;
    let mut report = Report::default();
    preflight(&mut report)?;
    let main = on_node(&opts.host_root, &opts.containerd_config);
    // The config is checked before anything on the node changes. A
    // k3s/rke2 template may be absent (k3s then renders its own config).
    let is_template = template::is_template(&opts.containerd_config);
    let text = if is_template {
        std::fs::read_to_string(&main).ok()
    } else {
        Some(String::from_utf8_lossy(&read(&main)?).into_owned())
    };
    let (new_main, drop_in) = match &text {
        _ if is_template => {
            let version = template::version(&opts.containerd_config);
            report.containerd_config_version = Some(version);
            let config_path = format!("/{}", layout::CONFIG);
            (
                template::register(text.as_deref(), version, &config_path),
                None,
            )
        }
        Some(text) => {
            report.containerd_config_version = containerd_config::version(text).ok();
            containerd_texts(opts, text, true)?
        }
        None => unreachable!("a main config is read or the install failed"),
    };
    let wanted = shim_config(opts.config.as_deref())?;
    for (from, to, mode) in [
        (&opts.shim, layout::SHIM, 0o755),
        (&opts.cli, layout::CLI, 0o755),
        (&opts.kernel, layout::KERNEL, 0o644),
        (&opts.initramfs, layout::INITRAMFS, 0o644),
    ] {
        if replace(&opts.host_root.join(to), &read(from)?, mode)? {
            report.changed_files.push(format!("/{to}"));
        }
    }
    let config = opts.host_root.join(layout::CONFIG);
    if (opts.config.is_some() || !config.exists()) && replace(&config, wanted.as_bytes(), 0o644)? {
        report.changed_files.push(format!("/{}", layout::CONFIG));
    }
    if let Some(drop_in) = drop_in {
        if replace(
            &opts.host_root.join(layout::DROP_IN),
            drop_in.as_bytes(),
            0o644,
        )? {
            report.changed_files.push(format!("/{}", layout::DROP_IN));
            report.containerd_config_changed = true;
        }
    }
    if Some(&new_main) != text.as_ref() {
        let backup = main.with_file_name(format!(
            "{}.zygote-backup",
            main.file_name().unwrap_or_default().to_string_lossy()
        ));
        if let Some(text) = text.as_ref().filter(|_| !backup.exists()) {
            replace(&backup, text.as_bytes(), 0o600)?;
        }
        replace(&main, new_main.as_bytes(), 0o644)?;
        report
            .changed_files
            .push(opts.containerd_config.display().to_string());
        report.containerd_config_changed = true;
    }
    if report.containerd_config_changed {
        report.restarted = restart(&opts.restart)?;
    }
    Ok(report)
}

/// The pods whose shims run from this installation's shim binary.
pub fn running_pods(host_root: &Path) -> Vec<String> {
    let Ok(shim) = std::fs::canonicalize(host_root.join(layout::SHIM)) else {
        return Vec::new();
    };
    // A shim started by the node's containerd, seen from a DaemonSet's pod
    // (the node's processes, its root mounted at `host_root`), names its
    // binary by the node's path.
    let on_node = format!("/{}", layout::SHIM);
    let mut pods = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let dir = entry.path();
        // A file replaced by an install shows as "PATH (deleted)".
        let exe = std::fs::read_link(dir.join("exe")).unwrap_or_default();
        let exe = exe.to_string_lossy();
        let exe = exe.trim_end_matches(" (deleted)");
        if exe != shim.to_string_lossy() && exe != on_node {
            continue;
        }
        let args = std::fs::read(dir.join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = args.split(|b| *b == 0).collect();
        if let Some(at) = args.iter().position(|a| *a == b"-id") {
            if let Some(id) = args.get(at + 1) {
                pods.push(String::from_utf8_lossy(id).into_owned());
            }
        }
    }
    pods.sort();
    pods.dedup();
    pods
}

/// Removes zygote from the node (see the module's text).
pub fn uninstall(opts: &NodeOptions) -> Result<Report, NodeError> {
    let _lock = NodeLock::take(&opts.host_root)?;
    let pods = running_pods(&opts.host_root);
    if !pods.is_empty() {
        return Err(NodeError::InUse(pods.join(", ")));
    }
    let mut report = Report::default();
    let main = on_node(&opts.host_root, &opts.containerd_config);
    if let Ok(bytes) = std::fs::read(&main) {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let new_main = if template::is_template(&opts.containerd_config) {
            template::unregister(&text)
        } else {
            Some(containerd_texts(opts, &text, false)?.0)
        };
        if new_main.as_ref() != Some(&text) {
            match new_main {
                Some(new_main) => replace(&main, new_main.as_bytes(), 0o644)?,
                // A template the install made: gone, as before it.
                None => {
                    std::fs::remove_file(&main).map_err(io("remove", &main))?;
                    true
                }
            };
            report
                .changed_files
                .push(opts.containerd_config.display().to_string());
            report.containerd_config_changed = true;
        }
    }
    let drop_in = opts.host_root.join(layout::DROP_IN);
    if drop_in.exists() {
        std::fs::remove_file(&drop_in).map_err(io("remove", &drop_in))?;
        report.changed_files.push(format!("/{}", layout::DROP_IN));
        report.containerd_config_changed = true;
    }
    if report.containerd_config_changed {
        report.restarted = restart(&opts.restart)?;
    }
    for path in [
        layout::SHIM,
        layout::CLI,
        layout::KERNEL,
        layout::INITRAMFS,
        layout::CONFIG,
    ] {
        let full = opts.host_root.join(path);
        match std::fs::remove_file(&full) {
            Ok(()) => report.changed_files.push(format!("/{path}")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove", &full)(e)),
        }
    }
    Ok(report)
}

/// What is on the node now.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    /// Each artefact and whether it is there.
    pub artefacts: Vec<(String, bool)>,
    /// Whether containerd's config (or its drop-in) registers the runtime.
    pub registered: bool,
    /// The pods whose shims run.
    pub running_pods: Vec<String>,
}

/// Reads what is installed.
pub fn status(host_root: &Path, containerd_config: &Path) -> Status {
    let artefacts = [
        layout::SHIM,
        layout::CLI,
        layout::KERNEL,
        layout::INITRAMFS,
        layout::CONFIG,
    ]
    .iter()
    .map(|p| (format!("/{p}"), host_root.join(p).exists()))
    .collect();
    let text = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let main = text(&on_node(host_root, containerd_config));
    let registered = containerd_config::registered(&main)
        || containerd_config::template::registered(&main)
        || containerd_config::registered(&text(&host_root.join(layout::DROP_IN)));
    Status {
        artefacts,
        registered,
        running_pods: running_pods(host_root),
    }
}
