//! The vsock connection state machine: guest packets on the queues on one side,
//! host Unix streams on the other.
//!
//! Flow control follows the spec's credit scheme. Towards the guest the device
//! reads from a host stream only as much as the guest has buffer for; towards the
//! host it advertises [`CONN_BUF_ALLOC`] and counts a byte as forwarded only once
//! it was written to the host stream, so a slow host reader throttles the guest
//! instead of growing the VMM's memory.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{HDR_LEN, Header, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op};
use super::{
    CONN_BUF_ALLOC, EVENT_TRANSPORT_RESET, EVQ, FIRST_LOCAL_PORT, HOST_CID, MAX_CONNECTIONS,
    MAX_PAYLOAD, RXQ, TXQ,
};
use crate::devices::virtio::Interrupt;
use crate::vstate::memory::GuestMemoryMmap;

/// Epoll token of the host listener.
pub(super) const TOKEN_LISTENER: u64 = 0;
/// Epoll token of the kill eventfd.
pub(super) const TOKEN_KILL: u64 = 1;
/// Epoll token base of the queue eventfds (plus the queue index).
pub(super) const TOKEN_QUEUE: u64 = 2;
/// Epoll tokens of streams are this plus the fd.
pub(super) const TOKEN_STREAM: u64 = 16;

/// Longest `CONNECT <port>\n` line accepted.
const HANDSHAKE_MAX: usize = 32;
/// Unacknowledged forwarded bytes after which the device tells the guest its credit.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 2;
/// Control packets queued for the guest beyond which the device stops
/// answering the guest's own requests and mistakes (an RST for a packet to
/// no connection, a credit update asked for): a guest that sends without
/// taking its receive buffers must not grow the host's queue, as
/// Firecracker bounds its muxer's. Controls of the host's own making (a
/// host connection's request, its reset) are bounded by the connections.
pub(super) const MAX_ANSWERS_QUEUED: usize = 256;

mod connection;
mod muxer;
mod rx;

use connection::{ConnState, Connection};

/// Connection key: (host-side port, guest-side port).
type Key = (u32, u32);

/// A packet the device owes the guest that carries no payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Control {
    key: Key,
    op: u16,
    flags: u32,
}

/// A host connection that has not yet sent its `CONNECT <port>` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The device's I/O state, driven by its thread (or directly by tests).
#[derive(Debug)]
pub struct VsockBackend {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    pub(super) epoll: Epoll,
    mem: GuestMemoryMmap,
    pub(super) queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
    handshakes: HashMap<RawFd, Handshake>,
    conns: HashMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    control: VecDeque<Control>,
    /// Host streams with data (or EOF) to read.
    rx_ready: BTreeSet<Key>,
    next_local_port: u32,
    used_any: bool,
    /// Payload buffer for one packet, either direction (reused: no allocation per packet).
    scratch: Vec<u8>,
}

impl VsockBackend {
    /// A backend for guest `cid`, serving `listener` (bound at `uds_path`).
    pub fn new(
        cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        Ok(VsockBackend {
            cid,
            uds_path,
            listener,
            epoll,
            mem,
            queues,
            interrupt,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            control: VecDeque::new(),
            rx_ready: BTreeSet::new(),
            next_local_port: FIRST_LOCAL_PORT,
            used_any: false,
            scratch: vec![0u8; MAX_PAYLOAD],
        })
    }

    /// Gives the listener back (when the device is reset); connections are dropped.
    pub fn into_listener(self) -> UnixListener {
        self.listener
    }

    /// Gives the listener and the queues back (when the device is quiesced for a
    /// snapshot); connections are dropped.
    pub fn into_parts(self) -> (UnixListener, Vec<Queue>) {
        (self.listener, self.queues)
    }

    /// Starts or stops accepting host clients (they wait in the socket's backlog
    /// meanwhile).
    pub fn set_listening(&self, on: bool) {
        let fd = self.listener.as_raw_fd();
        let result = if on {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )
        } else {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, on, "vsock: cannot change listening");
        }
    }

    /// Tells the guest that every connection it had is gone
    /// (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue). Its listening
    /// sockets stay; it also re-reads its CID. Sent once after a restore.
    pub fn send_transport_reset(&mut self) -> bool {
        let mem = &self.mem;
        let queue = &mut self.queues[EVQ];
        let Some(chain) = queue.iter(mem).ok().and_then(|mut it| it.next()) else {
            tracing::warn!("vsock: no event buffer for the transport reset");
            return false;
        };
        let head = chain.head_index();
        let written = match chain.writer(mem) {
            Ok(mut w) if w.available_bytes() >= 4 => {
                std::io::Write::write(&mut w, &EVENT_TRANSPORT_RESET.to_le_bytes()).unwrap_or(0)
            }
            _ => 0,
        };
        if queue.add_used(mem, head, written as u32).is_err() {
            return false;
        }
        self.used_any = true;
        written == 4
    }

    /// Number of open connections (for tests and stats).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Closes a connection and tells the guest.
    fn reset(&mut self, key: Key) {
        self.remove(key);
        self.control.push_back(Control {
            key,
            op: op::RST,
            flags: 0,
        });
    }

    fn remove(&mut self, key: Key) {
        // Only a connection that was there has controls to drop (the scan
        // is not done for every packet to no connection).
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream.as_raw_fd();
            self.watch(fd, EventSet::empty(), ControlOperation::Delete);
            self.by_fd.remove(&fd);
            self.rx_ready.remove(&key);
            self.control.retain(|c| c.key != key || c.op == op::RST);
        }
    }

    /// Queues an answer to something the guest sent (dropped when
    /// [`MAX_ANSWERS_QUEUED`] controls already wait for the guest).
    pub(super) fn answer_guest(&mut self, key: Key, op: u16) {
        if self.control.len() < MAX_ANSWERS_QUEUED {
            self.control.push_back(Control { key, op, flags: 0 });
        } else {
            tracing::debug!("vsock: the guest takes no answers; one dropped");
        }
    }

    /// Handles every packet the guest has queued for the host.
    pub fn process_tx(&mut self) {
        let mem = self.mem.clone();
        let mut data = std::mem::take(&mut self.scratch);
        while let Some(chain) = self.queues[TXQ]
            .iter(&mem)
            .ok()
            .and_then(|mut it| it.next())
        {
            let head = chain.head_index();
            match chain.reader(&mem) {
                Ok(mut reader) => {
                    let mut hdr_bytes = [0u8; HDR_LEN];
                    if reader.available_bytes() >= HDR_LEN
                        && reader.read_exact(&mut hdr_bytes).is_ok()
                    {
                        let hdr = Header::from_bytes(&hdr_bytes);
                        let len = hdr.len as usize;
                        if len > MAX_PAYLOAD || len > reader.available_bytes() {
                            tracing::debug!(len, "vsock: packet length exceeds its buffers");
                            self.refuse(&hdr);
                        } else {
                            if reader.read_exact(&mut data[..len]).is_ok() {
                                self.handle_guest_packet(hdr, &data[..len]);
                            }
                        }
                    } else {
                        tracing::debug!("vsock: short packet from the guest");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "vsock: malformed tx descriptor chain"),
            }
            if self.queues[TXQ].add_used(&mem, head, 0).is_err() {
                break;
            }
            self.used_any = true;
        }
        self.scratch = data;
    }

    /// Answers a packet the device cannot take with RST (unless it was an RST).
    fn refuse(&mut self, hdr: &Header) {
        if hdr.src_cid != self.cid || hdr.dst_cid != HOST_CID {
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.op != op::RST {
            self.remove(key);
            self.answer_guest(key, op::RST);
        }
    }

    fn handle_guest_packet(&mut self, hdr: Header, data: &[u8]) {
        if hdr.src_cid != self.cid || hdr.dst_cid != HOST_CID {
            tracing::debug!(
                src = hdr.src_cid,
                dst = hdr.dst_cid,
                "vsock: packet with foreign addresses dropped"
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.refuse(&hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.op == op::REQUEST {
            self.guest_connect(key, &hdr);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            self.refuse(&hdr);
            return;
        };
        conn.update_peer(&hdr);
        match (hdr.op, conn.state) {
            (op::RESPONSE, ConnState::AwaitingResponse) => {
                conn.state = ConnState::Established;
                conn.pending
                    .extend_from_slice(format!("OK {}\n", key.0).as_bytes());
                // The OK line is not guest data: keep it out of the credit count.
                conn.fwd_cnt -= Wrapping(conn.pending.len() as u32);
                if !conn.rx_prefix.is_empty() {
                    self.rx_ready.insert(key);
                }
                self.flush_conn(key);
                self.rearm(key);
            }
            (op::RW, ConnState::Established) => {
                if conn.peer_shut_send || conn.pending.len() + data.len() > CONN_BUF_ALLOC as usize
                {
                    tracing::debug!("vsock: guest sent past its credit or after shutdown");
                    self.reset(key);
                    return;
                }
                conn.pending.extend_from_slice(data);
                self.flush_conn(key);
            }
            (op::CREDIT_UPDATE, _) => {}
            (op::CREDIT_REQUEST, _) => self.answer_guest(key, op::CREDIT_UPDATE),
            (op::SHUTDOWN, _) => {
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    conn.peer_shut_send = true;
                    if conn.pending.is_empty() {
                        let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                    }
                }
                if hdr.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    // Both directions closed: flush what is left and end the connection.
                    let _ = conn.flush();
                    self.reset(key);
                }
            }
            (op::RST, _) => self.remove(key),
            _ => self.reset(key),
        }
    }

    /// Writes pending guest data to the host; watches for writability if it backs up.
    fn flush_conn(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.flush().is_err() {
            self.reset(key);
            return;
        }
        if !conn.pending.is_empty() && !conn.watching_out {
            conn.watching_out = true;
            let reading = conn.state == ConnState::Established
                && !conn.host_eof
                && !self.rx_ready.contains(&key);
            let (fd, ev) = (conn.stream.as_raw_fd(), Self::conn_events(conn, reading));
            self.watch(fd, ev, ControlOperation::Modify);
        }
        self.maybe_credit_update(key);
    }

    /// Waits up to `timeout_ms` for host-side events and handles them (tests drive
    /// the backend with this instead of the device thread).
    #[cfg(test)]
    pub(super) fn poll_host(&mut self, timeout_ms: i32) {
        let mut events = [EpollEvent::default(); 16];
        let n = self.epoll.wait(timeout_ms, &mut events).unwrap_or(0);
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_LISTENER => self.handle_listener(),
                t if t >= TOKEN_STREAM => {
                    self.handle_stream((t - TOKEN_STREAM) as RawFd, ev.event_set())
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests;
