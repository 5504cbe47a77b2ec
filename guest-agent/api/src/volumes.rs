//! Volumes the host copies into the guest: a host file or directory tree
//! (kubelet's configMap, secret, projected and downwardAPI volumes,
//! `/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname`, the termination log)
//! sent whole with `CreateContainer`, replaced by `UpdateVolume` when the
//! host copy changes, and read back by `ReadVolume` (a writable file the
//! container may have written).
//!
//! A volume may also be *shared*: a pod-wide directory made from its
//! entries on first use and kept as the pod's containers leave it
//! (a memory-backed emptyDir, the pod's `/dev/shm`), a tmpfs of the host
//! one's size.
//!
//! Or *on the host*: a host directory (hostPath) the VM's shared file
//! system serves as `NAME` (virtio-fs, tag [`SHARE_TAG`]); the agent mounts
//! that file system at [`SHARE_MOUNT`] on first use (nodev, nosuid) and
//! binds `SHARE_MOUNT/NAME`. Its one entry is the directory; nothing is
//! written.
//!
//! In the spec the agent gets, a mount whose source is
//! [`VOLUME_SOURCE`]`NAME` binds volume `NAME`.

/// The tag of the VM's shared file system (the VMM's device).
pub const SHARE_TAG: &str = "zygote-share";
/// Where the agent mounts it.
pub const SHARE_MOUNT: &str = "/run/zygote/share";

/// Mount source prefix naming a volume.
pub const VOLUME_SOURCE: &str = "zygote-volume:";

/// Whether a link at `at` (a `/`-separated path inside a volume) to
/// `target` stays inside the volume: relative, and never above its root.
/// The host leaves other links out; the agent refuses them.
pub fn link_stays_inside(at: &str, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') {
        return false;
    }
    let mut depth = at.split('/').filter(|p| !p.is_empty()).count() as i64 - 1;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => depth -= 1,
            _ => depth += 1,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// What a [`VolumeEntry`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum EntryKind {
    /// A regular file with `data`.
    File = 0,
    /// A directory.
    Dir = 1,
    /// A symbolic link to `target` (relative, inside the volume).
    Symlink = 2,
}

/// One file, directory or link of a volume.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct VolumeEntry {
    /// Path inside the volume, `/`-separated, relative, no `.` or `..`;
    /// empty for the volume itself (its root directory, or the file a
    /// file volume is).
    #[prost(string, tag = "1")]
    pub path: String,
    /// What it is.
    #[prost(enumeration = "EntryKind", tag = "2")]
    pub kind: i32,
    /// Permission bits (`0o7777` at most).
    #[prost(uint32, tag = "3")]
    pub mode: u32,
    /// Owner.
    #[prost(uint32, tag = "4")]
    pub uid: u32,
    /// Group.
    #[prost(uint32, tag = "5")]
    pub gid: u32,
    /// A file's content.
    #[prost(bytes = "vec", tag = "6")]
    pub data: Vec<u8>,
    /// A link's target.
    #[prost(string, tag = "7")]
    pub target: String,
}

/// A whole volume: its entries, parents before children.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Volume {
    /// Name: 1-64 of `[A-Za-z0-9_.-]`, unique in its container.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Entries; the first is the volume itself (path empty).
    #[prost(message, repeated, tag = "2")]
    pub entries: Vec<VolumeEntry>,
    /// A pod-wide directory (name unique in the pod): made on first use,
    /// then shared as it is.
    #[prost(bool, tag = "3")]
    pub shared: bool,
    /// A host directory served by the shared file system as `NAME`.
    #[prost(bool, tag = "4")]
    pub host: bool,
    /// A shared volume's size: made as a tmpfs of this many bytes (0: a
    /// directory on the guest's `/run`, bounded by the guest's memory).
    #[prost(uint64, tag = "5")]
    pub size_bytes: u64,
}

/// Replace a container's copy of a volume with new content.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct UpdateVolume {
    /// The container.
    #[prost(string, tag = "1")]
    pub id: String,
    /// The volume, whole.
    #[prost(message, optional, tag = "2")]
    pub volume: Option<Volume>,
}

/// Read a file volume's content as the container left it.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ReadVolume {
    /// The container.
    #[prost(string, tag = "1")]
    pub id: String,
    /// The volume (a file volume).
    #[prost(string, tag = "2")]
    pub name: String,
    /// Read at most this many bytes.
    #[prost(uint32, tag = "3")]
    pub max_bytes: u32,
}

/// A file volume's content.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct VolumeData {
    /// The bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
}
