//! Volumes the host copies in (see `zygote_agent_api::volumes`): written
//! under the container's state directory (or, shared ones, the pod's), and
//! replaced in the order kubelet's atomic writer uses, so a reader never
//! sees half an update: new directories and files first, then the links
//! that point at them (`..data` before the keys that go through it), then
//! what is no longer there. A host volume is only bound: the VM's shared
//! file system serves it.

use std::collections::HashSet;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use zygote_agent_api::volumes::{SHARE_MOUNT, SHARE_TAG};
use zygote_agent_api::{EntryKind, Volume, VolumeEntry};

/// A volume that cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The host sent something this agent will not write.
    #[error("volume {volume:?}: {why}")]
    Invalid {
        /// The volume's name.
        volume: String,
        /// What is wrong.
        why: String,
    },
    /// The guest refused.
    #[error("volume {volume:?}: {what}: {source}")]
    Os {
        /// The volume's name.
        volume: String,
        /// What was done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// Whether `name` can name a volume (a single path component).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn relative(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    p.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| p.to_path_buf())
}

fn kind(e: &VolumeEntry) -> Option<EntryKind> {
    EntryKind::try_from(e.kind).ok()
}

/// Checks what the host sent: a name, a root entry, relative paths whose
/// parents are directories of the volume, links that stay inside.
pub fn check(v: &Volume) -> Result<(), VolumeError> {
    let bad = |why: String| VolumeError::Invalid {
        volume: v.name.clone(),
        why,
    };
    if !valid_name(&v.name) {
        return Err(bad("invalid name: use 1-64 of [A-Za-z0-9_.-]".into()));
    }
    let root = v.entries.first().ok_or_else(|| bad("no entries".into()))?;
    let root_kind = kind(root);
    if !root.path.is_empty() || !matches!(root_kind, Some(EntryKind::File | EntryKind::Dir)) {
        return Err(bad(
            "the first entry must be the volume's file or directory".into(),
        ));
    }
    if (v.shared || v.host) && root_kind != Some(EntryKind::Dir) {
        return Err(bad("a shared or host volume is a directory".into()));
    }
    if v.host && (v.shared || v.entries.len() > 1) {
        return Err(bad("a host volume is one directory, not shared".into()));
    }
    if root_kind == Some(EntryKind::File) && v.entries.len() > 1 {
        return Err(bad("a file volume has one entry".into()));
    }
    let mut dirs: HashSet<PathBuf> = HashSet::from([PathBuf::new()]);
    let mut seen = HashSet::new();
    for e in &v.entries[1..] {
        let path = relative(&e.path)
            .filter(|p| p.components().count() > 0)
            .ok_or_else(|| {
                bad(format!(
                    "entry path {:?} is not a plain relative path",
                    e.path
                ))
            })?;
        if !seen.insert(path.clone()) {
            return Err(bad(format!("entry {:?} twice", e.path)));
        }
        let parent = path.parent().unwrap_or(Path::new("")).to_path_buf();
        if !dirs.contains(&parent) {
            return Err(bad(format!(
                "entry {:?} comes before its directory",
                e.path
            )));
        }
        if e.mode > 0o7777 {
            return Err(bad(format!("entry {:?} has mode {:o}", e.path, e.mode)));
        }
        match kind(e) {
            Some(EntryKind::Dir) => {
                dirs.insert(path);
            }
            Some(EntryKind::File) => {}
            Some(EntryKind::Symlink)
                if zygote_agent_api::volumes::link_stays_inside(&e.path, &e.target) => {}
            Some(EntryKind::Symlink) => {
                return Err(bad(format!(
                    "link {:?} points out of the volume ({:?})",
                    e.path, e.target
                )));
            }
            None => {
                return Err(bad(format!(
                    "entry {:?} of unknown kind {}",
                    e.path, e.kind
                )));
            }
        }
    }
    Ok(())
}

struct Writer<'a> {
    volume: &'a str,
    root: &'a Path,
}

impl Writer<'_> {
    fn os(&self, what: String) -> impl FnOnce(std::io::Error) -> VolumeError + '_ {
        move |source| VolumeError::Os {
            volume: self.volume.into(),
            what,
            source,
        }
    }

    fn full(&self, e: &VolumeEntry) -> PathBuf {
        if e.path.is_empty() {
            self.root.to_path_buf()
        } else {
            self.root.join(&e.path)
        }
    }

    fn owner(&self, path: &Path, e: &VolumeEntry) -> Result<(), VolumeError> {
        std::os::unix::fs::lchown(path, Some(e.uid), Some(e.gid))
            .map_err(self.os(format!("chown {}", path.display())))
    }

    fn mode(&self, path: &Path, e: &VolumeEntry) -> Result<(), VolumeError> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(e.mode))
            .map_err(self.os(format!("chmod {}", path.display())))
    }

    /// Makes way at `path` for an entry of `kind`: removes what is there
    /// unless it is already a directory and a directory is wanted.
    fn clear(&self, path: &Path, want_dir: bool) -> Result<bool, VolumeError> {
        match std::fs::symlink_metadata(path) {
            Err(_) => Ok(false),
            Ok(m) if m.is_dir() && want_dir => Ok(true),
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(path)
                .map(|()| false)
                .map_err(self.os(format!("remove {}", path.display()))),
            Ok(_) if want_dir => std::fs::remove_file(path)
                .map(|()| false)
                .map_err(self.os(format!("remove {}", path.display()))),
            Ok(_) => Ok(false),
        }
    }

    fn dir(&self, e: &VolumeEntry) -> Result<(), VolumeError> {
        let path = self.full(e);
        if !self.clear(&path, true)? {
            std::fs::create_dir(&path).map_err(self.os(format!("create {}", path.display())))?;
        }
        self.owner(&path, e)?;
        self.mode(&path, e)
    }

    /// A file of a directory volume: written beside and renamed over, so a
    /// reader sees the old or the new content.
    fn file(&self, e: &VolumeEntry) -> Result<(), VolumeError> {
        let path = self.full(e);
        if std::fs::read(&path).is_ok_and(|old| old == e.data)
            && std::fs::symlink_metadata(&path).is_ok_and(|m| {
                m.is_file() && m.permissions().mode() & 0o7777 == e.mode && {
                    use std::os::unix::fs::MetadataExt;
                    m.uid() == e.uid && m.gid() == e.gid
                }
            })
        {
            return Ok(());
        }
        self.clear(&path, false)?;
        let tmp = beside(&path);
        std::fs::write(&tmp, &e.data).map_err(self.os(format!("write {}", tmp.display())))?;
        self.owner(&tmp, e)?;
        self.mode(&tmp, e)?;
        std::fs::rename(&tmp, &path).map_err(self.os(format!("rename to {}", path.display())))
    }

    /// The file a file volume is: rewritten in place (a bind mount holds
    /// its inode: a file renamed over it would not be seen).
    fn file_in_place(&self, e: &VolumeEntry) -> Result<(), VolumeError> {
        let path = self.full(e);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
            return Err(VolumeError::Invalid {
                volume: self.volume.into(),
                why: "was a directory, is a file now".into(),
            });
        }
        if std::fs::read(&path).map_or(true, |old| old != e.data) {
            std::fs::write(&path, &e.data).map_err(self.os(format!("write {}", path.display())))?;
        }
        self.owner(&path, e)?;
        self.mode(&path, e)
    }

    fn link(&self, e: &VolumeEntry) -> Result<(), VolumeError> {
        let path = self.full(e);
        if std::fs::read_link(&path).is_ok_and(|t| t == Path::new(&e.target)) {
            return Ok(());
        }
        self.clear(&path, false)?;
        let tmp = beside(&path);
        symlink(&e.target, &tmp).map_err(self.os(format!("link {}", tmp.display())))?;
        self.owner(&tmp, e)?;
        std::fs::rename(&tmp, &path).map_err(self.os(format!("rename to {}", path.display())))
    }

    /// Removes what is under `dir` (relative `rel`) and not in `keep`.
    fn prune(&self, dir: &Path, rel: &Path, keep: &HashSet<PathBuf>) -> Result<(), VolumeError> {
        let entries = std::fs::read_dir(dir).map_err(self.os(format!("list {}", dir.display())))?;
        for entry in entries.flatten() {
            let (path, rel) = (entry.path(), rel.join(entry.file_name()));
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if keep.contains(&rel) {
                if is_dir {
                    self.prune(&path, &rel, keep)?;
                }
                continue;
            }
            let removed = if is_dir {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(self.os(format!("remove {}", path.display())))?;
        }
        Ok(())
    }
}

/// A temporary name beside `path` (same directory: renamed over it).
fn beside(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".zygote-new.{name}"))
}

/// Writes volume `v` at `root` (a file or a directory), or brings what is
/// there to `v`'s content.
pub fn write(root: &Path, v: &Volume) -> Result<(), VolumeError> {
    check(v)?;
    let w = Writer {
        volume: &v.name,
        root,
    };
    let root_entry = &v.entries[0];
    if kind(root_entry) == Some(EntryKind::File) {
        return w.file_in_place(root_entry);
    }
    let kinds: std::collections::HashMap<&str, EntryKind> = v
        .entries
        .iter()
        .filter_map(|e| Some((e.path.as_str(), kind(e)?)))
        .collect();
    // Directories and files; then links into them; then links through
    // other links (kubelet's `key -> ..data/key` after `..data`).
    for e in &v.entries {
        match kind(e) {
            Some(EntryKind::Dir) => w.dir(e)?,
            Some(EntryKind::File) => w.file(e)?,
            _ => {}
        }
    }
    let through_link = |e: &VolumeEntry| {
        let at = Path::new(&e.path).parent().unwrap_or(Path::new(""));
        let first = at.join(e.target.split('/').next().unwrap_or(""));
        kinds.get(first.to_string_lossy().as_ref()) == Some(&EntryKind::Symlink)
    };
    for later in [false, true] {
        for e in &v.entries {
            if kind(e) == Some(EntryKind::Symlink) && through_link(e) == later {
                w.link(e)?;
            }
        }
    }
    let keep: HashSet<PathBuf> = v.entries.iter().map(|e| PathBuf::from(&e.path)).collect();
    w.prune(root, Path::new(""), &keep)
}

/// Where a container's volume `v` lives: under its state directory `dir`,
/// (shared) under the pod's directory `pod_dir`, or (host) in the shared
/// file system.
pub fn root(dir: &Path, pod_dir: &Path, v: &Volume) -> PathBuf {
    if v.host {
        Path::new(SHARE_MOUNT).join(&v.name)
    } else if v.shared {
        pod_dir.join(&v.name)
    } else {
        copied_root(dir, &v.name)
    }
}

/// Where a container whose state directory is `dir` keeps its copy of
/// volume `name`.
pub fn copied_root(dir: &Path, name: &str) -> PathBuf {
    dir.join("volumes").join(name)
}

/// Mounts the VM's shared file system at [`SHARE_MOUNT`] unless it is
/// (never in a template: the host attaches its server after the fork, with
/// the pod's first host directory). nodev and nosuid: what a host
/// directory holds is not the guest's to trust (the host refuses device
/// nodes and set-ID bits too).
fn mount_share(volume: &str) -> Result<(), VolumeError> {
    static MOUNTED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut mounted = MOUNTED.lock().unwrap_or_else(|p| p.into_inner());
    if *mounted {
        return Ok(());
    }
    let os = |what: &str| {
        let what = what.to_string();
        move |source| VolumeError::Os {
            volume: volume.into(),
            what,
            source,
        }
    };
    std::fs::create_dir_all(SHARE_MOUNT).map_err(os("create the share's mount point"))?;
    super::mounts::mount_raw(
        SHARE_TAG,
        Path::new(SHARE_MOUNT),
        "virtiofs",
        libc::MS_NODEV | libc::MS_NOSUID,
        "",
    )
    .map_err(os("mount the VM's shared file system"))?;
    *mounted = true;
    Ok(())
}

/// Writes the volumes of a container whose state directory is `dir` (a
/// shared one only if the pod has none of that name yet) and points the
/// mounts that name them there.
pub fn place(
    volumes: &[Volume],
    dir: &Path,
    pod_dir: &Path,
    mounts: &mut [super::spec::MountSpec],
) -> Result<(), VolumeError> {
    for v in volumes {
        check(v)?;
        let at = root(dir, pod_dir, v);
        if v.host {
            mount_share(&v.name)?;
            // The host adds the directory before it sends the create.
            if !std::fs::metadata(&at).is_ok_and(|m| m.is_dir()) {
                return Err(VolumeError::Invalid {
                    volume: v.name.clone(),
                    why: format!("the host shares no directory at {}", at.display()),
                });
            }
            continue;
        }
        if v.shared && std::fs::symlink_metadata(&at).is_ok() {
            continue;
        }
        let os = |what: String| {
            move |source| VolumeError::Os {
                volume: v.name.clone(),
                what,
                source,
            }
        };
        if let Some(parent) = at.parent() {
            std::fs::create_dir_all(parent).map_err(os(format!("create {}", parent.display())))?;
        }
        if v.shared && v.size_bytes > 0 {
            // Sized as the host's (kubelet's sizeLimit of a Memory emptyDir).
            std::fs::create_dir(&at).map_err(os(format!("create {}", at.display())))?;
            let data = format!("size={}", v.size_bytes);
            super::mounts::mount_raw(
                "tmpfs",
                &at,
                "tmpfs",
                libc::MS_NOSUID | libc::MS_NODEV,
                &data,
            )
            .map_err(os(format!("mount a tmpfs on {}", at.display())))?;
        }
        write(&at, v)?;
    }
    for m in mounts {
        let Some(name) = m
            .source
            .strip_prefix(zygote_agent_api::volumes::VOLUME_SOURCE)
        else {
            continue;
        };
        let v = volumes
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| VolumeError::Invalid {
                volume: name.into(),
                why: format!("mounted at {} but not sent", m.destination.display()),
            })?;
        m.source = root(dir, pod_dir, v).to_string_lossy().into_owned();
    }
    Ok(())
}

/// Reads up to `max` bytes of the file volume at `root`.
pub fn read(root: &Path, name: &str, max: u32) -> Result<Vec<u8>, VolumeError> {
    use std::io::Read;
    let os = |what: &str| {
        let what = format!("{what} {}", root.display());
        move |source| VolumeError::Os {
            volume: name.into(),
            what,
            source,
        }
    };
    let file = std::fs::File::open(root).map_err(os("open"))?;
    if !file.metadata().map_err(os("stat"))?.is_file() {
        return Err(VolumeError::Invalid {
            volume: name.into(),
            why: "not a file volume".into(),
        });
    }
    let mut data = Vec::new();
    file.take(u64::from(max))
        .read_to_end(&mut data)
        .map_err(os("read"))?;
    Ok(data)
}

#[cfg(test)]
mod tests;
