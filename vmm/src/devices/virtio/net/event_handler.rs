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
use crate::devices::virtio::Interrupt;
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
        let mut used = self.process_tx();
        let (u, room) = self.process_rx();
        used |= u;
        if !room {
            tap_watched = watch_tap(&epoll, tap_fd, false);
        }
        self.signal(used);
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
            let mut used = false;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KILL => return Some(self.into_queues()),
                    TOKEN_TXQ => {
                        let _ = evts[TXQ].read();
                        used |= self.process_tx();
                    }
                    TOKEN_RXQ | TOKEN_TAP => {
                        if ev.data() == TOKEN_RXQ {
                            let _ = evts[RXQ].read();
                        }
                        let (u, room) = self.process_rx();
                        used |= u;
                        if room != tap_watched {
                            tap_watched = watch_tap(&epoll, tap_fd, room);
                        }
                    }
                    _ => {}
                }
            }
            self.signal(used);
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
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))?;
        }
        Ok(epoll)
    }

    fn signal(&self, used: bool) {
        if used {
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
        (ControlOperation::Add, EpollEvent::new(EventSet::IN, TOKEN_TAP))
    } else {
        (ControlOperation::Delete, EpollEvent::default())
    };
    if let Err(e) = epoll.ctl(op, fd, ev) {
        tracing::warn!(error = %e, "net: cannot change the tap's epoll registration");
        return !watch;
    }
    watch
}
