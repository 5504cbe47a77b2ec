//! A host tap device (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`):
//! Ethernet frames with a virtio-net header in front, read and written
//! without blocking.
//!
//! A tap belongs to the network namespace of the thread that created it;
//! zygote creates each pod's in the pod's namespace.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{VNET_HDR_LEN, features};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;
const TUN_F_UFO: libc::c_uint = 0x10;

/// Errors creating or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or not ASCII without `/`.
    #[error("invalid tap name {0:?}")]
    Name(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun")]
    Open(#[source] std::io::Error),
    /// An ioctl on the tap failed.
    #[error("{what} failed on tap {name}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// The tap.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// `struct ifreq` with the fields TUNSETIFF uses.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates (or attaches to) the tap `name` in the calling thread's network
    /// namespace; non-blocking, with a 12-byte virtio-net header.
    pub fn create(name: &str) -> Result<Tap, TapError> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || !name.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
        {
            return Err(TapError::Name(name.into()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let tap = Tap {
            file,
            name: name.into(),
        };
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is
        // laid out as (name, flags, padding to the union's size).
        tap.ioctl("TUNSETIFF", |fd| unsafe {
            libc::ioctl(fd, TUNSETIFF, &mut req)
        })?;
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        tap.ioctl("TUNSETVNETHDRSZ", |fd| unsafe {
            libc::ioctl(fd, TUNSETVNETHDRSZ, &hdr_len)
        })?;
        Ok(tap)
    }

    /// Wraps an fd that is already a tap set up as [`Tap::create`] does
    /// (e.g. one a fork was handed).
    pub fn from_fd(fd: OwnedFd, name: &str) -> Tap {
        Tap {
            file: File::from(fd),
            name: name.into(),
        }
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface's index in the calling thread's network namespace
    /// (the one it was created in, for a caller that made it).
    pub fn index(&self) -> std::io::Result<u32> {
        let name = std::ffi::CString::new(self.name.as_str())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: a NUL-terminated name; if_nametoindex only reads it.
        match unsafe { libc::if_nametoindex(name.as_ptr()) } {
            0 => Err(std::io::Error::last_os_error()),
            index => Ok(index),
        }
    }

    /// Another fd of the same tap.
    pub fn try_clone(&self) -> std::io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// Tells the tap which offloads the guest takes on received frames, from
    /// the virtio features the driver accepted.
    pub fn set_offloads(&self, acked_features: u64) -> Result<(), TapError> {
        let flags = offload_flags(acked_features);
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        self.ioctl("TUNSETOFFLOAD", |fd| unsafe {
            libc::ioctl(fd, TUNSETOFFLOAD, libc::c_ulong::from(flags))
        })
    }

    fn ioctl(
        &self,
        what: &'static str,
        call: impl FnOnce(libc::c_int) -> libc::c_int,
    ) -> Result<(), TapError> {
        if call(self.file.as_raw_fd()) < 0 {
            return Err(TapError::Ioctl {
                what,
                name: self.name.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame (header first); `WouldBlock` when none is queued.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (header first).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl From<Tap> for OwnedFd {
    fn from(tap: Tap) -> OwnedFd {
        tap.file.into()
    }
}

/// TUN_F_* flags for the receive offloads in `acked` (TSO and UFO only with
/// checksum offload, as the tap requires).
pub fn offload_flags(acked: u64) -> libc::c_uint {
    if acked & features::GUEST_CSUM == 0 {
        return 0;
    }
    [
        (features::GUEST_TSO4, TUN_F_TSO4),
        (features::GUEST_TSO6, TUN_F_TSO6),
        (features::GUEST_ECN, TUN_F_TSO_ECN),
        (features::GUEST_UFO, TUN_F_UFO),
    ]
    .iter()
    .filter(|(bit, _)| acked & bit != 0)
    .fold(TUN_F_CSUM, |flags, (_, f)| flags | f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_the_accepted_features() {
        assert_eq!(
            offload_flags(features::GUEST_TSO4),
            0,
            "TSO needs checksum offload"
        );
        assert_eq!(offload_flags(features::GUEST_CSUM), TUN_F_CSUM);
        assert_eq!(
            offload_flags(features::GUEST_CSUM | features::GUEST_TSO4 | features::GUEST_UFO),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_UFO
        );
    }

    #[test]
    fn bad_names_are_refused() {
        for name in ["", "a/b", "0123456789abcdef", "tap 0"] {
            assert!(
                matches!(Tap::create(name), Err(TapError::Name(_))),
                "{name:?}"
            );
        }
    }

    /// A tap in a network namespace of its own (the thread's), frames both ways.
    #[test]
    fn a_tap_carries_frames_with_their_header() {
        std::thread::spawn(|| {
            // SAFETY: unshare affects only this thread (a fresh network namespace).
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("skipped: no CAP_SYS_ADMIN for a network namespace");
                return;
            }
            let mut tap = Tap::create("ztest0").unwrap();
            tap.set_offloads(features::GUEST_CSUM | features::GUEST_TSO4)
                .unwrap();
            assert_eq!(tap.name(), "ztest0");
            assert!(tap.index().unwrap() > 1, "after loopback");
            let mut buf = [0u8; 2048];
            // Nothing queued: the read does not block.
            let e = tap.read_frame(&mut buf).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
            // While the interface is down the tap refuses frames (EIO); the
            // device drops them.
            let mut frame = vec![0u8; VNET_HDR_LEN + 60];
            frame[VNET_HDR_LEN..VNET_HDR_LEN + 6].copy_from_slice(&[0xff; 6]);
            let e = tap.write_frame(&frame).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
            // A second fd of the same tap, as a fork's device gets.
            let other = tap.try_clone().unwrap();
            assert_eq!(other.name(), "ztest0");
        })
        .join()
        .unwrap();
    }
}
