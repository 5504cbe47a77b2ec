//! The block device model and its requests.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::{MAX_REQUEST, QUEUE_SIZE, SECTOR_SIZE, VIRTIO_BLK_F_RO, VIRTIO_ID_BLOCK};
use crate::devices::virtio::{ActivateArgs, ActivateError, DeviceState, QueueWorker, VirtioDevice};
use crate::vstate::memory::GuestMemoryMmap;

const REQ_IN: u32 = 0;
const REQ_OUT: u32 = 1;
const REQ_FLUSH: u32 = 4;
const REQ_GET_ID: u32 = 8;
const STATUS_OK: u8 = 0;
const STATUS_IOERR: u8 = 1;
const STATUS_UNSUPP: u8 = 2;
/// Length of the id string `GET_ID` returns.
const ID_LEN: usize = 20;

/// Errors opening the image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened or examined.
    #[error("cannot open disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The image is empty or not a whole number of sectors.
    #[error("disk image {path} is {len} bytes: not a positive multiple of 512")]
    Size {
        /// The image.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// An image was put in a slot that holds one.
    #[error("disk slot {serial} holds {path}; cannot put {wanted} in it")]
    Occupied {
        /// The slot.
        serial: String,
        /// What it holds.
        path: PathBuf,
        /// What was to go in.
        wanted: PathBuf,
    },
    /// No disk slot of that name.
    #[error("no disk slot {0}")]
    NoSlot(String),
    /// A snapshot saved a slot with an image in it (slots are empty in a template).
    #[error("disk slot {0} held an image when the snapshot was taken")]
    SlotInUse(String),
    /// A restored disk is not the size the snapshot saw.
    #[error("disk image {path} is {found} bytes; the snapshot had {expected}")]
    Changed {
        /// The image.
        path: PathBuf,
        /// Saved length.
        expected: u64,
        /// Current length.
        found: u64,
    },
}

/// The image behind a disk: none for an empty slot.
#[derive(Debug, Default)]
pub(super) struct Backing {
    pub(super) path: PathBuf,
    pub(super) file: Option<File>,
    /// Size in sectors (0: empty).
    pub(super) capacity: u64,
}

impl Backing {
    fn open(path: &Path) -> Result<Backing, BlockError> {
        let open = |source| BlockError::Open {
            path: path.into(),
            source,
        };
        let file = File::open(path).map_err(open)?;
        let len = file.metadata().map_err(open)?.len();
        if len == 0 || len % SECTOR_SIZE != 0 {
            return Err(BlockError::Size {
                path: path.into(),
                len,
            });
        }
        Ok(Backing {
            path: path.into(),
            file: Some(file),
            capacity: len / SECTOR_SIZE,
        })
    }
}

/// The id (`GET_ID`, the guest's `/sys/block/vdX/serial`) of the image
/// disk a VM boots with.
pub const IMAGE_SERIAL: &str = "zygote-ro";

/// The id of empty slot `n`.
pub fn slot_serial(n: u8) -> String {
    format!("zygote-slot{n}")
}

/// A read-only virtio-blk device backed by an image file, or an empty slot
/// (capacity 0) that an image can be put in while the guest runs: virtio-mmio
/// has no hotplug, so a VM that may need more disks is made with slots, and
/// the guest sees a slot's capacity change (a configuration interrupt).
#[derive(Debug)]
pub struct Block {
    pub(super) backing: Arc<Mutex<Backing>>,
    pub(super) serial: String,
    pub(super) acked_features: u64,
    worker: QueueWorker,
}

impl Block {
    /// Opens `path` read-only as a disk.
    pub fn new(path: &Path) -> Result<Self, BlockError> {
        Ok(Block {
            backing: Arc::new(Mutex::new(Backing::open(path)?)),
            serial: IMAGE_SERIAL.into(),
            acked_features: 0,
            worker: QueueWorker::default(),
        })
    }

    /// Empty slot `serial` (capacity 0).
    pub fn slot(serial: &str) -> Self {
        Block {
            backing: Arc::default(),
            serial: serial.into(),
            acked_features: 0,
            worker: QueueWorker::default(),
        }
    }

    fn backing(&self) -> std::sync::MutexGuard<'_, Backing> {
        self.backing.lock().expect("block backing lock")
    }

    /// The image (empty for an empty slot).
    pub fn path(&self) -> PathBuf {
        self.backing().path.clone()
    }

    /// Size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.backing().capacity
    }

    /// Its id.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Puts image `path` in this empty slot, or (None) empties it. The
    /// caller tells the driver (a configuration change).
    pub fn set_image(&mut self, path: Option<&Path>) -> Result<(), BlockError> {
        let mut backing = self.backing();
        match path {
            Some(path) if backing.file.is_some() => Err(BlockError::Occupied {
                serial: self.serial.clone(),
                path: backing.path.clone(),
                wanted: path.into(),
            }),
            Some(path) => {
                *backing = Backing::open(path)?;
                Ok(())
            }
            None => {
                *backing = Backing::default();
                Ok(())
            }
        }
    }
}

/// Serves every available request; returns whether any was completed.
pub(super) fn process_requests(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    backing: &Backing,
    serial: &str,
    buf: &mut Vec<u8>,
) -> bool {
    let mut used = false;
    while let Some(chain) = queue.iter(mem).ok().and_then(|mut it| it.next()) {
        let head = chain.head_index();
        let written = handle(mem, chain, backing, serial, buf);
        if queue.add_used(mem, head, written).is_err() {
            break;
        }
        used = true;
    }
    used
}

/// Handles one request; returns the bytes written to the guest (data + status).
fn handle(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    backing: &Backing,
    serial: &str,
    buf: &mut Vec<u8>,
) -> u32 {
    let capacity = backing.capacity;
    let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem)) else {
        tracing::debug!("block: malformed request chain");
        return 0;
    };
    let mut header = [0u8; 16];
    if reader.read_exact(&mut header).is_err() || writer.available_bytes() == 0 {
        tracing::debug!("block: request without header or status");
        return 0;
    }
    let kind = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
    // The last writable byte is the status; everything before it is data.
    let data_len = (writer.available_bytes() - 1) as u64;
    let mut data_written = 0u64;
    let status = match kind {
        REQ_IN => {
            let start = sector.checked_mul(SECTOR_SIZE);
            let end = start.and_then(|s| s.checked_add(data_len));
            match (&backing.file, start, end) {
                (Some(file), Some(start), Some(end))
                    if end <= capacity * SECTOR_SIZE && data_len <= MAX_REQUEST =>
                {
                    let mut status = STATUS_OK;
                    let mut off = start;
                    while off < end {
                        let n = (end - off).min(64 << 10) as usize;
                        buf.resize(n, 0);
                        if file.read_exact_at(&mut buf[..n], off).is_err()
                            || writer.write_all(&buf[..n]).is_err()
                        {
                            status = STATUS_IOERR;
                            break;
                        }
                        data_written += n as u64;
                        off += n as u64;
                    }
                    status
                }
                _ => STATUS_IOERR,
            }
        }
        REQ_GET_ID => {
            let mut id = [0u8; ID_LEN];
            let name = serial.as_bytes();
            let len = name.len().min(ID_LEN);
            id[..len].copy_from_slice(&name[..len]);
            let n = (data_len as usize).min(ID_LEN);
            if writer.write_all(&id[..n]).is_ok() {
                data_written = n as u64;
                STATUS_OK
            } else {
                STATUS_IOERR
            }
        }
        // A read-only disk: nothing to write or flush.
        REQ_OUT => STATUS_IOERR,
        REQ_FLUSH => STATUS_OK,
        _ => STATUS_UNSUPP,
    };
    finish(writer, data_len, data_written, status)
}

/// Writes `status` into the last byte (after the data written); the bytes
/// written to the guest.
fn finish(
    mut writer: virtio_queue::Writer<'_>,
    data_len: u64,
    data_written: u64,
    status: u8,
) -> u32 {
    // Skip unwritten data bytes so the status lands in the last byte.
    let skip = data_len - data_written;
    if skip > 0 {
        let mut split = writer.split_at(skip as usize).ok();
        if let Some(status_writer) = split.as_mut() {
            let _ = status_writer.write_all(&[status]);
        }
    } else {
        let _ = writer.write_all(&[status]);
    }
    (data_written + 1) as u32
}

impl Drop for Block {
    fn drop(&mut self) {
        self.reset();
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_BLK_F_RO
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Configuration space: le64 capacity (sectors); nothing else is offered.
        let capacity = self.capacity();
        crate::devices::virtio::read_config_bytes(&capacity.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError> {
        let (backing, serial) = (self.backing.clone(), self.serial.clone());
        let mut buf = Vec::new();
        self.worker.start("block", args, move |mem, q| {
            let backing = backing.lock().expect("block backing lock");
            process_requests(mem, q, &backing, &serial, &mut buf)
        })
    }

    fn reset(&mut self) {
        self.worker.stop();
    }

    fn quiesce(&mut self) -> Option<Vec<Queue>> {
        self.worker.quiesce()
    }

    fn state(&self) -> DeviceState {
        DeviceState::Block(crate::persist::Persist::save(self))
    }

    fn as_block(&mut self) -> Option<&mut Block> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{NEXT, TestQueue, WRITE, test_memory};
    use vm_memory::{Bytes, GuestAddress};

    const HDR: u64 = 0x40000;
    const DATA: u64 = 0x41000;
    const STATUS: u64 = 0x48000;

    fn image(tag: &str, sectors: u64) -> PathBuf {
        let p = std::env::temp_dir().join(format!("zygote-blk-{tag}-{}", std::process::id()));
        let bytes: Vec<u8> = (0..sectors * SECTOR_SIZE)
            .map(|i| (i / SECTOR_SIZE) as u8)
            .collect();
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Publishes header + data (len) + status as one chain at `head`.
    fn request(
        mem: &GuestMemoryMmap,
        q: &mut TestQueue,
        head: u16,
        kind: u32,
        sector: u64,
        len: u32,
    ) {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        q.desc(mem, head, HDR, 16, NEXT, head + 1);
        q.desc(mem, head + 1, DATA, len, WRITE | NEXT, head + 2);
        q.desc(mem, head + 2, STATUS, 1, WRITE, 0);
        q.publish(mem, head);
    }

    #[test]
    fn reads_refuses_writes_and_bad_ranges() {
        let path = image("rw", 8);
        let dev = Block::new(&path).unwrap();
        assert_eq!(dev.capacity(), 8);
        let mut cap = [0u8; 8];
        dev.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mem = test_memory();
        let mut tq = TestQueue::new(0x10000, 16);
        let mut q = tq.queue();
        let mut buf = Vec::new();
        let status = || mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap();

        request(&mem, &mut tq, 0, REQ_IN, 3, 1024);
        assert!(process_requests(
            &mem,
            &mut q,
            &dev.backing(),
            &dev.serial,
            &mut buf
        ));
        assert_eq!(status(), STATUS_OK);
        let mut got = [0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got[..512].iter().all(|&b| b == 3) && got[512..].iter().all(|&b| b == 4));
        assert_eq!(tq.used_elem(&mem, 0), (0, 1025));

        request(&mem, &mut tq, 3, REQ_IN, 7, 1024); // past the end
        process_requests(&mem, &mut q, &dev.backing(), &dev.serial, &mut buf);
        assert_eq!(status(), STATUS_IOERR);
        request(&mem, &mut tq, 6, REQ_IN, u64::MAX / 2, 512); // overflowing sector
        process_requests(&mem, &mut q, &dev.backing(), &dev.serial, &mut buf);
        assert_eq!(status(), STATUS_IOERR);

        // A write: header + data (device-readable) + status.
        mem.write_slice(
            &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            GuestAddress(HDR),
        )
        .unwrap();
        tq.desc(&mem, 9, HDR, 16, NEXT, 10);
        tq.desc(&mem, 10, DATA, 512, NEXT, 11);
        tq.desc(&mem, 11, STATUS, 1, WRITE, 0);
        tq.publish(&mem, 9);
        process_requests(&mem, &mut q, &dev.backing(), &dev.serial, &mut buf);
        assert_eq!(status(), STATUS_IOERR, "read-only");
        assert_eq!(std::fs::read(&path).unwrap()[3 * 512], 3, "image untouched");

        request(&mem, &mut tq, 12, 99, 0, 16);
        process_requests(&mem, &mut q, &dev.backing(), &dev.serial, &mut buf);
        assert_eq!(status(), STATUS_UNSUPP);

        // No header at all: returned empty, nothing written.
        tq.desc(&mem, 15, STATUS, 1, WRITE, 0);
        tq.publish(&mem, 15);
        process_requests(&mem, &mut q, &dev.backing(), &dev.serial, &mut buf);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_slot_is_empty_until_an_image_is_put_in_it() {
        let path = std::env::temp_dir().join(format!("zygote-blk-slot-{}", std::process::id()));
        std::fs::write(&path, vec![5u8; 4096]).unwrap();
        let mut dev = Block::slot(&slot_serial(1));
        let capacity = |dev: &Block| {
            let mut cap = [0u8; 8];
            dev.read_config(0, &mut cap);
            u64::from_le_bytes(cap)
        };
        assert_eq!(capacity(&dev), 0);
        let mem = test_memory();
        let mut tq = TestQueue::new(0x10000, 16);
        let mut q = tq.queue();
        let mut buf = Vec::new();
        let status = || mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap();
        request(&mem, &mut tq, 0, REQ_IN, 0, 512);
        process_requests(&mem, &mut q, &dev.backing(), &dev.serial, &mut buf);
        assert_eq!(status(), STATUS_IOERR, "an empty slot has nothing to read");
        // Its id names the slot.
        request(&mem, &mut tq, 3, REQ_GET_ID, 0, ID_LEN as u32);
        process_requests(&mem, &mut q, &dev.backing(), &dev.serial, &mut buf);
        let mut id = [0u8; ID_LEN];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..12], b"zygote-slot1");

        dev.set_image(Some(&path)).unwrap();
        assert_eq!(capacity(&dev), 8);
        request(&mem, &mut tq, 6, REQ_IN, 1, 512);
        process_requests(&mem, &mut q, &dev.backing(), &dev.serial, &mut buf);
        assert_eq!(status(), STATUS_OK);
        assert!(matches!(
            dev.set_image(Some(&path)),
            Err(BlockError::Occupied { .. })
        ));
        dev.set_image(None).unwrap();
        assert_eq!((capacity(&dev), dev.path()), (0, PathBuf::new()));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bad_images_are_refused() {
        let odd = std::env::temp_dir().join(format!("zygote-blk-odd-{}", std::process::id()));
        std::fs::write(&odd, [0u8; 100]).unwrap();
        assert!(matches!(
            Block::new(&odd),
            Err(BlockError::Size { len: 100, .. })
        ));
        std::fs::write(&odd, []).unwrap();
        assert!(matches!(
            Block::new(&odd),
            Err(BlockError::Size { len: 0, .. })
        ));
        std::fs::remove_file(&odd).unwrap();
        assert!(matches!(
            Block::new(Path::new("/nonexistent.img")),
            Err(BlockError::Open { .. })
        ));
    }
}
