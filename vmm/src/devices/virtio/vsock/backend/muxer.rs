//! The host side: the listener, each host stream's events, the
//! `CONNECT <port>` handshake, and connections the guest opens to host
//! listeners.

use super::*;

impl VsockBackend {
    pub(super) fn watch(&self, fd: RawFd, events: EventSet, op: ControlOperation) {
        let ev = EpollEvent::new(events, TOKEN_STREAM + fd as u64);
        if let Err(e) = self.epoll.ctl(op, fd, ev) {
            tracing::warn!(error = %e, fd, "vsock: epoll_ctl failed");
        }
    }

    pub(super) fn conn_events(conn: &Connection, reading: bool) -> EventSet {
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

    pub(super) fn handle_handshake(&mut self, fd: RawFd) {
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

    pub(super) fn drop_handshake(&mut self, fd: RawFd) {
        if let Some(hs) = self.handshakes.remove(&fd) {
            self.watch(fd, EventSet::empty(), ControlOperation::Delete);
            drop(hs);
        }
    }

    pub(super) fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
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

    /// The guest connects to host port `key.0`: reach `<uds_path>_<port>`.
    pub(super) fn guest_connect(&mut self, key: Key, hdr: &Header) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.answer_guest(key, op::RST);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.0));
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => {
                self.answer_guest(key, op::RST);
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

    /// Watches a connection's host stream for input again.
    pub(super) fn rearm(&self, key: Key) {
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
}
