//! Towards the guest: control packets and host data placed in the rx queue's
//! buffers, as far as each connection's credit allows.

use super::*;

impl VsockBackend {
    pub(super) fn has_rx_work(&self) -> bool {
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
    pub(super) fn next_rx_packet(&mut self, capacity: usize) -> Option<(Header, usize)> {
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

    /// Raises the interrupt if buffers were used since the last call.
    pub fn notify_guest(&mut self) {
        if std::mem::take(&mut self.used_any) {
            self.interrupt.signal_used_queue();
        }
    }

    pub(super) fn maybe_credit_update(&mut self, key: Key) {
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

    pub(super) fn header(&mut self, key: Key, op: u16, flags: u32, len: u32) -> Header {
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
}
