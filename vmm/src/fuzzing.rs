//! Entry points for the fuzz targets (`fuzz/`, feature `fuzzing`): what a
//! guest controls, taken from arbitrary bytes.
//!
//! A device target's input is the start of the guest's memory. Its split
//! virtqueues sit at the front, so that short inputs reach them: queue `i`
//! has its 16-entry descriptor table at `i * 0x300`, its available ring 0x100
//! after that and its used ring 0x200 after; everything else (and what the
//! descriptors point at) is the rest of the input, then zeros. Each run gets
//! fresh memory and fresh device state, as a fork of a template does.
//! (`fuzz/seeds.py` writes seeds in this layout.)

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::{Interrupt, block, fs, net, rng};
use crate::vstate::memory::GuestMemoryMmap;

/// Guest memory of each run.
pub const MEMORY: usize = 256 << 10;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 16;
/// Bytes of input each queue's rings take.
pub const QUEUE_SPAN: u64 = 0x300;

/// Guest memory holding `data` from address 0.
fn memory(data: &[u8]) -> Option<GuestMemoryMmap> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY)]).ok()?;
    let len = data.len().min(MEMORY);
    mem.write_slice(&data[..len], GuestAddress(0)).ok()?;
    Some(mem)
}

/// Queue `index` of the layout above, ready as a driver leaves it.
fn queue(index: u64) -> Queue {
    let base = index * QUEUE_SPAN;
    let mut q = Queue::new(QUEUE_SIZE).expect("a valid queue size");
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some((base + 0x100) as u32), Some(0));
    q.set_used_ring_address(Some((base + 0x200) as u32), Some(0));
    q.set_ready(true);
    q
}

/// virtio-rng: the guest's buffers filled.
pub fn rng(data: &[u8]) {
    let Some(mem) = memory(data) else { return };
    rng::fuzz_requests(&mem, &mut queue(0));
}

/// virtio-block: reads, writes (refused: the image is read-only), flushes,
/// IDs and unknown requests over a 64 KiB image.
pub fn block(data: &[u8]) {
    static IMAGE: OnceLock<std::fs::File> = OnceLock::new();
    let image = IMAGE.get_or_init(|| {
        let path = scratch("block-image");
        let mut f = std::fs::File::create(&path).expect("a scratch image");
        f.write_all(&[0x5a; 64 << 10])
            .expect("the scratch image written");
        std::fs::File::open(&path).expect("the scratch image")
    });
    let Some(mem) = memory(data) else { return };
    block::fuzz_requests(&mem, &mut queue(0), image, 128);
}

/// virtio-net: the transmit queue (queue 1) read, then a frame (the input's
/// last 1514 bytes at most) delivered to the receive queue (queue 0);
/// mergeable buffers when the input's first byte is odd.
pub fn net(data: &[u8]) {
    let Some(mem) = memory(data) else { return };
    let frame = &data[data.len().saturating_sub(1514)..];
    let mergeable = data.first().is_some_and(|b| b & 1 == 1);
    net::fuzz_queues(&mem, vec![queue(0), queue(1)], frame, mergeable);
}

/// virtio-fs: FUSE requests against a scratch directory shared read-write
/// (the server and its open nodes live across runs, as in a pod's VM).
pub fn fs(data: &[u8]) {
    type Share = Arc<Mutex<Option<fs::server::FsServer>>>;
    static SERVER: OnceLock<Share> = OnceLock::new();
    let share = SERVER.get_or_init(|| {
        let dir = scratch("fs-share");
        let _ = std::fs::create_dir_all(dir.join("sub"));
        let _ = std::fs::write(dir.join("file"), b"zygote");
        let mut server = fs::server::FsServer::new().expect("a FUSE server");
        server.add("data", &dir, false).expect("the scratch share");
        Arc::new(Mutex::new(Some(server)))
    });
    let Some(mem) = memory(data) else { return };
    fs::fuzz_requests(&mem, &mut queue(0), share);
}

/// vsock: the guest's transmit queue (queue 1: packets to no connection,
/// connects to host ports nobody listens on, credit requests, floods), then
/// the device's answers into the receive queue (queue 0).
pub fn vsock(data: &[u8]) {
    static N: AtomicU64 = AtomicU64::new(0);
    let Some(mem) = memory(data) else { return };
    let path = scratch(&format!("vsock-{}", N.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_file(&path);
    let Ok(listener) = std::os::unix::net::UnixListener::bind(&path) else {
        return;
    };
    let Ok(irq) = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let interrupt = Arc::new(Interrupt::new(irq));
    let queues = vec![queue(0), queue(1), queue(2)];
    if let Ok(mut backend) = crate::devices::virtio::vsock::VsockBackend::new(
        3,
        path.clone(),
        listener,
        mem,
        queues,
        interrupt,
    ) {
        backend.process_tx();
        backend.process_rx();
    }
    let _ = std::fs::remove_file(&path);
}

/// A template's machine state, as read back from its state file (after
/// the file's own checks: magic, version, length, checksum).
pub fn machine_state(data: &[u8]) {
    let _ = postcard::from_bytes::<crate::snapshot::MachineState>(data);
}

/// A path for this process's scratch files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zygote-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir.join(name)
}
