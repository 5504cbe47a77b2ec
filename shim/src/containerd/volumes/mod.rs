//! How a container's bind mounts reach its VM. A VM cannot see host paths;
//! what kubelet and containerd bind into a pod is sorted by what it is:
//!
//! - **copied**: kubelet's configMap, secret, projected and downwardAPI
//!   volumes, and regular files (`/etc/hosts`, `/etc/resolv.conf`,
//!   `/etc/hostname`, the termination log) — read now, sent whole with the
//!   container's create into a tmpfs in the guest, and sent again when the
//!   host copy changes ([`watch`]). A writable file is also *written back*
//!   after the container exits (kubelet reads the termination message from
//!   the host file).
//! - **shared**: a memory-backed emptyDir (kubelet's tmpfs) and the pod's
//!   `/dev/shm` — a pod-wide tmpfs in the guest of the host one's size,
//!   made by the first container that mounts it.
//! - **on the host**: a disk-backed emptyDir (kubelet measures its use
//!   against `sizeLimit` on the host, as under runc) and any other host
//!   directory (hostPath, a `ctr --mount` of a directory) — served to the VM by its shared file system
//!   (virtio-fs, [`zygote_vmm::devices::virtio::fs`]), read-only on the
//!   host side too when the mount is; the guest binds it from there.
//!
//! Secrets are read into memory and sent over vsock: they never reach the
//! template, and zygote writes them nowhere on the host.

pub mod watch;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};
use zygote_agent_api::volumes::VOLUME_SOURCE;
use zygote_agent_api::{EntryKind, Volume, VolumeEntry};

/// Most bytes of file content one container's copied volumes may hold: they
/// travel in its create request, one agent frame (4 MiB) with the spec.
pub const MAX_COPIED_BYTES: u64 = 3 << 20;
/// Most entries (files, directories, links) one volume may hold.
pub const MAX_ENTRIES: usize = 4096;

/// kubelet's volume plugins whose content is small and read-mostly, and
/// which it replaces atomically (`..data`).
const KUBELET_COPIED: [&str; 4] = [
    "/volumes/kubernetes.io~configmap/",
    "/volumes/kubernetes.io~secret/",
    "/volumes/kubernetes.io~projected/",
    "/volumes/kubernetes.io~downward-api/",
];
const KUBELET_EMPTY_DIR: &str = "/volumes/kubernetes.io~empty-dir/";

/// A bind mount that cannot be given to the VM.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// Bigger than zygote copies.
    #[error(
        "the volumes copied into the VM for this container hold {bytes} bytes, more than zygote \
         copies ({MAX_COPIED_BYTES}); the largest is {largest}"
    )]
    TooBig {
        /// Their size.
        bytes: u64,
        /// The host path of the largest.
        largest: String,
    },
    /// Too many entries.
    #[error("{0} holds more than {MAX_ENTRIES} files, directories and links")]
    TooMany(String),
    /// The host refused a read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// What.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A copied volume the host may change: where it is on the host, and what
/// was last sent.
#[derive(Debug, Clone)]
pub struct Copied {
    /// The volume's name in its container.
    pub name: String,
    /// The host file or directory.
    pub host: PathBuf,
    /// Written back to the host after the container exits.
    pub write_back: bool,
    /// A digest of what was last sent.
    pub sent: [u8; 32],
}

/// A host directory the VM's shared file system serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hosted {
    /// Its name in the share (pod-wide: one per directory and mode).
    pub name: String,
    /// The host directory.
    pub host: PathBuf,
    /// Served read-only.
    pub read_only: bool,
}

/// The guest's view of a container's mounts.
#[derive(Debug, Default)]
pub struct Placed {
    /// The volumes to send with the create.
    pub volumes: Vec<Volume>,
    /// The copied ones (to watch, to write back).
    pub copied: Vec<Copied>,
    /// The host directories to share before the create.
    pub hosted: Vec<Hosted>,
    /// What was left out or changed, for the log.
    pub notes: Vec<String>,
}

/// What one bind mount becomes.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Copied {
        write_back: bool,
    },
    /// A pod-wide tmpfs of this size (0: unbounded).
    Shared(u64),
    Host,
    Left(String),
}

fn options(m: &Value) -> Vec<&str> {
    m["options"]
        .as_array()
        .map(|o| o.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Whether mount `m` of a spec is a bind mount.
pub fn is_bind(m: &Value) -> bool {
    m["type"].as_str().unwrap_or("bind") == "bind"
        || options(m).iter().any(|o| *o == "bind" || *o == "rbind")
}

fn kind(destination: &str, source: &str, readonly: bool) -> Kind {
    let meta = std::fs::metadata(source);
    let is_dir = meta.as_ref().is_ok_and(|m| m.is_dir());
    let in_memory = || tmpfs_size(source);
    if destination == "/dev/shm" && source.ends_with("/shm") && is_dir {
        return Kind::Shared(in_memory().unwrap_or(0));
    }
    if source.contains(KUBELET_EMPTY_DIR) && is_dir {
        // kubelet's `medium: Memory` is a tmpfs (sized by its sizeLimit);
        // a disk-backed one is a plain directory it measures.
        return in_memory().map_or(Kind::Host, Kind::Shared);
    }
    if KUBELET_COPIED.iter().any(|p| source.contains(p)) && is_dir {
        return Kind::Copied { write_back: false };
    }
    match meta {
        Ok(m) if m.is_file() => Kind::Copied {
            write_back: !readonly,
        },
        Ok(m) if m.is_dir() => Kind::Host,
        Ok(_) => Kind::Left(format!(
            "mount {destination}: {source} is not a regular file or a directory; left out"
        )),
        Err(e) => Kind::Left(format!("mount {destination}: {source}: {e}; left out")),
    }
}

/// The size of the tmpfs at `path`, if it is one.
fn tmpfs_size(path: &str) -> Option<u64> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let c = std::ffi::CString::new(path).ok()?;
    // SAFETY: zeroed plain data; statfs fills it from a valid path string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 || st.f_type as i64 != TMPFS_MAGIC {
        return None;
    }
    Some(st.f_blocks as u64 * st.f_bsize as u64)
}

/// A pod-wide name for the shared directory at host path `source`.
fn shared_name(destination: &str, source: &str) -> String {
    if destination == "/dev/shm" {
        return "shm".into();
    }
    format!("dir-{}", short_digest(source))
}

/// A pod-wide name for host directory `source` served `read_only` or not.
fn host_name(source: &str, read_only: bool) -> String {
    let mode = if read_only { "ro" } else { "rw" };
    format!("host-{}-{mode}", short_digest(source))
}

fn short_digest(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Rewrites `spec`'s bind mounts for the guest: each copied or shared one
/// names its volume (read now); the others are removed. The copied volumes
/// together stay within [`MAX_COPIED_BYTES`].
pub fn place(spec: &mut Value) -> Result<Placed, VolumeError> {
    let mut placed = Placed::default();
    let Some(mounts) = spec["mounts"].as_array_mut() else {
        return Ok(placed);
    };
    let mut kept = Vec::new();
    let (mut total, mut largest) = (0u64, (0u64, String::new()));
    for mut m in std::mem::take(mounts) {
        if !is_bind(&m) {
            kept.push(m);
            continue;
        }
        let destination = m["destination"].as_str().unwrap_or("").to_string();
        let source = m["source"].as_str().unwrap_or("").to_string();
        let readonly = options(&m).contains(&"ro");
        let name = match kind(&destination, &source, readonly) {
            Kind::Left(note) => {
                placed.notes.push(note);
                continue;
            }
            Kind::Shared(size_bytes) => {
                // The host directory's mode and owner; its content stays.
                let name = shared_name(&destination, &source);
                let meta = std::fs::metadata(&source).map_err(|e| VolumeError::Read {
                    path: source.clone(),
                    source: e,
                })?;
                placed.volumes.push(Volume {
                    name: name.clone(),
                    entries: vec![entry(String::new(), &meta, EntryKind::Dir)],
                    shared: true,
                    host: false,
                    size_bytes,
                });
                name
            }
            Kind::Host => {
                let name = host_name(&source, readonly);
                let meta = std::fs::metadata(&source).map_err(|e| VolumeError::Read {
                    path: source.clone(),
                    source: e,
                })?;
                if !placed.hosted.iter().any(|h| h.name == name) {
                    placed.volumes.push(Volume {
                        name: name.clone(),
                        entries: vec![entry(String::new(), &meta, EntryKind::Dir)],
                        shared: false,
                        host: true,
                        size_bytes: 0,
                    });
                    placed.hosted.push(Hosted {
                        name: name.clone(),
                        host: source.clone().into(),
                        read_only: readonly,
                    });
                }
                name
            }
            Kind::Copied { write_back } => {
                let name = format!("v{}", placed.copied.len());
                let v = read_tree(Path::new(&source), &name)?;
                let bytes: u64 = v.entries.iter().map(|e| e.data.len() as u64).sum();
                total += bytes;
                if bytes >= largest.0 {
                    largest = (bytes, source.clone());
                }
                placed.copied.push(Copied {
                    name: name.clone(),
                    host: source.into(),
                    write_back,
                    sent: digest(&v),
                });
                placed.volumes.push(v);
                name
            }
        };
        m["source"] = Value::from(format!("{VOLUME_SOURCE}{name}"));
        m["type"] = Value::from("bind");
        kept.push(m);
    }
    *mounts = kept;
    if total > MAX_COPIED_BYTES {
        return Err(VolumeError::TooBig {
            bytes: total,
            largest: largest.1,
        });
    }
    Ok(placed)
}

/// A digest of a volume's content (what changed is sent again).
pub fn digest(v: &Volume) -> [u8; 32] {
    use prost::Message;
    Sha256::digest(v.encode_to_vec()).into()
}

fn entry(path: String, meta: &std::fs::Metadata, kind: EntryKind) -> VolumeEntry {
    VolumeEntry {
        path,
        kind: kind as i32,
        mode: meta.permissions().mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        ..Default::default()
    }
}

/// Reads the host file or directory tree at `root` as volume `name`
/// (links kept as links; a link out of the tree, or a device, FIFO or
/// socket, is left out).
pub fn read_tree(root: &Path, name: &str) -> Result<Volume, VolumeError> {
    let err = |path: &Path| {
        let path = path.display().to_string();
        move |source| VolumeError::Read { path, source }
    };
    let meta = std::fs::metadata(root).map_err(err(root))?;
    let mut v = Volume {
        name: name.into(),
        entries: Vec::new(),
        shared: false,
        host: false,
        size_bytes: 0,
    };
    if meta.is_file() {
        let mut e = entry(String::new(), &meta, EntryKind::File);
        e.data = read_bounded(root).map_err(err(root))?;
        v.entries.push(e);
        return Ok(v);
    }
    v.entries.push(entry(String::new(), &meta, EntryKind::Dir));
    let mut pending = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = pending.pop() {
        let mut children: Vec<_> = std::fs::read_dir(&dir)
            .map_err(err(&dir))?
            .collect::<Result<_, _>>()
            .map_err(err(&dir))?;
        children.sort_by_key(|c| c.file_name());
        for child in children {
            let Some(file) = child.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let path = if rel.is_empty() {
                file
            } else {
                format!("{rel}/{file}")
            };
            let full = child.path();
            let meta = std::fs::symlink_metadata(&full).map_err(err(&full))?;
            let t = meta.file_type();
            if t.is_dir() {
                v.entries.push(entry(path.clone(), &meta, EntryKind::Dir));
                pending.push((full, path));
            } else if t.is_file() {
                let mut e = entry(path, &meta, EntryKind::File);
                e.data = read_bounded(&full).map_err(err(&full))?;
                v.entries.push(e);
            } else if t.is_symlink() {
                let target = std::fs::read_link(&full).map_err(err(&full))?;
                let mut e = entry(path, &meta, EntryKind::Symlink);
                e.target = target.to_string_lossy().into_owned();
                if zygote_agent_api::volumes::link_stays_inside(&e.path, &e.target) {
                    v.entries.push(e);
                }
            }
            if v.entries.len() > MAX_ENTRIES {
                return Err(VolumeError::TooMany(root.display().to_string()));
            }
        }
    }
    Ok(v)
}

/// Reads a file, but no more than the copy limit (and one byte more, so
/// that a bigger file is seen to be too big).
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut data = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_COPIED_BYTES + 1)
        .read_to_end(&mut data)?;
    Ok(data)
}

#[cfg(test)]
mod tests;
