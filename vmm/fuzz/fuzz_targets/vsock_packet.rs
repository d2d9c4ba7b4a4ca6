//! Fuzz the vsock packet parser and writer (`vmm::devices::vsock::packet`) on descriptor
//! chains laid out by the input in guest memory that has a hole and two edges.
//!
//! Input: one knob byte, then descriptors of 12 bytes each (address, length, flags, and a
//! payload length for the rx write), then the bytes that fill guest memory. The tx parser
//! must never panic, read only what the chain describes, and return exactly the header
//! and payload that the chain's bytes hold; an rx chain it accepts must take the header
//! and payload that fit it, byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::vsock::packet::{
    check_tx_header, parse_rx_chain, read_tx_chain, write_rx_chain, PacketError, PacketHeader,
    HDR_SIZE, MAX_CHAIN_DESCS, MAX_PKT_DATA, OP_RW,
};

/// Guest memory: two regions with a hole between them, and nothing past the second.
const REGIONS: [(u64, usize); 2] = [(0, 0x2000), (0x3000, 0x2000)];
/// Addresses are mostly drawn below this (the regions, the hole, a little beyond).
const SPAN: u64 = 0x6000;

struct Desc {
    desc: Descriptor,
    /// The payload length to put in an rx chain.
    rx_len: u16,
}

fn descriptor(raw: &[u8; 12]) -> Desc {
    let addr = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
    let flags = u16::from_le_bytes([raw[8], raw[9]]);
    // Mostly addresses and lengths near guest memory, sometimes anything (the top bit).
    let addr = if addr & 0x8000_0000 != 0 {
        u64::MAX - u64::from(addr & 0xffff)
    } else {
        u64::from(addr) % SPAN
    };
    let len = if len & 0x8000_0000 != 0 {
        len
    } else {
        len % 0x2400
    };
    Desc {
        desc: Descriptor::new(addr, len, flags, 0),
        rx_len: u16::from_le_bytes([raw[10], raw[11]]),
    }
}

/// The bytes a chain holds, read descriptor by descriptor until `want` bytes (the model
/// the parser is checked against), and how many descriptors held them. `None`: a
/// descriptor in the way is outside memory.
fn gather(mem: &GuestMemoryMmap, descs: &[Descriptor], want: usize) -> Option<(Vec<u8>, usize)> {
    let mut out = Vec::with_capacity(want);
    let mut used = 0;
    for (i, d) in descs.iter().enumerate() {
        if out.len() == want {
            break;
        }
        let n = (d.len() as usize).min(want - out.len());
        if n == 0 {
            continue;
        }
        let mut buf = vec![0u8; n];
        mem.read_slice(&mut buf, d.addr()).ok()?;
        out.extend_from_slice(&buf);
        used = i + 1;
    }
    (out.len() == want).then_some((out, used))
}

fn disjoint(descs: &[Descriptor]) -> bool {
    let ranges: Vec<(u64, u64)> = descs
        .iter()
        .filter(|d| d.len() > 0)
        .map(|d| (d.addr().0, d.addr().0.saturating_add(u64::from(d.len()))))
        .collect();
    ranges
        .iter()
        .enumerate()
        .all(|(i, a)| ranges.iter().skip(i + 1).all(|b| a.1 <= b.0 || b.1 <= a.0))
}

fuzz_target!(|data: &[u8]| {
    let Some((&knob, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(knob & 7);
    let Some((table, image)) = rest.split_at_checked(count * 12) else {
        return;
    };
    let mut descs: Vec<Desc> = table
        .chunks_exact(12)
        .filter_map(|c| c.try_into().ok())
        .map(descriptor)
        .collect();
    if knob & 0x08 != 0 && !descs.is_empty() {
        // A chain longer than any queue: the parsers must stop at their cap.
        let copies: Vec<Descriptor> = descs.iter().map(|d| d.desc).collect();
        while descs.len() <= MAX_CHAIN_DESCS + 1 {
            for d in &copies {
                descs.push(Desc {
                    desc: *d,
                    rx_len: 0,
                });
            }
        }
    }
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&REGIONS.map(|(start, len)| (GuestAddress(start), len)))
            .expect("guest memory");
    for (i, (start, len)) in REGIONS.iter().enumerate() {
        let from = (i * len).min(image.len());
        let to = ((i + 1) * len).min(image.len());
        mem.write_slice(&image[from..to], GuestAddress(*start))
            .expect("inside memory");
    }
    let chain: Vec<Descriptor> = descs.iter().map(|d| d.desc).collect();

    // tx: guest to host.
    let room = if knob & 0x10 != 0 { 100 } else { MAX_PKT_DATA };
    let mut payload = vec![0u8; room];
    match read_tx_chain(&mem, chain.iter().copied(), &mut payload) {
        Ok((hdr, n)) => {
            assert!(n <= room);
            assert_eq!(n, if hdr.op == OP_RW { hdr.len as usize } else { 0 });
            let (bytes, used) = gather(&mem, &chain, HDR_SIZE + n).expect("the parser read these");
            // Descriptors after the payload are ignored; those before it are checked.
            assert!(used <= MAX_CHAIN_DESCS);
            assert!(chain[..used].iter().all(|d| !d.is_write_only()));
            let head: &[u8; HDR_SIZE] = bytes[..HDR_SIZE].try_into().expect("header size");
            assert_eq!(PacketHeader::from_bytes(head), hdr);
            assert_eq!(&bytes[HDR_SIZE..], &payload[..n]);
            let _ = check_tx_header(&hdr, 3);
        }
        Err(e) => {
            let _ = e.to_string();
            let _ = e.rst_target(3);
            if let PacketError::ShortHeader { got } = e {
                assert!(got < HDR_SIZE);
            }
            if let PacketError::TooLong(hdr) = e {
                assert!(hdr.len as usize > room);
            }
        }
    }

    // rx: host to guest, a header from the image and a payload as long as asked.
    let mut head = [0u8; HDR_SIZE];
    for (d, s) in head.iter_mut().zip(image) {
        *d = *s;
    }
    let mut hdr = PacketHeader::from_bytes(&head);
    assert_eq!(PacketHeader::from_bytes(&hdr.to_bytes()), hdr);
    let mut bufs = Vec::new();
    if let Ok(cap) = parse_rx_chain(&mem, chain.iter().copied(), &mut bufs) {
        assert!(cap >= HDR_SIZE);
        assert!(chain.iter().all(|d| d.is_write_only()));
        assert_eq!(cap, chain.iter().map(|d| d.len() as usize).sum::<usize>());
        let want = descs.first().map_or(0, |d| usize::from(d.rx_len));
        let len = want.min(cap - HDR_SIZE).min(MAX_PKT_DATA);
        let body: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5a).collect();
        hdr.len = len as u32;
        let written = write_rx_chain(&mem, &bufs, &hdr, &body);
        assert_eq!(written, Ok((HDR_SIZE + len) as u32));
        if disjoint(&chain) {
            let (back, _) = gather(&mem, &chain, HDR_SIZE + len).expect("the writer wrote these");
            assert_eq!(&back[..HDR_SIZE], &hdr.to_bytes()[..]);
            assert_eq!(&back[HDR_SIZE..], &body[..]);
        }
        // More than the chain holds is refused, never written past its end.
        let over = vec![0u8; cap - HDR_SIZE + 1];
        assert!(write_rx_chain(&mem, &bufs, &hdr, &over).is_err());
    }
});
