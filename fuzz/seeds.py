#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/corpus/TARGET/NAME): a few well-formed
inputs per target, so that a short run starts from requests a real guest
sends. Run from anywhere: python3 fuzz/seeds.py [TEMPLATE_STATE_FILE]."""
import json, os, struct, sys

HERE = os.path.dirname(os.path.abspath(__file__))
QUEUE_SPAN = 0x300  # zygote_vmm::fuzzing::QUEUE_SPAN
NEXT, WRITE = 1, 2


def memory(chains, buffers):
    """Guest memory as zygote_vmm::fuzzing lays it out: chains[i] is queue
    i's descriptors (addr, len, flags, next), each chain head made available."""
    end = max([a + len(b) for a, b in buffers] + [len(chains) * QUEUE_SPAN])
    mem = bytearray(end)
    for q, descs in enumerate(chains):
        base = q * QUEUE_SPAN
        nexts = {n for (_, _, f, n) in descs if f & NEXT}
        heads = [i for i in range(len(descs)) if i not in nexts]
        for i, (addr, length, flags, nxt) in enumerate(descs):
            mem[base + 16 * i: base + 16 * i + 16] = struct.pack("<QIHH", addr, length, flags, nxt)
        for slot, h in enumerate(heads):
            mem[base + 0x104 + 2 * slot: base + 0x106 + 2 * slot] = struct.pack("<H", h)
        mem[base + 0x102: base + 0x104] = struct.pack("<H", len(heads))
    for at, b in buffers:
        mem[at: at + len(b)] = b
    return bytes(mem)


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


B = 0x1000  # buffers from here

# rng: two writable buffers, then a read-only one.
write("rng", "fill", memory([[(B, 32, WRITE | NEXT, 1), (B + 64, 32, WRITE, 0), (B + 128, 8, 0, 0)]], []))

# block: header (type, reserved, sector), data, status.
def blk(kind, sector, data_len, data_flags):
    return [(B, 16, NEXT, 1), (B + 0x100, data_len, data_flags | NEXT, 2), (B + 0x400, 1, WRITE, 0)], \
        [(B, struct.pack("<IIQ", kind, 0, sector))]
for name, kind, sector, n, fl in [("read", 0, 1, 512, WRITE), ("write", 1, 0, 512, 0),
                                   ("flush", 4, 0, 0, WRITE), ("get-id", 8, 0, 20, WRITE),
                                   ("past-end", 0, 127, 1024, WRITE), ("unknown", 99, 0, 16, WRITE)]:
    descs, bufs = blk(kind, sector, n, fl)
    write("block", name, memory([descs], bufs))

# net: rx (queue 0) writable buffers; tx (queue 1) a 12-byte header and a frame.
frame = bytes(12) + bytes.fromhex("ffffffffffff020000000001" "0806") + bytes(46)
write("net", "tx-rx", memory([[(B, 2048, WRITE, 0), (B + 0x800, 2048, WRITE, 0)],
                               [(B + 0x1000, len(frame), 0, 0)]],
                              [(B + 0x1000, frame)]) + frame)

# fs: FUSE INIT, LOOKUP of the share, GETATTR, each with a reply buffer.
def fuse(opcode, unique, nodeid, body):
    return struct.pack("<IIQQIIII", 40 + len(body), opcode, unique, nodeid, 0, 0, 1, 0) + body
reqs = [fuse(26, 1, 0, struct.pack("<IIII", 7, 31, 0x20000, 0) + bytes(48)),
        fuse(1, 2, 1, b"data\0"), fuse(3, 3, 1, bytes(16)), fuse(27, 4, 1, bytes(8) + bytes(8))]
descs, bufs, at = [], [], B
for r in reqs:
    i = len(descs)
    descs += [(at, len(r), NEXT, i + 1), (at + 0x200, 0x1000, WRITE, 0)]
    bufs.append((at, r))
    at += 0x1400
write("fs", "init-lookup-getattr", memory([descs], bufs))

# vsock: tx packets (header: src_cid, dst_cid, src_port, dst_port, len,
# type, op, flags, buf_alloc, fwd_cnt) — a connect to a host port nobody
# serves, data to no connection, a credit request, a reset; rx buffers.
def pkt(op, port, payload=b""):
    return struct.pack("<QQIIIHHIII", 3, 2, 1024, port, len(payload), 1, op, 0, 65536, 0) + payload
pkts = [pkt(1, 1024), pkt(5, 52, b"hello"), pkt(7, 52), pkt(3, 1024), pkt(4, 52)]
tx, bufs, at = [], [], B + 0x2000
for p in pkts:
    tx.append((at, len(p), 0, 0)); bufs.append((at, p)); at += 0x100
rx = [(B + 0x100 * i, 0x100, WRITE, 0) for i in range(8)]
write("vsock", "connect-rw-credit-rst", memory([rx, tx], bufs))

# agent frames: big-endian length, then a protobuf Request/Response.
def frame_(msg):
    return struct.pack(">I", len(msg)) + msg
ping = bytes([0x08, 0x01, 0x12, 0x00])                     # Request{id 1, ping {}}
pong = bytes([0x08, 0x01, 0x12, 0x05, 0x0a, 0x03]) + b"0.1"  # Response{id 1, field 2 {field 1 "0.1"}}
write("agent_frames", "ping-pong", frame_(ping) + frame_(pong) + frame_(b""))

# oci_spec: what ctr and the CRI send, with a seccomp profile and sysctls.
spec = {
    "ociVersion": "1.0.2",
    "process": {"args": ["/bin/sh", "-c", "true"], "cwd": "/", "env": ["PATH=/bin"],
                "user": {"uid": 0, "gid": 0, "additionalGids": [10]},
                "capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": ["CAP_KILL"]},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                "noNewPrivileges": True, "oomScoreAdj": 100},
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "pod",
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
               {"destination": "/etc/hosts", "type": "bind", "source": "/run/x/hosts", "options": ["rbind", "ro"]}],
    "linux": {"sysctl": {"net.ipv4.ip_forward": "1", "kernel.shmmax": "65536"},
              "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"],
              "resources": {"memory": {"limit": 1048576}, "cpu": {"quota": 1000, "period": 100000}},
              "seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
                          "architectures": ["SCMP_ARCH_X86_64"],
                          "syscalls": [{"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"},
                                       {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                                        "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
                                       {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                                        "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
                                       {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]}},
}
write("oci_spec", "seccomp-sysctl", json.dumps(spec).encode())

# machine_state: a template's state payload (after its 32-byte header).
if len(sys.argv) > 1:
    with open(sys.argv[1], "rb") as f:
        write("machine_state", "template", f.read()[32:])
