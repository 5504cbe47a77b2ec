//! Crafted FUSE requests, as a hostile guest could send them, straight to
//! the server.

use super::*;

const ROOT: u64 = 1;
const INIT: u32 = 26;
const LOOKUP: u32 = 1;
const READLINK: u32 = 5;
const READ: u32 = 15;

/// A request: the in-header, then `args`.
fn request(opcode: u32, nodeid: u64, args: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&((IN_HEADER_LEN + args.len()) as u32).to_le_bytes());
    r.extend_from_slice(&opcode.to_le_bytes());
    r.extend_from_slice(&7u64.to_le_bytes()); // unique
    r.extend_from_slice(&nodeid.to_le_bytes());
    r.extend_from_slice(&[0; 16]); // uid, gid, pid, padding
    r.extend_from_slice(args);
    r
}

fn name(n: &str) -> Vec<u8> {
    let mut b = n.as_bytes().to_vec();
    b.push(0);
    b
}

/// The reply's errno (0: success) and its payload.
fn call(s: &mut FsServer, opcode: u32, nodeid: u64, args: &[u8]) -> (i32, Vec<u8>) {
    let mut req = request(opcode, nodeid, args);
    let reply = s.handle(&mut req);
    assert!(reply.len() >= OUT_HEADER_LEN, "a reply: {reply:?}");
    let len = u32::from_le_bytes(reply[0..4].try_into().unwrap()) as usize;
    assert_eq!(len, reply.len(), "the reply's length is its own");
    let error = i32::from_le_bytes(reply[4..8].try_into().unwrap());
    assert_eq!(&reply[8..16], &7u64.to_le_bytes(), "the request's unique");
    (-error, reply[OUT_HEADER_LEN..].to_vec())
}

/// A server past INIT sharing `dir` as `/s`, and the share's node.
fn started(dir: &Path, read_only: bool) -> (FsServer, u64) {
    let mut s = FsServer::new().unwrap();
    s.add("s", dir, read_only).unwrap();
    let mut init = Vec::new();
    for v in [7u32, 31, 0x20000, 0] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    let (errno, _) = call(&mut s, INIT, 0, &init);
    assert_eq!(errno, 0, "INIT");
    let root = lookup(&mut s, ROOT, "s").unwrap();
    (s, root)
}

fn lookup(s: &mut FsServer, parent: u64, n: &str) -> Result<u64, i32> {
    match call(s, LOOKUP, parent, &name(n)) {
        (0, entry) => Ok(u64::from_le_bytes(entry[0..8].try_into().unwrap())),
        (errno, _) => Err(errno),
    }
}

/// OPEN then READ of up to 4096 bytes.
fn read(s: &mut FsServer, node: u64) -> Result<Vec<u8>, i32> {
    let mut open = (libc::O_RDONLY as u32).to_le_bytes().to_vec();
    open.extend_from_slice(&[0; 4]);
    let (errno, out) = call(s, super::op::OPEN, node, &open);
    if errno != 0 {
        return Err(errno);
    }
    let fh = u64::from_le_bytes(out[0..8].try_into().unwrap());
    let mut args = fh.to_le_bytes().to_vec();
    args.extend_from_slice(&0u64.to_le_bytes());
    args.extend_from_slice(&4096u32.to_le_bytes());
    args.extend_from_slice(&[0; 20]);
    match call(s, READ, node, &args) {
        (0, data) => Ok(data),
        (errno, _) => Err(errno),
    }
}

/// A scratch tree: `outside/secret`, `outside/share/a` ("hello"), and in
/// the share a symlink to the secret by absolute path and one by `..`.
fn tree(tag: &str) -> std::path::PathBuf {
    let top = std::env::temp_dir().join(format!("zygote-fs-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&top);
    let share = top.join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(top.join("secret"), "host secret").unwrap();
    std::fs::write(share.join("a"), "hello").unwrap();
    std::os::unix::fs::symlink(top.join("secret"), share.join("abs")).unwrap();
    std::os::unix::fs::symlink("../secret", share.join("rel")).unwrap();
    top
}

#[test]
fn a_share_serves_its_files_and_nothing_above_it() {
    let top = tree("serve");
    let (mut s, root) = started(&top.join("share"), false);
    let a = lookup(&mut s, root, "a").unwrap();
    assert_eq!(read(&mut s, a).unwrap(), b"hello");

    // Names with a slash or a parent step are not walked on the host.
    for bad in ["../secret", "a/../../secret", "/secret"] {
        assert!(lookup(&mut s, root, bad).is_err(), "{bad:?} was looked up");
    }
    // ".." of the root is the root (or refused): never the directory above.
    if let Ok(up) = lookup(&mut s, root, "..") {
        assert_eq!(
            lookup(&mut s, up, "secret"),
            Err(libc::ENOENT),
            "above the share"
        );
    }
    // Symlinks are the guest's to resolve (in its own namespace): the
    // server gives their text and never opens through them.
    for link in ["abs", "rel"] {
        let node = lookup(&mut s, root, link).unwrap();
        let (errno, target) = call(&mut s, READLINK, node, &[]);
        assert_eq!(errno, 0);
        assert!(!target.is_empty());
        match read(&mut s, node) {
            Ok(data) => assert_ne!(data, b"host secret", "{link} was followed on the host"),
            Err(errno) => assert_ne!(errno, 0),
        }
    }
    std::fs::remove_dir_all(&top).unwrap();
}

#[test]
fn device_nodes_are_never_made_and_a_read_only_share_refuses_writes() {
    let top = tree("ro");
    let share = top.join("share");
    let (mut rw, rw_root) = started(&share, false);
    let mut mknod = Vec::new();
    for v in [libc::S_IFCHR | 0o666, libc::makedev(1, 3) as u32, 0, 0] {
        mknod.extend_from_slice(&v.to_le_bytes());
    }
    mknod.extend_from_slice(&name("null"));
    assert_eq!(
        call(&mut rw, super::op::MKNOD, rw_root, &mknod).0,
        libc::EPERM
    );
    assert!(!share.join("null").exists());

    let (mut ro, root) = started(&share, true);
    let a = lookup(&mut ro, root, "a").unwrap();
    assert_eq!(read(&mut ro, a).unwrap(), b"hello", "reads still work");
    let mut open_w = (libc::O_WRONLY as u32).to_le_bytes().to_vec();
    open_w.extend_from_slice(&[0; 4]);
    assert_eq!(call(&mut ro, super::op::OPEN, a, &open_w).0, libc::EROFS);
    let mut create = Vec::new();
    for v in [libc::O_WRONLY as u32 | libc::O_CREAT as u32, 0o644, 0, 0] {
        create.extend_from_slice(&v.to_le_bytes());
    }
    create.extend_from_slice(&name("new"));
    assert_eq!(
        call(&mut ro, super::op::CREATE, root, &create).0,
        libc::EROFS
    );
    let mut mkdir = Vec::new();
    for v in [0o755u32, 0] {
        mkdir.extend_from_slice(&v.to_le_bytes());
    }
    mkdir.extend_from_slice(&name("d"));
    assert_eq!(call(&mut ro, super::op::MKDIR, root, &mkdir).0, libc::EROFS);
    assert_eq!(
        call(&mut ro, super::op::UNLINK, root, &name("a")).0,
        libc::EROFS
    );
    assert!(!share.join("new").exists() && !share.join("d").exists());
    assert_eq!(std::fs::read_to_string(share.join("a")).unwrap(), "hello");
    std::fs::remove_dir_all(&top).unwrap();
}

#[test]
fn malformed_requests_get_errors_not_a_crash() {
    let top = tree("bad");
    let (mut s, root) = started(&top.join("share"), false);
    // Shorter than a header: nothing to answer.
    assert!(s.handle(&mut [0u8; 10]).is_empty());
    // A header claiming more bytes than came, an unknown opcode, a lookup
    // of a node that does not exist, a name without its NUL.
    let mut lying = request(LOOKUP, root, &name("a"));
    lying[0..4].copy_from_slice(&4096u32.to_le_bytes());
    let reply = s.handle(&mut lying);
    assert!(reply.len() >= OUT_HEADER_LEN);
    assert_ne!(call(&mut s, 999, root, &[]).0, 0, "unknown opcode");
    assert!(lookup(&mut s, 0xdead_beef, "a").is_err(), "unknown node");
    assert!(call(&mut s, LOOKUP, root, b"a").0 != 0, "no NUL");
    std::fs::remove_dir_all(&top).unwrap();
}

#[test]
fn files_made_through_a_share_get_no_set_id_bits() {
    use std::os::unix::fs::PermissionsExt;
    let top = tree("setid");
    let share = top.join("share");
    let (mut s, root) = started(&share, false);
    let mut create = Vec::new();
    for v in [
        libc::O_WRONLY as u32 | libc::O_CREAT as u32,
        0o104_755,
        0,
        0,
    ] {
        create.extend_from_slice(&v.to_le_bytes());
    }
    create.extend_from_slice(&name("prog"));
    assert_eq!(call(&mut s, super::op::CREATE, root, &create).0, 0);
    let mode = |p: &str| {
        std::fs::metadata(share.join(p))
            .unwrap()
            .permissions()
            .mode()
    };
    assert_eq!(mode("prog") & 0o7777, 0o755, "created without set-ID");
    // SETATTR of mode 4755 on an existing file.
    let a = lookup(&mut s, root, "a").unwrap();
    let mut setattr = vec![0u8; 88];
    setattr[0..4].copy_from_slice(&1u32.to_le_bytes()); // FATTR_MODE
    setattr[68..72].copy_from_slice(&0o104_755u32.to_le_bytes());
    assert_eq!(call(&mut s, super::op::SETATTR, a, &setattr).0, 0);
    assert_eq!(mode("a") & 0o7777, 0o755, "chmod without set-ID");
    std::fs::remove_dir_all(&top).unwrap();
}

#[test]
fn shares_are_named_apart_and_read_only_is_per_share() {
    let top = tree("two");
    let (rw_dir, ro_dir) = (top.join("share"), top.join("ro"));
    std::fs::create_dir_all(&ro_dir).unwrap();
    std::fs::write(ro_dir.join("b"), "kept").unwrap();
    let (mut s, rw) = started(&rw_dir, false);
    s.add("r", &ro_dir, true).unwrap();
    let ro = lookup(&mut s, ROOT, "r").unwrap();
    assert_ne!(ro >> SHARE_INDEX_SHIFT, rw >> SHARE_INDEX_SHIFT);

    let create = |n: &str| {
        let mut c = Vec::new();
        for v in [libc::O_WRONLY as u32 | libc::O_CREAT as u32, 0o644, 0, 0] {
            c.extend_from_slice(&v.to_le_bytes());
        }
        c.extend_from_slice(&name(n));
        c
    };
    assert_eq!(call(&mut s, super::op::CREATE, rw, &create("new")).0, 0);
    assert!(
        rw_dir.join("new").exists(),
        "the writable share takes writes"
    );
    assert_eq!(
        call(&mut s, super::op::CREATE, ro, &create("new")).0,
        libc::EROFS
    );
    let b = lookup(&mut s, ro, "b").unwrap();
    assert_eq!(
        call(&mut s, super::op::UNLINK, ro, &name("b")).0,
        libc::EROFS
    );
    assert_eq!(read(&mut s, b).unwrap(), b"kept");
    // The top directory holds only the shares: nothing is made in it.
    assert_ne!(call(&mut s, super::op::CREATE, ROOT, &create("x")).0, 0);
    assert_eq!(lookup(&mut s, ROOT, "x"), Err(libc::ENOENT));
    // Names: one plain component, once; a path that is not a directory.
    for bad in ["", ".", "..", "a/b", "x y", &"n".repeat(65)] {
        assert!(
            matches!(s.add(bad, &ro_dir, false), Err(ServerError::Name(_))),
            "{bad:?}"
        );
    }
    assert!(matches!(
        s.add("r", &ro_dir, false),
        Err(ServerError::Taken(_))
    ));
    assert!(matches!(
        s.add("f", &ro_dir.join("b"), false),
        Err(ServerError::Share { .. })
    ));
    assert!(matches!(
        s.add("g", &top.join("missing"), false),
        Err(ServerError::Share { .. })
    ));
    assert_eq!(s.names().collect::<Vec<_>>(), ["r", "s"]);
    std::fs::remove_dir_all(&top).unwrap();
}
