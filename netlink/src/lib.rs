//! A small synchronous rtnetlink client: one request and its acknowledgement,
//! or one dump and all its parts, over a `NETLINK_ROUTE` socket. Message
//! types are `netlink-packet-route`'s.
//!
//! The socket belongs to the network namespace of the thread that opened it:
//! the host opens one inside a pod's namespace to wire its tap, the guest
//! agent one in the guest to configure its NIC. No async runtime: both callers
//! are plain threads and the exchanges are a handful of messages.

use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

pub use netlink_packet_core as core;
pub use netlink_packet_route as route;

/// Flags for a request that creates something and fails if it exists.
pub const CREATE_EXCL: u16 = netlink_packet_core::NLM_F_CREATE | netlink_packet_core::NLM_F_EXCL;
/// Flags for a request that creates or replaces.
pub const CREATE_REPLACE: u16 =
    netlink_packet_core::NLM_F_CREATE | netlink_packet_core::NLM_F_REPLACE;

/// A route-netlink socket of the calling thread's network namespace.
#[derive(Debug)]
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    /// Opens and binds the socket.
    pub fn open() -> io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink { socket, seq: 0 })
    }

    fn send(&mut self, body: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(body));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        Ok(self.seq)
    }

    /// The messages of the next datagram that answer request `seq`.
    fn receive(&mut self, seq: u32) -> io::Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
        loop {
            let (buf, _) = self.socket.recv_from_full()?;
            let mut out = Vec::new();
            let mut offset = 0;
            while offset < buf.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += (len + 3) & !3;
                if msg.header.sequence_number == seq {
                    out.push(msg);
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Sends `body` and waits for the kernel's acknowledgement; its error
    /// (an errno) is returned as an `io::Error`.
    pub fn request(&mut self, body: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let seq = self.send(body, flags | NLM_F_ACK)?;
        loop {
            for msg in self.receive(seq)? {
                if let NetlinkPayload::Error(e) = msg.payload {
                    return match e.code {
                        None => Ok(()),
                        Some(_) => Err(e.to_io()),
                    };
                }
            }
        }
    }

    /// Sends a dump request and returns every answer until its end.
    pub fn dump(&mut self, body: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let seq = self.send(body, NLM_F_DUMP)?;
        let mut out = Vec::new();
        loop {
            for msg in self.receive(seq)? {
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::{LinkAttribute, LinkMessage};

    #[test]
    fn dumps_links_and_reports_errors() {
        let mut nl = Netlink::open().unwrap();
        let links = nl
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
            .unwrap();
        let names: Vec<String> = links
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                }),
                _ => None,
            })
            .collect();
        assert!(names.iter().any(|n| n == "lo"), "{names:?}");
        // Deleting a link that does not exist: the kernel's errno comes back.
        let mut gone = LinkMessage::default();
        gone.header.index = 0x7fff_fff0;
        let e = nl
            .request(RouteNetlinkMessage::DelLink(gone), 0)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(19), "ENODEV: {e}");
    }
}
