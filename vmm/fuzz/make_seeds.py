#!/usr/bin/env python3
"""Writes the seed inputs of the vmm fuzz targets into seeds/<target>/ (hand-made, valid
inputs; the layouts are described at the top of each target)."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def vsock_hdr(op, length, src=3, dst=2, sport=1000, dport=52, buf_alloc=4096):
    return struct.pack("<QQIIIHHIII", src, dst, sport, dport, length, 1, op, 0, buf_alloc, 0)


# vsock_packet: knob, descriptors (addr u32, len u32, flags u16, rx_len u16), memory.
def desc12(addr, length, flags=0, rx_len=0):
    return struct.pack("<IIHH", addr, length, flags, rx_len)


rw = vsock_hdr(5, 5) + b"hello"
write("vsock_packet", "rw-one-desc", bytes([1]) + desc12(0, 49) + rw)
write("vsock_packet", "rw-split",
      bytes([3]) + desc12(0, 10) + desc12(10, 34) + desc12(0x3000, 5)
      + vsock_hdr(5, 5))  # the payload comes from the second region (zeros)
write("vsock_packet", "request", bytes([1]) + desc12(0, 44) + vsock_hdr(1, 0))
write("vsock_packet", "rx-two-bufs",
      bytes([2]) + desc12(0x100, 20, 2, 30) + desc12(0x200, 200, 2) + vsock_hdr(5, 0))
write("vsock_packet", "long-chain", bytes([0x09]) + desc12(0x40, 0) + vsock_hdr(5, 0))

# virtqueue: 16 setup bytes, patches, memory. Queues at 0x000 (rx), 0x400 (tx), 0x800
# (event): descriptors, avail ring +0x100, used ring +0x200. Buffers from 0xc00.
def vq_setup(sizes=(4, 4, 4), patches=0, pending=0, pending_len=0, rx_first=0):
    s = b""
    for size in sizes:
        s += bytes([size, 0, 0, 0])
    return s + bytes([patches, pending, pending_len, rx_first])


def ring_desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def vq_memory(rx_descs, rx_heads, tx_descs, tx_heads, buffers):
    mem = bytearray(0xc00)
    for base, descs, heads in ((0x000, rx_descs, rx_heads), (0x400, tx_descs, tx_heads)):
        for i, d in enumerate(descs):
            mem[base + 16 * i: base + 16 * i + 16] = d
        avail = struct.pack("<HH", 0, len(heads)) + b"".join(struct.pack("<H", h) for h in heads)
        mem[base + 0x100: base + 0x100 + len(avail)] = avail
    for addr, data in buffers:
        if len(mem) < addr + len(data):
            mem.extend(bytes(addr + len(data) - len(mem)))
        mem[addr: addr + len(data)] = data
    return bytes(mem)


req = vsock_hdr(1, 0, dport=80)
pkt = vsock_hdr(5, 5) + b"hello"
mem = vq_memory(
    [ring_desc(0xe00, 256, 2, 0), ring_desc(0xf00, 256, 2, 0)], [0, 1],
    [ring_desc(0xc00, 44, 0, 0), ring_desc(0xc40, 44, 1, 2), ring_desc(0xc80, 5, 0, 0)], [0, 1],
    [(0xc00, req), (0xc40, pkt[:44]), (0xc80, b"hello")])
write("virtqueue", "tx-request-and-rw", vq_setup() + mem)
write("virtqueue", "rx-pending", vq_setup(pending=2, pending_len=1, rx_first=1) + mem)
patch = struct.pack("<HB", 0x400 + 0x102, 2) + struct.pack("<H", 7)
write("virtqueue", "avail-jump", vq_setup(patches=1) + patch + mem)
indirect = vq_memory(
    [ring_desc(0xc00, 32, 4, 0)], [0], [], [],
    [(0xc00, ring_desc(0xe00, 40, 3, 1) + ring_desc(0xe40, 200, 2, 0))])
write("virtqueue", "rx-indirect", vq_setup(pending=1, rx_first=1) + indirect)
# The fs device (bit 7 of the last set-up byte): a GETATTR of the root and a LOOKUP of f on
# the request queue (at 0x400), each with a reply buffer.
getattr_req = struct.pack("<IIQQIIII", 56, 3, 1, 1, 0, 0, 1, 0) + bytes(16)
lookup_req = struct.pack("<IIQQIIII", 42, 1, 2, 1, 0, 0, 1, 0) + b"f\0"
fs_mem = vq_memory(
    [], [],
    [ring_desc(0xc00, 56, 1, 1), ring_desc(0xd00, 256, 2, 0),
     ring_desc(0xc80, 42, 1, 3), ring_desc(0xe00, 256, 2, 0)], [0, 2],
    [(0xc00, getattr_req), (0xc80, lookup_req), (0xe00, bytes(256))])
write("virtqueue", "fs-requests", vq_setup(rx_first=0x80) + fs_mem)

# fuse_request: knob, then requests (flags u8, len u16, bytes).
ROOM_4K = 5
NODE = 0x10   # node id from those handed out, by the low byte of unique
FH = 0x20     # first argument from the handles handed out
SPLIT = 0x40
HIPRIO = 0x80


def fuse(opcode, args=b"", unique=0, node=1):
    hdr = struct.pack("<IIQQIIII", 40 + len(args), opcode, unique, node, 0, 0, 1, 0)
    return hdr + args


def rec(flags, data):
    return struct.pack("<BH", flags, len(data)) + data


LOOKUP, FORGET, GETATTR, SETATTR, READLINK = 1, 2, 3, 4, 5
MKDIR, UNLINK, RENAME, LINK, OPEN, READ, WRITE = 9, 10, 12, 13, 14, 15, 16
RELEASE, OPENDIR, READDIR, CREATE, READDIRPLUS, STATFS = 18, 27, 28, 35, 44, 17


def read_in(size, offset=0):
    return struct.pack("<QQIIQII", 0, offset, size, 0, 0, 0, 0)


# Look up f (node 1 of the table), open it (handle 0), read it.
write("fuse_request", "read-file", bytes([0])
      + rec(ROOM_4K, fuse(LOOKUP, b"f\0", 1))
      + rec(ROOM_4K | NODE, fuse(OPEN, struct.pack("<II", 0, 0), 1))
      + rec(ROOM_4K | NODE | FH, fuse(READ, read_in(1024), 1))
      + rec(ROOM_4K | NODE | FH, fuse(RELEASE, bytes(24), 1)))
# Try the denied names, the hard link, the symlink, the denied file in d.
write("fuse_request", "denied", bytes([0])
      + rec(ROOM_4K, fuse(LOOKUP, b"secret\0", 0))
      + rec(ROOM_4K, fuse(LOOKUP, b"hard\0", 0))
      + rec(ROOM_4K, fuse(LOOKUP, b"link\0", 0))
      + rec(ROOM_4K | NODE, fuse(READLINK, b"", 1))
      + rec(ROOM_4K, fuse(LOOKUP, b"d\0", 2))
      + rec(ROOM_4K | NODE, fuse(LOOKUP, b"secret2\0", 2))
      + rec(ROOM_4K | NODE, fuse(OPEN, struct.pack("<II", 0, 0), 2))
      + rec(ROOM_4K | NODE | FH, fuse(READ, read_in(1024), 0))
      + rec(ROOM_4K | NODE, fuse(LINK, struct.pack("<Q", 1) + b"again\0", 1)))
# List the root both ways.
write("fuse_request", "readdir", bytes([1])
      + rec(ROOM_4K, fuse(OPENDIR, struct.pack("<II", 0, 0)))
      + rec(ROOM_4K | FH, fuse(READDIR, read_in(2048)))
      + rec(ROOM_4K | FH, fuse(READDIRPLUS, read_in(2048)))
      + rec(ROOM_4K, fuse(STATFS))
      + rec(ROOM_4K | SPLIT, fuse(GETATTR, bytes(16))))
# Create, write, read back, rename, link, unlink, forget.
write("fuse_request", "write", bytes([0])
      + rec(ROOM_4K, fuse(CREATE, struct.pack("<IIII", 2, 0o644, 0o022, 0) + b"new\0"))
      + rec(ROOM_4K | NODE | FH, fuse(WRITE, struct.pack("<QQIIQII", 0, 0, 6, 0, 0, 0, 0) + b"abcdef", 1))
      + rec(ROOM_4K | FH | NODE, fuse(READ, read_in(64), 1))
      + rec(ROOM_4K, fuse(MKDIR, struct.pack("<II", 0o755, 0o022) + b"sub\0"))
      + rec(ROOM_4K, fuse(RENAME, struct.pack("<Q", 1) + b"new\0newer\0"))
      + rec(ROOM_4K, fuse(UNLINK, b"newer\0"))
      + rec(HIPRIO, fuse(FORGET, struct.pack("<Q", 1), 0, 1)))
