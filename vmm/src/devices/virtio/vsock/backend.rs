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

/// Connection key: (host-side port, guest-side port).
type Key = (u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated; REQUEST sent, waiting for the guest's RESPONSE.
    AwaitingResponse,
    /// Data flows.
    Established,
}

#[derive(Debug)]
struct Connection {
    stream: UnixStream,
    state: ConnState,
    /// Bytes from the host not yet sent (read past the handshake line).
    rx_prefix: Vec<u8>,
    /// Bytes from the guest not yet written to the host stream.
    pending: Vec<u8>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Bytes from the guest written to the host.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: Wrapping<u32>,
    /// The guest will send no more: shut the host stream's write side once `pending` drains.
    peer_shut_send: bool,
    /// The host stream ended; SHUTDOWN was sent to the guest.
    host_eof: bool,
    /// The host stream hung up (or failed): epoll reports that whatever the
    /// mask, so it is watched edge-triggered from then on (level-triggered,
    /// the device thread would spin until the guest closes its end).
    host_hup: bool,
    watching_out: bool,
}

impl Connection {
    fn new(stream: UnixStream, state: ConnState) -> Self {
        Connection {
            stream,
            state,
            rx_prefix: Vec::new(),
            pending: Vec::new(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            peer_shut_send: false,
            host_eof: false,
            host_hup: false,
            watching_out: false,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Writes as much of `pending` to the host as it takes now.
    fn flush(&mut self) -> std::io::Result<()> {
        while !self.pending.is_empty() {
            match self.stream.write(&self.pending) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.peer_shut_send {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }
}

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

    fn watch(&self, fd: RawFd, events: EventSet, op: ControlOperation) {
        let ev = EpollEvent::new(events, TOKEN_STREAM + fd as u64);
        if let Err(e) = self.epoll.ctl(op, fd, ev) {
            tracing::warn!(error = %e, fd, "vsock: epoll_ctl failed");
        }
    }

    fn conn_events(conn: &Connection, reading: bool) -> EventSet {
        let mut ev = EventSet::empty();
        if reading {
            ev |= EventSet::IN;
        }
        if conn.watching_out {
            ev |= EventSet::OUT;
        }
        if conn.host_hup {
            ev |= EventSet::EDGE_TRIGGERED;
        }
        ev
    }

    /// Accepts every pending host connection.
    pub fn handle_listener(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.watch(fd, EventSet::IN, ControlOperation::Add);
                    self.handshakes.insert(
                        fd,
                        Handshake {
                            stream,
                            buf: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept failed");
                    return;
                }
            }
        }
    }

    /// A host stream is readable or writable (or hung up).
    pub fn handle_stream(&mut self, fd: RawFd, events: EventSet) {
        if self.handshakes.contains_key(&fd) {
            self.handle_handshake(fd);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        if events.intersects(EventSet::OUT) {
            let conn = self.conns.get_mut(&key).expect("by_fd and conns agree");
            if conn.flush().is_err() {
                self.reset(key);
                return;
            }
            if conn.pending.is_empty() {
                conn.watching_out = false;
                let ev = Self::conn_events(conn, !self.rx_ready.contains(&key));
                self.watch(fd, ev, ControlOperation::Modify);
            }
            self.maybe_credit_update(key);
        }
        let hung_up = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if self.conns[&key].host_hup {
            // Reported again after a re-arm: nothing new comes from a stream
            // that hung up (what it had left is read through `rx_ready`).
            return;
        }
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP) || hung_up {
            // Stop watching for input until the data has been moved to the guest.
            let newly_ready = self.rx_ready.insert(key);
            let conn = self.conns.get_mut(&key).expect("by_fd and conns agree");
            let newly_hung_up = hung_up && !std::mem::replace(&mut conn.host_hup, true);
            if newly_ready || newly_hung_up {
                let ev = Self::conn_events(conn, false);
                self.watch(fd, ev, ControlOperation::Modify);
            }
        }
    }

    fn handle_handshake(&mut self, fd: RawFd) {
        let hs = self.handshakes.get_mut(&fd).expect("checked");
        let mut buf = [0u8; HANDSHAKE_MAX];
        let n = match hs.stream.read(&mut buf[..HANDSHAKE_MAX - hs.buf.len()]) {
            Ok(0) => 0,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                return;
            }
            Err(_) => 0,
        };
        if n == 0 {
            self.drop_handshake(fd);
            return;
        }
        hs.buf.extend_from_slice(&buf[..n]);
        let Some(eol) = hs.buf.iter().position(|&b| b == b'\n') else {
            if hs.buf.len() >= HANDSHAKE_MAX {
                self.drop_handshake(fd);
            }
            return;
        };
        let port = std::str::from_utf8(&hs.buf[..eol])
            .ok()
            .and_then(|l| l.trim_end_matches('\r').strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(port) = port else {
            tracing::debug!("vsock: malformed handshake from a host client");
            self.drop_handshake(fd);
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            self.drop_handshake(fd);
            return;
        }
        let hs = self.handshakes.remove(&fd).expect("checked");
        let local_port = self.allocate_local_port(port);
        let key = (local_port, port);
        let mut conn = Connection::new(hs.stream, ConnState::AwaitingResponse);
        conn.rx_prefix = hs.buf[eol + 1..].to_vec();
        // No input is read until the guest accepts.
        self.watch(fd, EventSet::empty(), ControlOperation::Modify);
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.control.push_back(Control {
            key,
            op: op::REQUEST,
            flags: 0,
        });
    }

    fn drop_handshake(&mut self, fd: RawFd) {
        if let Some(hs) = self.handshakes.remove(&fd) {
            self.watch(fd, EventSet::empty(), ControlOperation::Delete);
            drop(hs);
        }
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
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
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream.as_raw_fd();
            self.watch(fd, EventSet::empty(), ControlOperation::Delete);
            self.by_fd.remove(&fd);
        }
        self.rx_ready.remove(&key);
        self.control.retain(|c| c.key != key || c.op == op::RST);
    }

    fn maybe_credit_update(&mut self, key: Key) {
        if let Some(conn) = self.conns.get(&key) {
            if (conn.fwd_cnt - conn.fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
                && !self
                    .control
                    .iter()
                    .any(|c| c.key == key && c.op == op::CREDIT_UPDATE)
            {
                self.control.push_back(Control {
                    key,
                    op: op::CREDIT_UPDATE,
                    flags: 0,
                });
            }
        }
    }

    fn header(&mut self, key: Key, op: u16, flags: u32, len: u32) -> Header {
        let fwd_cnt = match self.conns.get_mut(&key) {
            Some(conn) => {
                conn.fwd_cnt_sent = conn.fwd_cnt;
                conn.fwd_cnt.0
            }
            None => 0,
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt,
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
            self.reset(key);
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
            (op::CREDIT_REQUEST, _) => self.control.push_back(Control {
                key,
                op: op::CREDIT_UPDATE,
                flags: 0,
            }),
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

    /// Watches a connection's host stream for input again.
    fn rearm(&self, key: Key) {
        if let Some(conn) = self.conns.get(&key) {
            let reading = conn.state == ConnState::Established
                && !conn.host_eof
                && !self.rx_ready.contains(&key);
            self.watch(
                conn.stream.as_raw_fd(),
                Self::conn_events(conn, reading),
                ControlOperation::Modify,
            );
        }
    }

    /// The guest connects to host port `key.0`: reach `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: Key, hdr: &Header) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.control.push_back(Control {
                key,
                op: op::RST,
                flags: 0,
            });
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.0));
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => {
                self.control.push_back(Control {
                    key,
                    op: op::RST,
                    flags: 0,
                });
                return;
            }
        };
        let fd = stream.as_raw_fd();
        let mut conn = Connection::new(stream, ConnState::Established);
        conn.update_peer(hdr);
        self.watch(fd, EventSet::IN, ControlOperation::Add);
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.control.push_back(Control {
            key,
            op: op::RESPONSE,
            flags: 0,
        });
    }

    fn has_rx_work(&self) -> bool {
        !self.control.is_empty()
            || self.rx_ready.iter().any(|k| {
                self.conns
                    .get(k)
                    .is_some_and(|c| c.host_eof || c.peer_credit() > 0)
            })
    }

    /// Moves control packets and host data into the guest's receive buffers.
    pub fn process_rx(&mut self) {
        let mem = self.mem.clone();
        while self.has_rx_work() {
            let Some(chain) = self.queues[RXQ]
                .iter(&mem)
                .ok()
                .and_then(|mut it| it.next())
            else {
                return;
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(&mem) {
                Ok(w) if w.available_bytes() >= HDR_LEN => w,
                _ => {
                    tracing::debug!("vsock: unusable rx buffer");
                    if self.queues[RXQ].add_used(&mem, head, 0).is_err() {
                        return;
                    }
                    self.used_any = true;
                    continue;
                }
            };
            let capacity = writer.available_bytes() - HDR_LEN;
            let ready_before = self.rx_ready.len();
            let (hdr, len) = match self.next_rx_packet(capacity) {
                Some(p) => p,
                None => {
                    // Nothing could be read after all: give the buffer back, and
                    // stop unless a stream left the ready set (or this would spin).
                    self.queues[RXQ].go_to_previous_position();
                    if self.rx_ready.len() < ready_before {
                        continue;
                    }
                    return;
                }
            };
            let mut written = 0;
            let data = &self.scratch[..len];
            if writer.write_all(&hdr.to_bytes()).is_ok() && writer.write_all(data).is_ok() {
                written = HDR_LEN + len;
            }
            if self.queues[RXQ]
                .add_used(&mem, head, written as u32)
                .is_err()
            {
                return;
            }
            self.used_any = true;
        }
    }

    /// The next packet for the guest, with at most `capacity` bytes of payload,
    /// which is left in `scratch`; returns the header and the payload length.
    fn next_rx_packet(&mut self, capacity: usize) -> Option<(Header, usize)> {
        if let Some(c) = self.control.pop_front() {
            return Some((self.header(c.key, c.op, c.flags, 0), 0));
        }
        let key = *self.rx_ready.iter().find(|k| {
            self.conns
                .get(k)
                .is_some_and(|c| c.host_eof || c.peer_credit() > 0)
        })?;
        let conn = self.conns.get_mut(&key).expect("filtered");
        if conn.host_eof {
            self.rx_ready.remove(&key);
            return self.next_rx_packet(capacity);
        }
        let max = capacity.min(conn.peer_credit() as usize).min(MAX_PAYLOAD);
        let buf = &mut self.scratch[..max];
        let read = if !conn.rx_prefix.is_empty() {
            let n = conn.rx_prefix.len().min(max);
            buf[..n].copy_from_slice(&conn.rx_prefix[..n]);
            conn.rx_prefix.drain(..n);
            Ok(n)
        } else {
            conn.stream.read(buf)
        };
        match read {
            Ok(0) if max > 0 => {
                conn.host_eof = true;
                self.rx_ready.remove(&key);
                let flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                Some((self.header(key, op::SHUTDOWN, flags, 0), 0))
            }
            Ok(n) if n > 0 => {
                conn.rx_cnt += Wrapping(n as u32);
                Some((self.header(key, op::RW, 0, n as u32), n))
            }
            Ok(_) => None,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                self.rx_ready.remove(&key);
                self.rearm(key);
                None
            }
            Err(_) => {
                self.remove(key);
                Some((self.header(key, op::RST, 0, 0), 0))
            }
        }
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

    /// Raises the interrupt if buffers were used since the last call.
    pub fn notify_guest(&mut self) {
        if std::mem::take(&mut self.used_any) {
            self.interrupt.signal_used_queue();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{NEXT, TestQueue, WRITE, test_memory};
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const GUEST_CID: u64 = 3;
    const BUF: u64 = 0x40000;
    const RX_BUF: u64 = 0x80000;

    struct Harness {
        dir: PathBuf,
        path: PathBuf,
        mem: GuestMemoryMmap,
        rx: TestQueue,
        tx: TestQueue,
        ev: TestQueue,
        backend: VsockBackend,
        rx_seen: u16,
        tx_head: u16,
    }

    impl Harness {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("zygote-vsock-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("v.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let mem = test_memory();
            let rx = TestQueue::new(0x10000, 16);
            let tx = TestQueue::new(0x20000, 16);
            let ev = TestQueue::new(0x30000, 16);
            let interrupt = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
            let queues = vec![rx.queue(), tx.queue(), ev.queue()];
            let backend = VsockBackend::new(
                GUEST_CID,
                path.clone(),
                listener,
                mem.clone(),
                queues,
                interrupt,
            )
            .unwrap();
            Harness {
                dir,
                path,
                mem,
                rx,
                tx,
                ev,
                backend,
                rx_seen: 0,
                tx_head: 0,
            }
        }

        fn hdr(&self, op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
            Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len,
                type_: TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: 65536,
                fwd_cnt: 0,
            }
        }

        /// The guest transmits `hdr` + `data` in one two-descriptor chain.
        fn send(&mut self, hdr: Header, data: &[u8]) {
            let head = self.tx_head % 16;
            self.tx_head = self.tx_head.wrapping_add(2);
            self.mem
                .write_slice(&hdr.to_bytes(), GuestAddress(BUF))
                .unwrap();
            self.mem
                .write_slice(data, GuestAddress(BUF + 0x1000))
                .unwrap();
            self.tx
                .desc(&self.mem, head, BUF, HDR_LEN as u32, NEXT, head + 1);
            self.tx
                .desc(&self.mem, head + 1, BUF + 0x1000, data.len() as u32, 0, 0);
            self.tx.publish(&self.mem, head);
            self.backend.process_tx();
        }

        /// The guest offers one receive buffer; returns the packet put in it, if any.
        fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
            let head = self.rx_seen % 16;
            self.rx.desc(&self.mem, head, RX_BUF, 8192, WRITE, 0);
            self.rx.publish(&self.mem, head);
            self.backend.process_rx();
            if self.rx.used_idx(&self.mem) == self.rx_seen {
                // Not used: take the offer back so the ring stays in step.
                return None;
            }
            let (_, len) = self.rx.used_elem(&self.mem, self.rx_seen);
            self.rx_seen += 1;
            let mut bytes = vec![0u8; len as usize];
            self.mem
                .read_slice(&mut bytes, GuestAddress(RX_BUF))
                .unwrap();
            let hdr = Header::from_bytes(bytes[..HDR_LEN].try_into().unwrap());
            Some((hdr, bytes[HDR_LEN..].to_vec()))
        }

        fn pump(&mut self) {
            for _ in 0..5 {
                self.backend.poll_host(50);
            }
        }

        /// A host client connected to guest `port`, with the REQUEST seen by the guest.
        fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
            let mut client = UnixStream::connect(&self.path).unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            client
                .write_all(format!("CONNECT {port}\n").as_bytes())
                .unwrap();
            self.pump();
            let (req, _) = self.recv().expect("REQUEST");
            assert_eq!(
                (req.op, req.dst_port, req.src_cid, req.dst_cid),
                (op::REQUEST, port, HOST_CID, GUEST_CID)
            );
            (client, req.src_port)
        }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn read_line(s: &mut UnixStream) -> String {
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            out.push(b[0]);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn transport_reset_goes_to_the_event_queue_once_per_buffer() {
        let mut h = Harness::new("reset");
        assert!(!h.backend.send_transport_reset(), "no event buffer yet");
        h.mem
            .write_obj(0xffff_ffff_u32, GuestAddress(0x50000))
            .unwrap();
        h.ev.desc(&h.mem, 0, 0x50000, 4, WRITE, 0);
        h.ev.publish(&h.mem, 0);
        assert!(h.backend.send_transport_reset());
        assert_eq!(h.ev.used_elem(&h.mem, 0), (0, 4));
        let id: u32 = h.mem.read_obj(GuestAddress(0x50000)).unwrap();
        assert_eq!(id, EVENT_TRANSPORT_RESET);
        assert!(!h.backend.send_transport_reset(), "the buffer was used");
        // While not listening a host client waits; once listening it is taken.
        h.backend.set_listening(false);
        let _client = UnixStream::connect(&h.path).unwrap();
        h.backend.set_listening(true);
        h.backend.handle_listener();
        assert_eq!(h.backend.handshakes.len(), 1);
        std::fs::remove_dir_all(&h.dir).unwrap();
    }

    #[test]
    fn host_connect_data_credit_and_reset() {
        let mut h = Harness::new("flow");
        let (mut client, local) = h.host_connect(1024);
        assert_eq!(local, FIRST_LOCAL_PORT);
        h.send(h.hdr(op::RESPONSE, 1024, local, 0), &[]);
        assert_eq!(read_line(&mut client), format!("OK {local}"));

        h.send(h.hdr(op::RW, 1024, local, 5), b"hello");
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");

        client.write_all(b"world").unwrap();
        h.pump();
        let (hdr, data) = h.recv().expect("RW");
        assert_eq!(
            (hdr.op, hdr.src_port, hdr.dst_port, data.as_slice()),
            (op::RW, local, 1024, &b"world"[..])
        );

        h.send(h.hdr(op::CREDIT_REQUEST, 1024, local, 0), &[]);
        let (hdr, _) = h.recv().expect("CREDIT_UPDATE");
        assert_eq!(
            (hdr.op, hdr.buf_alloc, hdr.fwd_cnt),
            (op::CREDIT_UPDATE, CONN_BUF_ALLOC, 5)
        );

        h.send(h.hdr(op::RST, 1024, local, 0), &[]);
        assert_eq!(h.backend.connection_count(), 0);
        assert_eq!(
            client.read(&mut buf).unwrap(),
            0,
            "the host sees EOF after a guest reset"
        );
    }

    /// A host client that hangs up while the guest still holds its end must
    /// not keep the device thread busy: epoll reports a hang-up whatever the
    /// event mask, so a level-triggered watch would return at once forever.
    #[test]
    fn a_host_hang_up_is_not_reported_again_and_again() {
        let mut h = Harness::new("hup");
        let (mut client, local) = h.host_connect(1024);
        h.send(h.hdr(op::RESPONSE, 1024, local, 0), &[]);
        assert_eq!(read_line(&mut client), format!("OK {local}"));
        drop(client);
        // As the device thread goes: host events, then rx (the guest keeps
        // buffers offered).
        h.backend.poll_host(1000);
        let (hdr, _) = h.recv().expect("SHUTDOWN");
        assert_eq!((hdr.op, hdr.src_port), (op::SHUTDOWN, local));
        // The guest has not answered yet: nothing is ready on the host side,
        // however often the device thread goes round (host events, then rx
        // with a buffer the guest offers).
        for _ in 0..5 {
            h.backend.poll_host(0);
            assert!(h.recv().is_none(), "nothing more for the guest");
        }
        let mut events = [EpollEvent::default(); 4];
        let n = h.backend.epoll.wait(0, &mut events).unwrap();
        assert_eq!(
            n,
            0,
            "still reported: {:?}",
            events[..n]
                .iter()
                .map(|e| e.event_set())
                .collect::<Vec<_>>()
        );
        h.send(h.hdr(op::RST, 1024, local, 0), &[]);
        assert_eq!(h.backend.connection_count(), 0);
    }

    #[test]
    fn host_data_waits_for_guest_credit() {
        let mut h = Harness::new("credit");
        let (mut client, local) = h.host_connect(7);
        let mut resp = h.hdr(op::RESPONSE, 7, local, 0);
        resp.buf_alloc = 8;
        h.send(resp, &[]);
        read_line(&mut client);
        client.write_all(&[1u8; 20]).unwrap();
        h.pump();
        let (hdr, data) = h.recv().expect("first 8 bytes");
        assert_eq!((hdr.op, data.len()), (op::RW, 8));
        assert!(h.recv().is_none(), "no credit left");
        let mut update = h.hdr(op::CREDIT_UPDATE, 7, local, 0);
        update.buf_alloc = 8;
        update.fwd_cnt = 8;
        h.send(update, &[]);
        let (_, data) = h.recv().expect("8 more bytes");
        assert_eq!(data.len(), 8);

        drop(client);
        let mut update = h.hdr(op::CREDIT_UPDATE, 7, local, 0);
        update.buf_alloc = 64;
        update.fwd_cnt = 16;
        h.send(update, &[]);
        h.pump();
        let (_, data) = h.recv().expect("last 4 bytes");
        assert_eq!(data.len(), 4);
        h.pump();
        let (hdr, _) = h.recv().expect("SHUTDOWN at host EOF");
        assert_eq!(
            (hdr.op, hdr.flags),
            (op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
        );
    }

    #[test]
    fn guest_connects_to_a_host_listener() {
        let mut h = Harness::new("guestconn");
        let host_side = UnixListener::bind(format!("{}_5000", h.path.display())).unwrap();
        h.send(h.hdr(op::REQUEST, 3000, 5000, 0), &[]);
        let (hdr, _) = h.recv().expect("RESPONSE");
        assert_eq!(
            (hdr.op, hdr.src_port, hdr.dst_port),
            (op::RESPONSE, 5000, 3000)
        );
        let (mut accepted, _) = host_side.accept().unwrap();
        h.send(h.hdr(op::RW, 3000, 5000, 3), b"abc");
        let mut buf = [0u8; 3];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"abc");

        // No listener on port 5001: reset.
        h.send(h.hdr(op::REQUEST, 3001, 5001, 0), &[]);
        assert_eq!(h.recv().expect("RST").0.op, op::RST);
    }

    #[test]
    fn malformed_guest_packets_are_survived() {
        let mut h = Harness::new("malformed");
        // Data for a connection that does not exist: reset.
        h.send(h.hdr(op::RW, 1, 2, 3), b"xyz");
        assert_eq!(h.recv().expect("RST").0.op, op::RST);
        // A length beyond the buffers: reset, nothing read past them.
        h.send(h.hdr(op::RW, 1, 2, 60000), b"short");
        assert_eq!(h.recv().expect("RST").0.op, op::RST);
        // Foreign source CID: dropped silently.
        let mut foreign = h.hdr(op::REQUEST, 1, 2, 0);
        foreign.src_cid = 99;
        h.send(foreign, &[]);
        assert!(h.recv().is_none());
        // Unknown socket type.
        let mut dgram = h.hdr(op::REQUEST, 1, 2, 0);
        dgram.type_ = 2;
        h.send(dgram, &[]);
        assert_eq!(h.recv().expect("RST").0.op, op::RST);

        // Short header, out-of-range buffer, a descriptor loop, a head past the table.
        h.tx.desc(&h.mem, 10, BUF, 10, 0, 0);
        h.tx.publish(&h.mem, 10);
        h.tx.desc(&h.mem, 11, 0xfff_0000, 44, 0, 0);
        h.tx.publish(&h.mem, 11);
        h.tx.desc(&h.mem, 12, BUF, 20, NEXT, 13);
        h.tx.desc(&h.mem, 13, BUF, 20, NEXT, 12);
        h.tx.publish(&h.mem, 12);
        h.tx.publish(&h.mem, 300);
        let before = h.tx.used_idx(&h.mem);
        h.backend.process_tx();
        assert!(h.tx.used_idx(&h.mem).wrapping_sub(before) >= 3);

        // A receive buffer smaller than a header is returned unused.
        h.backend.control.push_back(Control {
            key: (1, 2),
            op: op::RST,
            flags: 0,
        });
        // (A buffer the harness offered earlier, when nothing was pending, is still
        // posted ahead of it and takes the RST.)
        h.rx.desc(&h.mem, 15, RX_BUF + 0x4000, 8, WRITE, 0);
        h.rx.publish(&h.mem, 15);
        h.backend.process_rx();
        let used: Vec<_> = (h.rx_seen..h.rx.used_idx(&h.mem))
            .map(|i| h.rx.used_elem(&h.mem, i))
            .collect();
        assert!(used.contains(&(15, 0)), "{used:?}");
        assert!(
            used.iter().any(|&(_, len)| len == HDR_LEN as u32),
            "the RST still arrives: {used:?}"
        );
    }

    #[test]
    fn bad_handshakes_are_dropped() {
        let mut h = Harness::new("handshake");
        for line in ["HELLO\n", "CONNECT x\n", "CONNECT 99999999999\n"] {
            let mut c = UnixStream::connect(&h.path).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            c.write_all(line.as_bytes()).unwrap();
            h.pump();
            let mut b = [0u8; 1];
            assert_eq!(c.read(&mut b).unwrap(), 0, "{line:?} closes the client");
        }
        let mut c = UnixStream::connect(&h.path).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c.write_all(&[b'C'; HANDSHAKE_MAX]).unwrap();
        h.pump();
        let mut b = [0u8; 1];
        assert_eq!(
            c.read(&mut b).unwrap(),
            0,
            "an over-long line closes the client"
        );
        assert_eq!(h.backend.connection_count(), 0);
        assert!(h.recv().is_none(), "the guest hears nothing of them");
    }
}
