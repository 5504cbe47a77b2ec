//! The NIC's I/O thread: guest transmit buffers → tap, tap → guest receive
//! buffers.
//!
//! Receive backpressure: when a frame is read from the tap and the guest has
//! no room for it, the frame is held and the tap is taken out of the thread's
//! epoll set until the guest offers buffers (it notifies the receive queue);
//! the thread sleeps meanwhile and the tap's own queue absorbs (and, when
//! full, drops) what comes. Every frame from the guest is read whole, at most
//! [`MAX_FRAME`] bytes, before it is written; a chain that is malformed or too
//! long is returned unused and dropped.

use std::io::{ErrorKind, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{MAX_FRAME, RXQ, TXQ, Tap, VNET_HDR_LEN, features};
use crate::devices::virtio::{Interrupt, driver_wants_interrupt};
use crate::vstate::memory::GuestMemoryMmap;

const TOKEN_KILL: u64 = 0;
const TOKEN_RXQ: u64 = 1;
const TOKEN_TXQ: u64 = 2;
const TOKEN_TAP: u64 = 3;
/// Frames moved per wake-up in one direction before the other gets a turn.
const BUDGET: usize = 64;

/// The queues, the tap and the frame in flight.
#[derive(Debug)]
pub(super) struct NetIo {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    interrupt: Arc<Interrupt>,
    tap: Option<Tap>,
    mergeable: bool,
    /// A frame read from the tap that the guest had no room for yet.
    pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    /// Frames dropped (malformed, too long, or no room without mergeable buffers).
    pub(super) dropped: u64,
}

impl NetIo {
    pub(super) fn new(
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
        tap: Option<Tap>,
        acked_features: u64,
    ) -> Self {
        let txq = queues.remove(TXQ);
        let rxq = queues.remove(RXQ);
        NetIo {
            mem,
            rxq,
            txq,
            interrupt,
            tap,
            mergeable: acked_features & features::MRG_RXBUF != 0,
            pending: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: Vec::with_capacity(MAX_FRAME),
            dropped: 0,
        }
    }

    /// Serves until `kill` fires; gives the queues back (`None` if the thread
    /// could not be set up).
    pub(super) fn run(mut self, evts: Vec<EventFd>, kill: EventFd) -> Option<Vec<Queue>> {
        let epoll = match self.epoll(&evts, &kill) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "net: cannot set up epoll");
                return None;
            }
        };
        let tap_fd = self.tap.as_ref().map(|t| t.as_fd().as_raw_fd());
        let mut tap_watched = tap_fd.is_some();
        // The driver may have queued buffers before DRIVER_OK.
        let tx_used = self.process_tx();
        let (rx_used, room) = self.process_rx();
        if !room {
            tap_watched = watch_tap(&epoll, tap_fd, false);
        }
        self.signal(rx_used, tx_used);
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "net: epoll failed");
                    return Some(self.into_queues());
                }
            };
            let (mut rx_used, mut tx_used) = (false, false);
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KILL => return Some(self.into_queues()),
                    TOKEN_TXQ => {
                        let _ = evts[TXQ].read();
                        tx_used |= self.process_tx();
                    }
                    TOKEN_RXQ | TOKEN_TAP => {
                        if ev.data() == TOKEN_RXQ {
                            let _ = evts[RXQ].read();
                        }
                        let (u, room) = self.process_rx();
                        rx_used |= u;
                        if room != tap_watched {
                            tap_watched = watch_tap(&epoll, tap_fd, room);
                        }
                    }
                    _ => {}
                }
            }
            self.signal(rx_used, tx_used);
        }
    }

    fn epoll(&self, evts: &[EventFd], kill: &EventFd) -> std::io::Result<Epoll> {
        let epoll = Epoll::new()?;
        let mut fds = vec![
            (kill.as_raw_fd(), TOKEN_KILL),
            (evts[RXQ].as_raw_fd(), TOKEN_RXQ),
            (evts[TXQ].as_raw_fd(), TOKEN_TXQ),
        ];
        if let Some(tap) = &self.tap {
            fds.push((tap.as_fd().as_raw_fd(), TOKEN_TAP));
        }
        for (fd, token) in fds {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(epoll)
    }

    /// Raises the interrupt for queues with used buffers whose driver wants
    /// it (not while its NAPI poll runs).
    fn signal(&mut self, rx_used: bool, tx_used: bool) {
        let rx = rx_used && driver_wants_interrupt(&mut self.rxq, &self.mem);
        let tx = tx_used && driver_wants_interrupt(&mut self.txq, &self.mem);
        if rx || tx {
            self.interrupt.signal_used_queue();
        }
    }

    fn into_queues(self) -> Vec<Queue> {
        vec![self.rxq, self.txq]
    }

    /// Sends every frame the guest queued (up to the budget); without a tap
    /// they are dropped. Returns whether buffers were used.
    pub(super) fn process_tx(&mut self) -> bool {
        let mut used = false;
        for _ in 0..super::QUEUE_SIZE {
            let Some(chain) = self.txq.iter(&self.mem).ok().and_then(|mut it| it.next()) else {
                break;
            };
            let head = chain.head_index();
            match read_chain(chain, &self.mem, &mut self.tx_buf) {
                Some(()) if self.tx_buf.len() > VNET_HDR_LEN => {
                    if let Some(tap) = &mut self.tap {
                        // The tap takes or drops a whole frame; a full host
                        // queue drops it as a congested link would.
                        if let Err(e) = tap.write_frame(&self.tx_buf) {
                            tracing::debug!(error = %e, "net: tap write failed");
                        }
                    }
                }
                _ => self.dropped += 1,
            }
            if self.txq.add_used(&self.mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    /// Moves frames from the tap into the guest's receive buffers (up to the
    /// budget). Returns whether buffers were used and whether the guest still
    /// has room (false: a frame waits for buffers, stop watching the tap).
    pub(super) fn process_rx(&mut self) -> (bool, bool) {
        let mut used = false;
        for _ in 0..BUDGET {
            let len = match self.pending.take() {
                Some(len) => len,
                None => {
                    let Some(tap) = &mut self.tap else {
                        return (used, true);
                    };
                    match tap.read_frame(&mut self.rx_buf) {
                        Ok(len) => len,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return (used, true),
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, "net: tap read failed");
                            return (used, true);
                        }
                    }
                }
            };
            match self.deliver(len) {
                Delivered::Yes => used = true,
                Delivered::Dropped => {
                    used = true;
                    self.dropped += 1;
                }
                Delivered::NoRoom => {
                    self.pending = Some(len);
                    return (used, false);
                }
            }
        }
        (used, true)
    }

    /// Copies `rx_buf[..len]` into the guest's buffers, spread over several
    /// when mergeable buffers were accepted (their count in the header's
    /// `num_buffers`).
    fn deliver(&mut self, len: usize) -> Delivered {
        if len < VNET_HDR_LEN {
            return Delivered::Dropped;
        }
        let mem = &self.mem;
        let mut chains: Vec<(u16, DescriptorChain<&GuestMemoryMmap>, usize)> = Vec::new();
        let mut room = 0;
        while room < len {
            let Some(chain) = self.rxq.iter(mem).ok().and_then(|mut it| it.next()) else {
                // Not enough buffers yet: give back what was taken.
                for _ in &chains {
                    self.rxq.go_to_previous_position();
                }
                return Delivered::NoRoom;
            };
            let head = chain.head_index();
            let capacity = chain
                .clone()
                .writer(mem)
                .map(|w| w.available_bytes())
                .unwrap_or(0);
            if capacity == 0 {
                // Malformed or read-only: returned empty.
                let _ = self.rxq.add_used(mem, head, 0);
                continue;
            }
            room += capacity;
            chains.push((head, chain, capacity));
            if !self.mergeable && room < len {
                // One buffer must hold the frame: it does not fit.
                for (head, _, _) in chains {
                    let _ = self.rxq.add_used(mem, head, 0);
                }
                return Delivered::Dropped;
            }
        }
        let count = chains.len() as u16;
        self.rx_buf[10..12].copy_from_slice(&count.to_le_bytes());
        let mut offset = 0;
        for (head, chain, capacity) in chains {
            let n = capacity.min(len - offset);
            let written = match chain.writer(mem) {
                Ok(mut w) => w.write(&self.rx_buf[offset..offset + n]).unwrap_or(0),
                Err(_) => 0,
            };
            offset += n;
            if self.rxq.add_used(mem, head, written as u32).is_err() {
                break;
            }
        }
        Delivered::Yes
    }
}

enum Delivered {
    Yes,
    Dropped,
    NoRoom,
}

/// Reads the readable part of `chain` into `buf`; `None` if malformed or
/// longer than [`MAX_FRAME`].
fn read_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    buf: &mut Vec<u8>,
) -> Option<()> {
    let mut reader = chain.reader(mem).ok()?;
    let len = reader.available_bytes();
    if len > MAX_FRAME {
        return None;
    }
    buf.resize(len, 0);
    std::io::Read::read_exact(&mut reader, buf).ok()
}

/// Adds or removes the tap from the epoll set; returns whether it is watched.
fn watch_tap(epoll: &Epoll, tap: Option<RawFd>, watch: bool) -> bool {
    let Some(fd) = tap else { return false };
    let (op, ev) = if watch {
        (
            ControlOperation::Add,
            EpollEvent::new(EventSet::IN, TOKEN_TAP),
        )
    } else {
        (ControlOperation::Delete, EpollEvent::default())
    };
    if let Err(e) = epoll.ctl(op, fd, ev) {
        tracing::warn!(error = %e, "net: cannot change the tap's epoll registration");
        return !watch;
    }
    watch
}

/// See `super::fuzz_queues`.
#[cfg(feature = "fuzzing")]
pub(super) fn fuzz(mem: &GuestMemoryMmap, queues: Vec<Queue>, frame: &[u8], mergeable: bool) {
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let interrupt = Arc::new(Interrupt::new(irq));
    let features = if mergeable { features::MRG_RXBUF } else { 0 };
    let mut io = NetIo::new(mem.clone(), queues, interrupt, None, features);
    io.process_tx();
    let len = frame.len().min(io.rx_buf.len());
    io.rx_buf[..len].copy_from_slice(&frame[..len]);
    io.pending = Some(len);
    io.process_rx();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{NEXT, TestQueue, WRITE, test_memory};
    use vm_memory::{Bytes, GuestAddress};

    /// Brings interface `name` up (SIOCSIFFLAGS) in the calling thread's namespace.
    fn link_up(name: &str) {
        #[repr(C)]
        struct IfReqFlags {
            name: [u8; libc::IFNAMSIZ],
            flags: libc::c_short,
            _pad: [u8; 22],
        }
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: libc::IFF_UP as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: a datagram socket for the ioctl, closed below; SIOCSIFFLAGS
        // reads a `struct ifreq` with the flags, which `req` is laid out as.
        unsafe {
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            assert!(s >= 0);
            assert_eq!(libc::ioctl(s, libc::SIOCSIFFLAGS, &mut req), 0);
            libc::close(s);
        }
    }

    /// A raw packet socket on interface `index`: what the host's kernel
    /// sends out through the tap, and sees coming in from it.
    struct Wire(i32, i32);

    impl Wire {
        fn open(index: i32) -> Wire {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: socket(2); the fd is owned by the returned Wire.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            assert!(fd >= 0);
            // SAFETY: an all-zero sockaddr_ll is valid; family, protocol and
            // interface are set before bind(2) reads it.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = index;
            let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: `addr` is a sockaddr_ll of `len` bytes.
            let r = unsafe { libc::bind(fd, (&raw const addr).cast(), len) };
            assert_eq!(r, 0);
            Wire(fd, index)
        }

        fn send(&self, frame: &[u8]) {
            // SAFETY: send(2) of `frame` on our socket.
            let n = unsafe { libc::send(self.0, frame.as_ptr().cast(), frame.len(), 0) };
            assert_eq!(n, frame.len() as isize);
        }

        /// The next frame seen that holds `marker`, within 5 s.
        fn expect(&self, marker: &[u8]) -> Vec<u8> {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let mut buf = vec![0u8; 2048];
            while std::time::Instant::now() < deadline {
                // SAFETY: recv(2) into `buf`, not blocking.
                let n = unsafe {
                    libc::recv(
                        self.0,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 && buf[..n as usize].windows(marker.len()).any(|w| w == marker) {
                    return buf[..n as usize].to_vec();
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            panic!("no frame with {marker:?} on interface {}", self.1);
        }
    }

    impl Drop for Wire {
        fn drop(&mut self) {
            // SAFETY: closing our own fd.
            unsafe { libc::close(self.0) };
        }
    }

    fn frame(marker: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6]; // broadcast
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[0x88, 0xb5]); // a local experimental ethertype
        f.extend_from_slice(marker);
        f.resize(60, 0);
        f
    }

    /// Frames cross both ways between the queues and a real tap; a frame
    /// with no guest buffer waits (the tap is not read again) until one is
    /// offered, and is then delivered whole with its header.
    #[test]
    fn frames_cross_between_the_queues_and_a_tap() {
        std::thread::spawn(|| {
            // SAFETY: unshare affects only this thread (a fresh network namespace).
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("skipped: no CAP_SYS_ADMIN for a network namespace");
                return;
            }
            // No IPv6 chatter (router solicitations, MLD) on the new link:
            // the test's own frames are the only ones.
            let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
            let tap = Tap::create("ztest1").unwrap();
            link_up("ztest1");
            // SAFETY: a NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(c"ztest1".as_ptr()) } as i32;
            let wire = Wire::open(index);

            let mem = test_memory();
            let mut rx = TestQueue::new(0x10000, 16);
            let mut tx = TestQueue::new(0x20000, 16);
            let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
            let mut io = NetIo::new(
                mem.clone(),
                vec![rx.queue(), tx.queue()],
                interrupt,
                Some(tap),
                features::MRG_RXBUF,
            );

            // Host → guest, with no buffer offered: the frame waits.
            wire.send(&frame(b"to-guest"));
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert_eq!(
                io.process_rx(),
                (false, false),
                "no room: held, stop reading the tap"
            );
            assert!(io.pending.is_some());
            // Two small buffers: the frame (12 + 60 bytes) is spread over both.
            rx.desc(&mem, 0, 0x40000, 40, WRITE, 0);
            rx.desc(&mem, 1, 0x41000, 40, WRITE, 0);
            rx.publish(&mem, 0);
            rx.publish(&mem, 1);
            assert_eq!(io.process_rx(), (true, true));
            assert_eq!(rx.used_idx(&mem), 2);
            assert_eq!(rx.used_elem(&mem, 0), (0, 40));
            assert_eq!(rx.used_elem(&mem, 1), (1, 32));
            let mut got = [0u8; 72];
            mem.read_slice(&mut got[..40], GuestAddress(0x40000))
                .unwrap();
            mem.read_slice(&mut got[40..], GuestAddress(0x41000))
                .unwrap();
            assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
            assert_eq!(&got[VNET_HDR_LEN..], &frame(b"to-guest")[..]);

            // Guest → host: header and frame in two descriptors.
            let out = frame(b"from-guest");
            mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(0x50000))
                .unwrap();
            mem.write_slice(&out, GuestAddress(0x51000)).unwrap();
            tx.desc(&mem, 0, 0x50000, VNET_HDR_LEN as u32, NEXT, 1);
            tx.desc(&mem, 1, 0x51000, out.len() as u32, 0, 0);
            tx.publish(&mem, 0);
            assert!(io.process_tx());
            assert_eq!(tx.used_idx(&mem), 1);
            assert_eq!(wire.expect(b"from-guest"), out);
            assert_eq!(io.dropped, 0);
        })
        .join()
        .unwrap();
    }
}
