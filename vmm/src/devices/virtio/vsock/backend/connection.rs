//! One connection's state: its host stream, what is buffered each way, and
//! the credit the spec's flow control keeps on both sides.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnState {
    /// Host-initiated; REQUEST sent, waiting for the guest's RESPONSE.
    AwaitingResponse,
    /// Data flows.
    Established,
}

#[derive(Debug)]
pub(super) struct Connection {
    pub(super) stream: UnixStream,
    pub(super) state: ConnState,
    /// Bytes from the host not yet sent (read past the handshake line).
    pub(super) rx_prefix: Vec<u8>,
    /// Bytes from the guest not yet written to the host stream.
    pub(super) pending: Vec<u8>,
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    pub(super) rx_cnt: Wrapping<u32>,
    /// Bytes from the guest written to the host.
    pub(super) fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    pub(super) fwd_cnt_sent: Wrapping<u32>,
    /// The guest will send no more: shut the host stream's write side once `pending` drains.
    pub(super) peer_shut_send: bool,
    /// The host stream ended; SHUTDOWN was sent to the guest.
    pub(super) host_eof: bool,
    /// The host stream hung up (or failed): epoll reports that whatever the
    /// mask, so it is watched edge-triggered from then on (level-triggered,
    /// the device thread would spin until the guest closes its end).
    pub(super) host_hup: bool,
    pub(super) watching_out: bool,
}

impl Connection {
    pub(super) fn new(stream: UnixStream, state: ConnState) -> Self {
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
    pub(super) fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub(super) fn update_peer(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Writes as much of `pending` to the host as it takes now.
    pub(super) fn flush(&mut self) -> std::io::Result<()> {
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
