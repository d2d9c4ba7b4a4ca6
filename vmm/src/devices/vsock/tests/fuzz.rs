//! Randomized tests: thousands of random headers and descriptor chains thrown at the
//! parser and at the whole device. A fixed seed keeps failures reproducible.

use std::os::unix::net::UnixListener;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::vsock::packet::{
    parse_rx_chain, read_tx_chain, write_rx_chain, MAX_PKT_DATA, OP_CREDIT_REQUEST, OP_RESPONSE,
    OP_RST, OP_SHUTDOWN,
};
use crate::devices::vsock::unix::MAX_RAW_PKTS;

/// xorshift64*: small, fast, good enough to scatter inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// Mostly plausible values, sometimes extremes, sometimes anything.
    fn pick_u32(&mut self, plausible: &[u32]) -> u32 {
        match self.below(10) {
            0 => u32::MAX,
            1 => 0,
            2 => self.next() as u32,
            _ => plausible[self.below(plausible.len() as u64) as usize],
        }
    }
}

fn random_header(rng: &mut Rng) -> PacketHeader {
    let op = match rng.below(12) {
        0 => 0,
        1 => 8 + rng.below(100) as u16,
        n => (1 + n % 7) as u16,
    };
    PacketHeader {
        src_cid: if rng.chance(90) { CID } else { rng.next() },
        dst_cid: if rng.chance(90) {
            HOST_CID
        } else {
            rng.below(5)
        },
        src_port: rng.pick_u32(&[1000, 1001, 1002, 5000]),
        dst_port: rng.pick_u32(&[80, 1024, 52]),
        len: rng.pick_u32(&[0, 1, 43, 44, 100, 4096, 65536, 65537]),
        type_: if rng.chance(90) {
            TYPE_STREAM
        } else {
            rng.below(4) as u16
        },
        op,
        flags: rng.pick_u32(&[0, 1, 2, 3]),
        buf_alloc: rng.pick_u32(&[0, 100, 4096, 262_144]),
        fwd_cnt: rng.pick_u32(&[0, 100, 4096]),
    }
}

/// A random descriptor: mostly inside guest memory, sometimes at its edge or beyond.
fn random_desc(rng: &mut Rng, payload: u64) -> (u64, u32, u16) {
    let addr = match rng.below(10) {
        0 => rng.next(),
        1 => MEM_SIZE as u64 - rng.below(64),
        2 => u64::MAX - rng.below(64),
        _ => payload + rng.below(0x1000),
    };
    let len = match rng.below(8) {
        0 => 0,
        1 => rng.next() as u32,
        2 => 44,
        3 => rng.below(44) as u32,
        _ => rng.below(70_000) as u32,
    };
    let flags = if rng.chance(15) {
        VIRTQ_DESC_F_WRITE
    } else {
        0
    };
    (addr, len, flags)
}

#[test]
fn parser_survives_random_chains() {
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut data = vec![0u8; MAX_PKT_DATA];
    let mut bufs = Vec::new();
    let mut ok = 0;

    for _ in 0..20_000 {
        let hdr = random_header(&mut rng);
        let payload = 0x10_0000 + rng.below(0x100_0000);
        mem.write_slice(&hdr.to_bytes(), GuestAddress(payload))
            .unwrap();
        let n = rng.below(6) as usize;
        let descs: Vec<Descriptor> = (0..n)
            .map(|_| {
                let (a, l, f) = random_desc(&mut rng, payload);
                Descriptor::new(a, l, f, 0)
            })
            .collect();

        if let Ok((h, len)) = read_tx_chain(&mem, descs.iter().copied(), &mut data) {
            ok += 1;
            assert!(len <= MAX_PKT_DATA);
            assert_eq!(len, if h.op == OP_RW { h.len as usize } else { 0 });
        }
        let writable: Vec<Descriptor> = descs
            .iter()
            .map(|d| Descriptor::new(d.addr().0, d.len(), VIRTQ_DESC_F_WRITE, 0))
            .collect();
        if let Ok(cap) = parse_rx_chain(&mem, writable, &mut bufs) {
            let take = (cap - HDR_SIZE).min(data.len()).min(hdr.len as usize);
            let reply = PacketHeader {
                len: take as u32,
                ..hdr
            };
            assert_eq!(
                write_rx_chain(&mem, &bufs, &reply, &data[..take]),
                Ok((HDR_SIZE + take) as u32)
            );
        }
    }

    // The generator must reach the accepting paths too, not only the refusals.
    assert!(ok > 1000, "only {ok} chains parsed");
}

/// Fill the tx ring with random descriptor tables and heads (out-of-range indexes, loops,
/// random flags), then let the device loose on them.
fn throw_random_tx<B: VsockBackend + 'static>(guest: &mut Guest<B>, rng: &mut Rng, rounds: usize) {
    for _ in 0..rounds {
        let heads = 1 + rng.below(32);
        for _ in 0..heads {
            let payload = guest.alloc(0x2000);
            let hdr = random_header(rng);
            guest
                .mem
                .write_slice(&hdr.to_bytes(), GuestAddress(payload))
                .unwrap();
            let len = rng.below(5) as u16 + 1;
            let head = rng.below(u64::from(QSIZE)) as u16;
            for i in 0..len {
                let index = (head + i) % QSIZE;
                let (mut addr, mut dlen, mut flags) = random_desc(rng, payload);
                if i == 0 && rng.chance(70) {
                    (addr, dlen, flags) = (payload, 44, 0);
                }
                let next = match rng.below(10) {
                    0 => rng.next() as u16,
                    1 => head,
                    _ => (index + 1) % QSIZE,
                };
                if i + 1 < len || rng.chance(5) {
                    flags |= VIRTQ_DESC_F_NEXT;
                }
                guest
                    .txq
                    .write_desc(&guest.mem, index, addr, dlen, flags, next);
            }
            let published = if rng.chance(3) {
                rng.next() as u16
            } else {
                head
            };
            guest.txq.publish(&guest.mem, published);
        }
        guest.kick_tx();
        // Take whatever came back, offering fresh rx buffers now and then.
        while guest.recv().is_some() {}
        if rng.chance(50) {
            guest.give_rx(rng.below(8) as usize, 64 + rng.below(4096) as u32);
        }
    }
}

#[test]
fn device_survives_random_tx_chains_with_recording_backend() {
    let mut guest = Guest::activate(Vsock::with_backend(CID, RecordingBackend::new()).unwrap());
    let mut rng = Rng(0xdead_beef_cafe_f00d);

    // RecordingBackend asserts that only checked packets with exact payloads reach it.
    throw_random_tx(&mut guest, &mut rng, 400);

    let dev = guest.dev.lock().unwrap();
    assert!(!dev.backend().sent.is_empty());
    assert!(!dev.backend().resets.is_empty());
}

#[test]
fn device_survives_random_tx_chains_with_unix_backend() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let _l80 = UnixListener::bind(dir.path("v.sock_80")).unwrap();
    let _l1024 = UnixListener::bind(dir.path("v.sock_1024")).unwrap();
    let config = UnixBackendConfig {
        max_connections: 16,
        ..UnixBackendConfig::default()
    };
    let mut guest = Guest::unix(&uds, config);
    let mut rng = Rng(0x0123_4567_89ab_cdef);

    for _ in 0..20 {
        throw_random_tx(&mut guest, &mut rng, 20);
        let (conns, handshakes, pending) = guest.backend_counts();
        assert!(conns <= 16);
        assert_eq!(handshakes, 0);
        assert!(pending <= MAX_RAW_PKTS + 16);
    }
}

#[test]
fn device_survives_random_protocol_sequences() {
    // Well-formed chains, random protocol: ops in any order on a few port pairs, with a
    // host listener that accepts and echoes nothing.
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let listener = UnixListener::bind(dir.path("v.sock_80")).unwrap();
    listener.set_nonblocking(true).unwrap();
    let config = UnixBackendConfig {
        max_connections: 8,
        conn_buf_size: 4096,
        ..UnixBackendConfig::default()
    };
    let mut guest = Guest::unix(&uds, config);
    let mut rng = Rng(42);
    let mut accepted = Vec::new();
    let ops = [
        OP_REQUEST,
        OP_RESPONSE,
        OP_RST,
        OP_SHUTDOWN,
        OP_RW,
        OP_CREDIT_UPDATE,
        OP_CREDIT_REQUEST,
    ];

    for step in 0..5000 {
        let mut hdr = guest_hdr(ops[rng.below(7) as usize], 1000 + rng.below(4) as u32, 80);
        hdr.flags = rng.below(4) as u32;
        hdr.buf_alloc = rng.pick_u32(&[0, 100, 4096]);
        hdr.fwd_cnt = rng.pick_u32(&[0, 50, 4096]);
        let data = vec![
            step as u8;
            if hdr.op == OP_RW {
                rng.below(3000) as usize
            } else {
                0
            }
        ];
        hdr.len = data.len() as u32;
        guest.queue_tx(&hdr, &data);
        if rng.chance(30) {
            guest.kick_tx();
        }
        if rng.chance(20) {
            while guest.recv().is_some() {}
            guest.give_rx(4, 2048);
        }
        while let Ok((s, _)) = listener.accept() {
            s.set_nonblocking(true).unwrap();
            accepted.push(s);
        }
        if rng.chance(5) && !accepted.is_empty() {
            let i = rng.below(accepted.len() as u64) as usize;
            drop(accepted.swap_remove(i));
            guest.pump();
        }
        let (conns, _, pending) = guest.backend_counts();
        assert!(conns <= 8);
        assert!(pending <= MAX_RAW_PKTS + 8);
    }
}
