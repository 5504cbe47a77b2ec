//! The backend driven as its device thread drives it, against real host
//! streams and a guest simulated on its queues.

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
        let dir = std::env::temp_dir().join(format!("zygote-vsock-{name}-{}", std::process::id()));
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

/// A guest that floods the device with packets to no connection, connects
/// to ports nobody listens on and asks for credit, while it takes none of
/// the answers: the host's queue stays bounded, the work per packet does
/// not grow with it, and a connection made afterwards still works.
#[test]
fn a_guest_flooding_without_reading_cannot_grow_the_host() {
    let mut h = Harness::new("flood");
    let (mut client, local) = h.host_connect(1024);
    h.send(h.hdr(op::RESPONSE, 1024, local, 0), &[]);
    assert_eq!(read_line(&mut client), format!("OK {local}"));
    let started = std::time::Instant::now();
    for i in 0..30_000u32 {
        let hdr = match i % 3 {
            0 => h.hdr(op::RW, 7000 + i, 9, 0),
            1 => h.hdr(op::REQUEST, 7000 + i, 40_000 + i, 0),
            _ => h.hdr(op::CREDIT_REQUEST, 1024, local, 0),
        };
        h.send(hdr, &[]);
        assert!(h.backend.control.len() <= MAX_ANSWERS_QUEUED);
    }
    eprintln!(
        "30,000 flood packets in {:?}; {} controls queued",
        started.elapsed(),
        h.backend.control.len()
    );
    assert_eq!(h.backend.control.len(), MAX_ANSWERS_QUEUED);
    assert_eq!(h.backend.connection_count(), 1, "no connection was made");
    // The established connection still carries data both ways.
    h.send(h.hdr(op::RW, 1024, local, 5), b"hello");
    let mut buf = [0u8; 5];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    // Once the guest reads again the answers drain, and host data follows.
    client.write_all(b"world").unwrap();
    h.pump();
    let mut got_data = false;
    for _ in 0..MAX_ANSWERS_QUEUED + 4 {
        match h.recv() {
            Some((hdr, data)) if hdr.op == op::RW => {
                assert_eq!(data, b"world");
                got_data = true;
                break;
            }
            Some(_) => {}
            None => h.pump(),
        }
    }
    assert!(
        got_data,
        "the host's data reached the guest after the flood"
    );
}
