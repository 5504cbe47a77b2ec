//! FUSE requests through the device's queue, as the guest's driver puts
//! them there: the request readable, the reply's buffer writable.

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::test_utils::{NEXT, TestQueue, WRITE, test_memory};

const REQ: u64 = 0x40000;
const REPLY: u64 = 0x50000;

/// FUSE_INIT (7.31) as bytes.
fn init_request() -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&56u32.to_le_bytes()); // len: header + init_in
    r.extend_from_slice(&26u32.to_le_bytes()); // FUSE_INIT
    r.extend_from_slice(&9u64.to_le_bytes()); // unique
    r.extend_from_slice(&[0; 24]); // nodeid, uid, gid, pid, padding
    for v in [7u32, 31, 0x20000, 0] {
        r.extend_from_slice(&v.to_le_bytes());
    }
    r
}

/// FUSE_GETATTR of the root: a reply of 16 + 104 bytes.
fn getattr_request() -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&56u32.to_le_bytes()); // len: header + getattr_in
    r.extend_from_slice(&3u32.to_le_bytes()); // FUSE_GETATTR
    r.extend_from_slice(&10u64.to_le_bytes()); // unique
    r.extend_from_slice(&1u64.to_le_bytes()); // nodeid: the root
    r.extend_from_slice(&[0; 16]); // uid, gid, pid, padding
    r.extend_from_slice(&[0; 16]); // getattr_flags, dummy, fh
    r
}

/// Puts `request` at REQ with a `reply_len`-byte reply buffer at REPLY as
/// chain `head`, serves the queue; the used length and the reply's errno.
fn round(share: &Share, request: &[u8], reply_len: u32) -> (u32, i32) {
    let mem = test_memory();
    mem.write_slice(request, GuestAddress(REQ)).unwrap();
    let mut tq = TestQueue::new(0x10000, 16);
    tq.desc(&mem, 0, REQ, request.len() as u32, NEXT, 1);
    tq.desc(&mem, 1, REPLY, reply_len, WRITE, 0);
    tq.publish(&mem, 0);
    let mut q = tq.queue();
    assert!(serve_requests(&mem, &mut q, share));
    let (head, used) = tq.used_elem(&mem, 0);
    assert_eq!(head, 0);
    let mut error = [0u8; 4];
    mem.read_slice(&mut error, GuestAddress(REPLY + 4)).unwrap();
    (used, -i32::from_le_bytes(error))
}

#[test]
fn a_request_is_answered_from_the_attached_share_only() {
    let dir = std::env::temp_dir().join(format!("zygote-fsdev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fs = Fs::new("share").unwrap();
    // No share yet (a template's device): the request fails, nothing served.
    let (used, errno) = round(&fs.share, &init_request(), 4096);
    assert_eq!((used, errno), (16, libc::ENODEV));
    fs.add_share("d", &dir, false).unwrap();
    let (used, errno) = round(&fs.share, &init_request(), 4096);
    assert_eq!(errno, 0);
    assert!(used > 16, "an INIT reply: {used} bytes");
    // A reply that does not fit the driver's buffer: an error that does.
    assert_eq!(round(&fs.share, &getattr_request(), 4096), (120, 0));
    let (used, errno) = round(&fs.share, &getattr_request(), 20);
    assert_eq!((used, errno), (16, libc::EIO));
    fs.detach();
    assert_eq!(round(&fs.share, &init_request(), 4096).1, libc::ENODEV);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn malformed_chains_are_returned_empty() {
    let fs = Fs::new("share").unwrap();
    let mem = test_memory();
    let mut tq = TestQueue::new(0x10000, 16);
    // Out of guest memory; a loop; too short for a header.
    tq.desc(&mem, 0, 0xffff_0000, 4096, 0, 0);
    tq.publish(&mem, 0);
    tq.desc(&mem, 1, REQ, 8, NEXT, 2);
    tq.desc(&mem, 2, REQ + 8, 8, NEXT, 1);
    tq.publish(&mem, 1);
    tq.desc(&mem, 3, REQ, 8, 0, 0);
    tq.publish(&mem, 3);
    let mut q = tq.queue();
    serve_requests(&mem, &mut q, &fs.share);
    assert_eq!(tq.used_elem(&mem, 0), (0, 0));
    assert!(tq.used_idx(&mem) >= 2);
    assert!(Fs::new("").is_err() && Fs::new(&"t".repeat(37)).is_err());
}

#[test]
fn the_config_names_the_tag_and_one_request_queue() {
    let fs = Fs::new("zygote-hostpath").unwrap();
    let mut config = [0u8; 40];
    fs.read_config(0, &mut config);
    assert_eq!(&config[..15], b"zygote-hostpath");
    assert!(config[15..36].iter().all(|b| *b == 0));
    assert_eq!(u32::from_le_bytes(config[36..40].try_into().unwrap()), 1);
    assert_eq!(fs.queue_max_sizes().len(), 2);
}
