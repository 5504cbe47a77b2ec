//! The FUSE server behind a virtio-fs device: host directories shared
//! with the guest, each served by `fuse-backend-rs`'s `PassthroughFs` and
//! mounted by name at the top of one `Vfs` (a pseudo directory whose
//! entries are the shares: `/NAME` in the guest's mount is share `NAME`).
//!
//! Each request is handled from a copy of the guest's bytes into a reply
//! buffer (the crate's `/dev/fuse` transport over a bounce buffer): the
//! crate's virtio-fs transport is tied to other `vm-memory`/`virtio-queue`
//! versions than this VMM's, and one copy each way keeps the two apart.
//!
//! Everything in a request is the guest's: before the file system sees it,
//! requests that could make device nodes are refused (`mknod` always; on
//! a read-only share, every request that writes — the share is the one
//! the request's node belongs to, from the `Vfs` index in its top byte)
//! and set-ID bits are cleared from the modes it gives files, so the host
//! side enforces what the guest's mount options (nodev, nosuid, ro) only
//! ask for. `PassthroughFs` resolves every name relative to the directory
//! it already holds open (no `/`, no `..` above its root, no symlink
//! followed on the host) and opens no file by handle.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::{Vfs, VfsOptions};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader, Writer};

/// The largest request or reply, bytes: FUSE's 1 MiB data plus headers.
pub const MAX_MESSAGE: usize = (1 << 20) + 4096;

/// `struct fuse_in_header`: `len`, `opcode`, `unique`, `nodeid`, ...
const IN_HEADER_LEN: usize = 40;
/// `struct fuse_out_header`: `len`, `error`, `unique`.
const OUT_HEADER_LEN: usize = 16;
/// Where `Vfs` keeps a node's share index: its top byte.
const SHARE_INDEX_SHIFT: u32 = 56;
/// Most shares one server holds (`Vfs` has 255 indices).
pub const MAX_SHARES: usize = 64;

/// FUSE opcodes the server looks at itself.
mod op {
    pub const SETATTR: u32 = 4;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const WRITE: u32 = 16;
    pub const SETXATTR: u32 = 21;
    pub const REMOVEXATTR: u32 = 24;
    pub const CREATE: u32 = 35;
    pub const FALLOCATE: u32 = 43;
    pub const RENAME2: u32 = 45;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const SETUPMAPPING: u32 = 48;
    pub const REMOVEMAPPING: u32 = 49;
}

/// Why a share could not be added.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The shared directory cannot be served.
    #[error("cannot share {path}: {source}")]
    Share {
        /// The directory.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The server could not be started.
    #[error("cannot start a FUSE server: {0}")]
    Start(std::io::Error),
    /// A name that is not one plain path component.
    #[error("invalid share name {0:?}: use 1-64 of [A-Za-z0-9_.-], not . or ..")]
    Name(String),
    /// A name already in use.
    #[error("a share named {0} is already served")]
    Taken(String),
    /// No room for another.
    #[error("a VM serves at most {MAX_SHARES} shared directories")]
    Full,
}

/// Whether `name` can name a share: one plain path component.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// The FUSE server of a VM's shared directories.
pub struct FsServer {
    server: Server<Arc<Vfs>>,
    vfs: Arc<Vfs>,
    /// Each share's name and `Vfs` index.
    shares: BTreeMap<String, u8>,
    /// The indices of read-only shares.
    read_only: HashSet<u8>,
    /// Where the crate's transport writes a reply (read back at once).
    sink: std::fs::File,
    reply: Vec<u8>,
}

impl std::fmt::Debug for FsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsServer")
            .field("shares", &self.shares)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl FsServer {
    /// A server with no shares yet (its root is an empty directory).
    pub fn new() -> Result<FsServer, ServerError> {
        // SAFETY: memfd_create with a static name; the fd is owned below.
        let fd = unsafe { libc::memfd_create(c"zygote-fuse-reply".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(ServerError::Start(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd, owned by the File from here.
        let sink = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // Every open and opendir is sent (the read-only check sees them);
        // no writeback cache in the guest: what a container writes is in
        // the host directory when its write returns, as under runc.
        let opts = VfsOptions {
            no_open: false,
            no_opendir: false,
            no_writeback: true,
            ..VfsOptions::default()
        };
        let vfs = Arc::new(Vfs::new(opts));
        Ok(FsServer {
            server: Server::new(vfs.clone()),
            vfs,
            shares: BTreeMap::new(),
            read_only: HashSet::new(),
            sink,
            reply: vec![0; MAX_MESSAGE],
        })
    }

    /// Serves `dir` as `/NAME` of the guest's mount (read-only on the host
    /// side too if `read_only`). A share stays until the server is dropped:
    /// the guest may hold its nodes, and a reused index would alias them.
    pub fn add(&mut self, name: &str, dir: &Path, read_only: bool) -> Result<(), ServerError> {
        if !valid_name(name) {
            return Err(ServerError::Name(name.into()));
        }
        if self.shares.contains_key(name) {
            return Err(ServerError::Taken(name.into()));
        }
        if self.shares.len() >= MAX_SHARES {
            return Err(ServerError::Full);
        }
        let share = |source: std::io::Error| ServerError::Share {
            path: dir.display().to_string(),
            source,
        };
        if !std::fs::metadata(dir).map_err(share)?.is_dir() {
            return Err(share(std::io::Error::from_raw_os_error(libc::ENOTDIR)));
        }
        let cfg = Config {
            root_dir: dir.to_string_lossy().into_owned(),
            do_import: false,
            xattr: false,
            writeback: false,
            cache_policy: CachePolicy::Auto,
            ..Default::default()
        };
        let fs = PassthroughFs::<()>::new(cfg).map_err(share)?;
        fs.import().map_err(share)?;
        let index = self
            .vfs
            .mount(Box::new(fs), &format!("/{name}"))
            .map_err(|e| share(std::io::Error::other(format!("{e:?}"))))?;
        self.shares.insert(name.into(), index);
        if read_only {
            self.read_only.insert(index);
        }
        Ok(())
    }

    /// The shares' names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.shares.keys().map(String::as_str)
    }

    /// Handles one request (`request`: the guest's bytes, a FUSE in-header
    /// and its arguments); returns the reply's bytes (empty when the
    /// request has none, e.g. FORGET). A request the server refuses gets a
    /// FUSE error reply.
    pub fn handle(&mut self, request: &mut [u8]) -> Vec<u8> {
        if request.len() < IN_HEADER_LEN {
            return Vec::new();
        }
        let word = |at: usize| u32::from_le_bytes(request[at..at + 4].try_into().expect("4 bytes"));
        let (opcode, unique) = (
            word(4),
            u64::from_le_bytes(request[8..16].try_into().expect("8 bytes")),
        );
        if let Some(errno) = self.refused(opcode, request) {
            return error_reply(unique, errno);
        }
        no_set_id_bits(opcode, request);
        let handled = (|| {
            let reader =
                Reader::<()>::from_fuse_buffer(FuseBuf::new(request)).map_err(|_| libc::EINVAL)?;
            let writer = FuseDevWriter::<()>::new(self.sink.as_raw_fd(), &mut self.reply)
                .map_err(|_| libc::EINVAL)?;
            self.sink.set_len(0).map_err(|_| libc::EIO)?;
            self.sink.seek(SeekFrom::Start(0)).map_err(|_| libc::EIO)?;
            self.server
                .handle_message(reader, Writer::FuseDev(writer), None, None)
                .map_err(|_| libc::EIO)?;
            let mut out = Vec::new();
            self.sink.seek(SeekFrom::Start(0)).map_err(|_| libc::EIO)?;
            (&self.sink)
                .take(MAX_MESSAGE as u64)
                .read_to_end(&mut out)
                .map_err(|_| libc::EIO)?;
            Ok::<_, i32>(out)
        })();
        match handled {
            Ok(out) => out,
            Err(errno) => error_reply(unique, errno),
        }
    }

    /// The errno a request is refused with before the file system sees it.
    fn refused(&self, opcode: u32, request: &[u8]) -> Option<i32> {
        // fuse_in_header.nodeid: the node written, or the directory written in.
        let node = request
            .get(16..24)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        let read_only = self
            .read_only
            .contains(&((node >> SHARE_INDEX_SHIFT) as u8));
        match opcode {
            // No device nodes, FIFOs or sockets made through a share, and no
            // DAX window (this device has none).
            op::MKNOD | op::SETUPMAPPING | op::REMOVEMAPPING => Some(libc::EPERM),
            op::SETATTR
            | op::SYMLINK
            | op::MKDIR
            | op::UNLINK
            | op::RMDIR
            | op::RENAME
            | op::RENAME2
            | op::LINK
            | op::WRITE
            | op::SETXATTR
            | op::REMOVEXATTR
            | op::CREATE
            | op::FALLOCATE
            | op::COPY_FILE_RANGE
                if read_only =>
            {
                Some(libc::EROFS)
            }
            op::OPEN if read_only => {
                // fuse_open_in.flags: the guest's open(2) flags.
                let flags = request
                    .get(IN_HEADER_LEN..IN_HEADER_LEN + 4)
                    .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as i32)?;
                let writes = flags & libc::O_ACCMODE != libc::O_RDONLY
                    || flags & (libc::O_TRUNC | libc::O_CREAT) != 0;
                writes.then_some(libc::EROFS)
            }
            _ => None,
        }
    }
}

/// Clears set-user-ID and set-group-ID in the modes a request gives files
/// (`setattr`, `create`, `mkdir`): a guest must not leave a set-ID program
/// in a host directory for a host user to run (the host side of `nosuid`).
fn no_set_id_bits(opcode: u32, request: &mut [u8]) {
    /// `fuse_setattr_in`: `valid` first, `mode` at 68; FATTR_MODE.
    const SETATTR_MODE: usize = 68;
    const FATTR_MODE: u32 = 1;
    let at = match opcode {
        op::SETATTR => {
            let valid = request
                .get(IN_HEADER_LEN..IN_HEADER_LEN + 4)
                .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
            if valid & FATTR_MODE == 0 {
                return;
            }
            IN_HEADER_LEN + SETATTR_MODE
        }
        // `fuse_create_in`: flags, mode; `fuse_mkdir_in`: mode.
        op::CREATE => IN_HEADER_LEN + 4,
        op::MKDIR => IN_HEADER_LEN,
        _ => return,
    };
    if let Some(b) = request.get_mut(at..at + 4) {
        let mode = u32::from_le_bytes((&*b).try_into().expect("4 bytes"));
        b.copy_from_slice(&(mode & !(libc::S_ISUID | libc::S_ISGID)).to_le_bytes());
    }
}

/// The error reply to `request` (none if it is not even a header).
pub fn refuse(request: &[u8], errno: i32) -> Vec<u8> {
    match request.get(8..16) {
        Some(unique) if request.len() >= IN_HEADER_LEN => error_reply(
            u64::from_le_bytes(unique.try_into().expect("8 bytes")),
            errno,
        ),
        _ => Vec::new(),
    }
}

/// A FUSE reply carrying only `-errno`.
fn error_reply(unique: u64, errno: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(OUT_HEADER_LEN);
    out.extend_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
    out.extend_from_slice(&(-errno).to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
    out
}

#[cfg(test)]
mod tests;
