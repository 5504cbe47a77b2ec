//! TCP connections that existed at the fork point: listed through
//! `NETLINK_SOCK_DIAG` and torn down with `SOCK_DESTROY` (the process sees
//! `ECONNABORTED`, as after `ss -K`). Every fork has a copy of the template's
//! connections with the same sequence numbers; a peer outside the VM would
//! see the same connection from several machines.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg` up to and including `idiag_inode`.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;
const TCP_LISTEN: u8 = 10;

/// One TCP socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    /// Local address and port.
    pub local: (IpAddr, u16),
    /// Remote address and port.
    pub remote: (IpAddr, u16),
    /// Kernel TCP state (1 = ESTABLISHED, 10 = LISTEN, ...).
    pub state: u8,
    /// Socket inode.
    pub inode: u32,
    family: u8,
    /// The raw `inet_diag_sockid` (with its cookie), to name it to the kernel.
    id: [u8; SOCKID_LEN],
}

impl TcpSocket {
    /// A connection (not a listener) whose peer is outside this machine.
    pub fn is_external_connection(&self) -> bool {
        self.state != TCP_LISTEN && !self.remote.0.is_loopback() && !self.remote.0.is_unspecified()
    }
}

fn netlink() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A netlink message of `kind` carrying an `inet_diag_req_v2`.
fn request(kind: u16, flags: u16, family: u8, states: u32, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let len = NLMSG_HDR + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(id);
    m
}

fn send(fd: &OwnedFd, msg: &[u8]) -> std::io::Result<()> {
    // SAFETY: sending a buffer we own to the kernel (no address: netlink's default).
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: receiving into a buffer we own, of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn address(family: u8, raw: &[u8]) -> IpAddr {
    if i32::from(family) == libc::AF_INET {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        let octets: [u8; 16] = raw[..16].try_into().expect("16 bytes");
        IpAddr::V6(Ipv6Addr::from(octets))
    }
}

fn parse(msg: &[u8]) -> Option<TcpSocket> {
    if msg.len() < MSG_LEN {
        return None;
    }
    let family = msg[0];
    let id: [u8; SOCKID_LEN] = msg[4..4 + SOCKID_LEN].try_into().ok()?;
    Some(TcpSocket {
        local: (
            address(family, &id[4..20]),
            u16::from_be_bytes([id[0], id[1]]),
        ),
        remote: (
            address(family, &id[20..36]),
            u16::from_be_bytes([id[2], id[3]]),
        ),
        state: msg[1],
        inode: u32_at(msg, 4 + SOCKID_LEN + 16),
        family,
        id,
    })
}

/// Every TCP socket (IPv4 and IPv6) of this network namespace.
pub fn tcp_sockets() -> std::io::Result<Vec<TcpSocket>> {
    let fd = netlink()?;
    let mut found = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let dump = request(
            SOCK_DIAG_BY_FAMILY,
            libc::NLM_F_DUMP as u16,
            family,
            u32::MAX,
            &[0; SOCKID_LEN],
        );
        send(&fd, &dump)?;
        'dump: loop {
            let n = recv(&fd, &mut buf)?;
            let mut at = 0;
            while at + NLMSG_HDR <= n {
                let len = u32_at(&buf, at) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                if len < NLMSG_HDR || at + len > n {
                    break;
                }
                match i32::from(kind) {
                    libc::NLMSG_DONE => break 'dump,
                    libc::NLMSG_ERROR => {
                        let errno = -(u32_at(&buf, at + NLMSG_HDR) as i32);
                        return Err(std::io::Error::from_raw_os_error(errno));
                    }
                    _ => found.extend(parse(&buf[at + NLMSG_HDR..at + len])),
                }
                at += (len + 3) & !3;
            }
            if n == 0 {
                break;
            }
        }
    }
    Ok(found)
}

/// Tears `socket` down (`SOCK_DESTROY`).
pub fn destroy(socket: &TcpSocket) -> std::io::Result<()> {
    let fd = netlink()?;
    let msg = request(
        SOCK_DESTROY,
        libc::NLM_F_ACK as u16,
        socket.family,
        u32::MAX,
        &socket.id,
    );
    send(&fd, &msg)?;
    let mut buf = [0u8; 256];
    let n = recv(&fd, &mut buf)?;
    if n >= NLMSG_HDR + 4 && i32::from(u16::from_ne_bytes([buf[4], buf[5]])) == libc::NLMSG_ERROR {
        let errno = -(u32_at(&buf, NLMSG_HDR) as i32);
        if errno != 0 {
            return Err(std::io::Error::from_raw_os_error(errno));
        }
    }
    Ok(())
}

/// Destroys the TCP connections `which` selects; says what it did.
pub fn destroy_where(which: impl Fn(&TcpSocket) -> bool) -> String {
    let sockets = match tcp_sockets() {
        Ok(s) => s,
        Err(e) => return format!("failed: cannot list TCP sockets: {e}"),
    };
    let (mut destroyed, mut failed) = (0, Vec::new());
    let chosen: Vec<&TcpSocket> = sockets.iter().filter(|s| which(s)).collect();
    for s in &chosen {
        match destroy(s) {
            Ok(()) => destroyed += 1,
            Err(e) => failed.push(format!("{}:{}: {e}", s.remote.0, s.remote.1)),
        }
    }
    let mut text = format!(
        "{destroyed} TCP connections from before the fork destroyed, {} sockets kept (listeners, loopback)",
        sockets.len() - chosen.len()
    );
    if !failed.is_empty() {
        text = format!("failed: {text}; not destroyed: {}", failed.join(", "));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// Needs root (SOCK_DESTROY asks for CAP_NET_ADMIN) and a kernel with
    /// CONFIG_INET_DIAG_DESTROY, as the guest's has.
    #[test]
    fn a_connection_is_listed_and_destroyed() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: not root");
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let client_port = client.local_addr().unwrap().port();
        let sockets = tcp_sockets().unwrap();
        let mine = sockets
            .iter()
            .find(|s| s.local.1 == client_port && s.remote.1 == port)
            .expect("the client's socket is listed");
        assert_eq!(mine.state, 1, "established");
        assert!(!mine.is_external_connection(), "loopback is kept");
        assert!(
            sockets
                .iter()
                .any(|s| s.local.1 == port && s.state == TCP_LISTEN)
        );
        let text = destroy_where(|s| s.local.1 == client_port && s.remote.1 == port);
        assert!(text.starts_with("1 TCP connections"), "{text}");
        let mut byte = [0u8; 1];
        let err = client.read(&mut byte).expect_err("the socket is gone");
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
        // The other end sees the reset.
        let _ = server.write_all(b"x");
        assert!(matches!(server.read(&mut byte), Ok(0) | Err(_)));
    }
}
