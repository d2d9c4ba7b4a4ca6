//! The virtio-vsock packet: header layout, the tx-chain parser and the rx-chain writer.
//!
//! Everything here treats the descriptor chain as hostile: each descriptor's direction,
//! address range and length is checked, the chain length is capped, the header must be
//! complete, its `len` may not exceed [`MAX_PKT_DATA`] nor the bytes the chain actually
//! carries, and guest memory is only touched through `vm-memory`'s checked accessors.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Size of the packet header on the wire (`struct virtio_vsock_hdr`, packed, little endian).
pub const HDR_SIZE: usize = 44;
/// Largest payload accepted from or sent to the guest in one packet (Linux uses the same).
pub const MAX_PKT_DATA: usize = 64 * 1024;
/// Most descriptors we walk in one chain (our queues are no larger than this).
pub const MAX_CHAIN_DESCS: usize = 256;

/// The host's CID: the only destination the guest may address.
pub const HOST_CID: u64 = 2;

/// `type` of a stream socket, the only type this device supports.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flags: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// A decoded `struct virtio_vsock_hdr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Why a guest packet or rx buffer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("descriptor chain longer than {MAX_CHAIN_DESCS} descriptors")]
    ChainTooLong,
    #[error("device-writable descriptor in a tx chain")]
    WriteOnlyInTx,
    #[error("device-readable descriptor in an rx chain")]
    ReadOnlyInRx,
    #[error("descriptor at {addr:#x}+{len} is outside guest memory")]
    BadAddress { addr: u64, len: u32 },
    #[error("chain holds {got} header bytes, need {HDR_SIZE}")]
    ShortHeader { got: usize },
    #[error("packet len {} exceeds the {MAX_PKT_DATA}-byte maximum", .0.len)]
    TooLong(PacketHeader),
    #[error("packet len {} but the chain carries {got} data bytes", .hdr.len)]
    ShortData { hdr: PacketHeader, got: usize },
    #[error("src_cid {} is not the guest's cid", .0.src_cid)]
    WrongSrcCid(PacketHeader),
    #[error("dst_cid {} is not the host", .0.dst_cid)]
    WrongDstCid(PacketHeader),
    #[error("unsupported socket type {}", .0.type_)]
    WrongType(PacketHeader),
    #[error("unknown op {}", .0.op)]
    UnknownOp(PacketHeader),
}

impl PacketError {
    /// The header of the refused packet when it is addressed well enough to answer with a
    /// RST (a header we could read, from `guest_cid` to the host); `None` when the packet
    /// is just dropped.
    pub fn rst_target(&self, guest_cid: u64) -> Option<&PacketHeader> {
        let hdr = match self {
            Self::TooLong(hdr)
            | Self::ShortData { hdr, .. }
            | Self::WrongType(hdr)
            | Self::UnknownOp(hdr) => hdr,
            Self::ChainTooLong
            | Self::WriteOnlyInTx
            | Self::ReadOnlyInRx
            | Self::BadAddress { .. }
            | Self::ShortHeader { .. }
            | Self::WrongSrcCid(_)
            | Self::WrongDstCid(_) => return None,
        };
        (hdr.src_cid == guest_cid && hdr.dst_cid == HOST_CID).then_some(hdr)
    }
}

impl PacketHeader {
    /// Decode a header from its wire bytes.
    pub fn from_bytes(bytes: &[u8; HDR_SIZE]) -> Self {
        let mut r = FieldReader(bytes.as_slice());
        Self {
            src_cid: r.u64(),
            dst_cid: r.u64(),
            src_port: r.u32(),
            dst_port: r.u32(),
            len: r.u32(),
            type_: r.u16(),
            op: r.u16(),
            flags: r.u32(),
            buf_alloc: r.u32(),
            fwd_cnt: r.u32(),
        }
    }

    /// Encode the header to its wire bytes.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let fields: [&[u8]; 10] = [
            &self.src_cid.to_le_bytes(),
            &self.dst_cid.to_le_bytes(),
            &self.src_port.to_le_bytes(),
            &self.dst_port.to_le_bytes(),
            &self.len.to_le_bytes(),
            &self.type_.to_le_bytes(),
            &self.op.to_le_bytes(),
            &self.flags.to_le_bytes(),
            &self.buf_alloc.to_le_bytes(),
            &self.fwd_cnt.to_le_bytes(),
        ];
        let mut out = [0u8; HDR_SIZE];
        for (dst, src) in out.iter_mut().zip(fields.iter().flat_map(|f| f.iter())) {
            *dst = *src;
        }
        out
    }

    /// A RST answering `self` (a guest packet): ports swapped, from the host to the guest.
    pub fn rst_reply(&self) -> Self {
        Self {
            src_cid: HOST_CID,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Self::default()
        }
    }
}

/// Reads little-endian fields off the front of a header; never panics (a short input,
/// impossible for a `[u8; HDR_SIZE]`, yields zeros).
struct FieldReader<'a>(&'a [u8]);

impl FieldReader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        match self.0.split_first_chunk::<N>() {
            Some((head, rest)) => {
                self.0 = rest;
                *head
            }
            None => [0; N],
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

/// Check a decoded tx header against what this device accepts from `guest_cid`.
pub fn check_tx_header(hdr: &PacketHeader, guest_cid: u64) -> Result<(), PacketError> {
    if hdr.src_cid != guest_cid {
        return Err(PacketError::WrongSrcCid(*hdr));
    }
    if hdr.dst_cid != HOST_CID {
        return Err(PacketError::WrongDstCid(*hdr));
    }
    if hdr.type_ != TYPE_STREAM {
        return Err(PacketError::WrongType(*hdr));
    }
    if !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&hdr.op) {
        return Err(PacketError::UnknownOp(*hdr));
    }
    Ok(())
}

/// Parse a tx chain: read the header and, for RW packets, the `len` payload bytes into
/// `data`. Returns the header and the number of payload bytes stored in `data`. `data`
/// must hold [`MAX_PKT_DATA`] bytes. Descriptors after the payload are ignored.
pub fn read_tx_chain<M, I>(
    mem: &M,
    descs: I,
    data: &mut [u8],
) -> Result<(PacketHeader, usize), PacketError>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let mut hdr_buf = [0u8; HDR_SIZE];
    let mut hdr_got = 0usize;
    let mut hdr: Option<PacketHeader> = None;
    let mut want = 0usize;
    let mut got = 0usize;

    for (i, desc) in descs.into_iter().enumerate() {
        if i >= MAX_CHAIN_DESCS {
            return Err(PacketError::ChainTooLong);
        }
        if desc.is_write_only() {
            return Err(PacketError::WriteOnlyInTx);
        }
        let bad = PacketError::BadAddress {
            addr: desc.addr().raw_value(),
            len: desc.len(),
        };
        let mut addr = desc.addr();
        let mut left = desc.len() as usize;

        if hdr.is_none() {
            let n = left.min(HDR_SIZE - hdr_got);
            let dst = hdr_buf.get_mut(hdr_got..hdr_got + n).ok_or(bad.clone())?;
            mem.read_slice(dst, addr).map_err(|_| bad.clone())?;
            hdr_got += n;
            left -= n;
            addr = addr.checked_add(n as u64).ok_or(bad.clone())?;
            if hdr_got == HDR_SIZE {
                let h = PacketHeader::from_bytes(&hdr_buf);
                if h.len as usize > MAX_PKT_DATA.min(data.len()) {
                    return Err(PacketError::TooLong(h));
                }
                want = if h.op == OP_RW { h.len as usize } else { 0 };
                hdr = Some(h);
            }
        }
        if hdr.is_some() && got < want && left > 0 {
            let n = left.min(want - got);
            let dst = data
                .get_mut(got..got + n)
                .ok_or(PacketError::TooLong(PacketHeader::default()))?;
            mem.read_slice(dst, addr).map_err(|_| bad)?;
            got += n;
        }
        if hdr.is_some() && got == want {
            break;
        }
    }

    match hdr {
        None => Err(PacketError::ShortHeader { got: hdr_got }),
        Some(hdr) if got < want => Err(PacketError::ShortData { hdr, got }),
        Some(hdr) => Ok((hdr, got)),
    }
}

/// One device-writable buffer of an rx chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxBuf {
    addr: GuestAddress,
    len: u32,
}

/// Validate an rx chain and collect its buffers into `bufs` (cleared first). Every
/// descriptor must be device-writable and lie inside guest memory, so the later write
/// cannot fail half way. Returns the total capacity in bytes, at least [`HDR_SIZE`].
pub fn parse_rx_chain<M, I>(mem: &M, descs: I, bufs: &mut Vec<RxBuf>) -> Result<usize, PacketError>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    bufs.clear();
    let mut cap = 0usize;
    for (i, desc) in descs.into_iter().enumerate() {
        if i >= MAX_CHAIN_DESCS {
            return Err(PacketError::ChainTooLong);
        }
        if !desc.is_write_only() {
            return Err(PacketError::ReadOnlyInRx);
        }
        if desc.len() == 0 {
            continue;
        }
        if !mem.check_range(desc.addr(), desc.len() as usize, Permissions::Write) {
            return Err(PacketError::BadAddress {
                addr: desc.addr().raw_value(),
                len: desc.len(),
            });
        }
        bufs.push(RxBuf {
            addr: desc.addr(),
            len: desc.len(),
        });
        cap = cap.saturating_add(desc.len() as usize);
    }
    if cap < HDR_SIZE {
        return Err(PacketError::ShortHeader { got: cap });
    }
    Ok(cap)
}

/// Write `hdr` followed by `data` into the buffers of a chain checked by
/// [`parse_rx_chain`]. Returns the bytes written (the used length to report).
pub fn write_rx_chain<M>(
    mem: &M,
    bufs: &[RxBuf],
    hdr: &PacketHeader,
    data: &[u8],
) -> Result<u32, PacketError>
where
    M: GuestMemory + ?Sized,
{
    let hdr_bytes = hdr.to_bytes();
    let mut parts = [hdr_bytes.as_slice(), data];
    let mut written = 0usize;
    for buf in bufs {
        let mut addr = buf.addr;
        let mut room = buf.len as usize;
        for part in parts.iter_mut() {
            if room == 0 {
                break;
            }
            let n = room.min(part.len());
            let (now, rest) = part.split_at_checked(n).unwrap_or((part, &[]));
            let bad = PacketError::BadAddress {
                addr: addr.raw_value(),
                len: n as u32,
            };
            mem.write_slice(now, addr).map_err(|_| bad.clone())?;
            addr = addr.checked_add(n as u64).ok_or(bad)?;
            room -= n;
            written += n;
            *part = rest;
        }
    }
    if parts.iter().any(|p| !p.is_empty()) {
        return Err(PacketError::ShortHeader { got: written });
    }
    Ok(written as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::GuestMemoryMmap;

    const MEM_SIZE: usize = 0x10_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn rd(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, 0, 0)
    }

    fn wr(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0)
    }

    fn rw_hdr(len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: TYPE_STREAM,
            op: OP_RW,
            buf_alloc: 4096,
            ..PacketHeader::default()
        }
    }

    #[test]
    fn header_round_trips_through_bytes() {
        let hdr = PacketHeader {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 7,
            dst_port: 8,
            len: 9,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 0xdead_beef,
            fwd_cnt: 0x1234_5678,
        };

        let back = PacketHeader::from_bytes(&hdr.to_bytes());

        assert_eq!(back, hdr);
        assert_eq!(hdr.to_bytes()[..8], 0x0102_0304_0506_0708u64.to_le_bytes());
    }

    #[test]
    fn tx_chain_with_split_header_and_data_parses() {
        let m = mem();
        let bytes = rw_hdr(5).to_bytes();
        m.write_slice(&bytes[..10], GuestAddress(0x1000)).unwrap();
        m.write_slice(&bytes[10..], GuestAddress(0x2000)).unwrap();
        m.write_slice(b"hel", GuestAddress(0x3000)).unwrap();
        m.write_slice(b"lo", GuestAddress(0x4000)).unwrap();
        let mut data = vec![0u8; MAX_PKT_DATA];
        let chain = [rd(0x1000, 10), rd(0x2000, 34), rd(0x3000, 3), rd(0x4000, 2)];

        let (hdr, n) = read_tx_chain(&m, chain, &mut data).unwrap();

        assert_eq!(hdr, rw_hdr(5));
        assert_eq!(&data[..n], b"hello");
    }

    #[test]
    fn tx_header_and_data_in_one_descriptor_parse() {
        let m = mem();
        m.write_slice(&rw_hdr(2).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        m.write_slice(b"ok", GuestAddress(0x1000 + HDR_SIZE as u64))
            .unwrap();
        let mut data = vec![0u8; MAX_PKT_DATA];

        let (_, n) = read_tx_chain(&m, [rd(0x1000, 46)], &mut data).unwrap();

        assert_eq!(&data[..n], b"ok");
    }

    #[test]
    fn tx_short_header_is_refused() {
        let m = mem();
        let mut data = vec![0u8; MAX_PKT_DATA];

        let err = read_tx_chain(&m, [rd(0x1000, 43)], &mut data).unwrap_err();

        assert_eq!(err, PacketError::ShortHeader { got: 43 });
    }

    #[test]
    fn tx_len_beyond_chain_is_refused_with_rst_target() {
        let m = mem();
        m.write_slice(&rw_hdr(100).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        let mut data = vec![0u8; MAX_PKT_DATA];

        let err = read_tx_chain(&m, [rd(0x1000, 44), rd(0x2000, 10)], &mut data).unwrap_err();

        assert_eq!(
            err,
            PacketError::ShortData {
                hdr: rw_hdr(100),
                got: 10
            }
        );
        assert_eq!(err.rst_target(3), Some(&rw_hdr(100)));
        assert_eq!(err.rst_target(4), None);
    }

    #[test]
    fn tx_huge_len_is_refused_before_reading_data() {
        let m = mem();
        m.write_slice(&rw_hdr(u32::MAX).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        let mut data = vec![0u8; MAX_PKT_DATA];

        let err = read_tx_chain(&m, [rd(0x1000, 44), rd(0x2000, u32::MAX)], &mut data);

        assert_eq!(err, Err(PacketError::TooLong(rw_hdr(u32::MAX))));
    }

    #[test]
    fn tx_write_only_descriptor_is_refused() {
        let m = mem();
        let mut data = vec![0u8; MAX_PKT_DATA];

        let err = read_tx_chain(&m, [wr(0x1000, 44)], &mut data);

        assert_eq!(err, Err(PacketError::WriteOnlyInTx));
    }

    #[test]
    fn tx_descriptor_outside_memory_is_refused() {
        let m = mem();
        let mut data = vec![0u8; MAX_PKT_DATA];

        let err = read_tx_chain(&m, [rd(MEM_SIZE as u64 - 10, 44)], &mut data);

        assert!(matches!(err, Err(PacketError::BadAddress { .. })));
    }

    #[test]
    fn tx_address_wrapping_u64_is_refused() {
        let m = mem();
        let mut data = vec![0u8; MAX_PKT_DATA];

        let err = read_tx_chain(&m, [rd(u64::MAX - 4, 44)], &mut data);

        assert!(matches!(err, Err(PacketError::BadAddress { .. })));
    }

    #[test]
    fn tx_chain_of_empty_descriptors_is_short() {
        let m = mem();
        let mut data = vec![0u8; MAX_PKT_DATA];
        let chain = vec![rd(0x1000, 0); MAX_CHAIN_DESCS + 5];

        let err = read_tx_chain(&m, chain, &mut data);

        assert_eq!(err, Err(PacketError::ChainTooLong));
    }

    #[test]
    fn control_packet_len_is_not_read_as_data() {
        let m = mem();
        let hdr = PacketHeader {
            op: OP_CREDIT_UPDATE,
            ..rw_hdr(1000)
        };
        m.write_slice(&hdr.to_bytes(), GuestAddress(0x1000))
            .unwrap();
        let mut data = vec![0u8; MAX_PKT_DATA];

        let got = read_tx_chain(&m, [rd(0x1000, 44)], &mut data);

        assert_eq!(got, Ok((hdr, 0)));
    }

    #[test]
    fn header_checks_name_the_fault() {
        let good = rw_hdr(0);

        assert_eq!(check_tx_header(&good, 3), Ok(()));
        assert!(matches!(
            check_tx_header(&good, 4),
            Err(PacketError::WrongSrcCid(_))
        ));
        assert!(matches!(
            check_tx_header(&PacketHeader { dst_cid: 1, ..good }, 3),
            Err(PacketError::WrongDstCid(_))
        ));
        assert!(matches!(
            check_tx_header(&PacketHeader { type_: 2, ..good }, 3),
            Err(PacketError::WrongType(_))
        ));
        assert!(matches!(
            check_tx_header(&PacketHeader { op: 0, ..good }, 3),
            Err(PacketError::UnknownOp(_))
        ));
        assert!(matches!(
            check_tx_header(&PacketHeader { op: 8, ..good }, 3),
            Err(PacketError::UnknownOp(_))
        ));
    }

    #[test]
    fn rx_chain_scatters_header_and_data() {
        let m = mem();
        let mut bufs = Vec::new();
        let cap = parse_rx_chain(
            &m,
            [wr(0x1000, 20), wr(0x2000, 30), wr(0x3000, 100)],
            &mut bufs,
        )
        .unwrap();
        let hdr = rw_hdr(5);

        let n = write_rx_chain(&m, &bufs, &hdr, b"hello").unwrap();

        let mut back = [0u8; HDR_SIZE];
        m.read_slice(&mut back[..20], GuestAddress(0x1000)).unwrap();
        m.read_slice(&mut back[20..], GuestAddress(0x2000)).unwrap();
        let mut payload = [0u8; 5];
        m.read_slice(&mut payload, GuestAddress(0x2000 + 24))
            .unwrap();
        assert_eq!(cap, 150);
        assert_eq!(n, 49);
        assert_eq!(PacketHeader::from_bytes(&back), hdr);
        assert_eq!(&payload, b"hello");
    }

    #[test]
    fn rx_chain_refuses_read_only_small_and_outside() {
        let m = mem();
        let mut bufs = Vec::new();

        let ro = parse_rx_chain(&m, [rd(0x1000, 4096)], &mut bufs);
        let small = parse_rx_chain(&m, [wr(0x1000, 43)], &mut bufs);
        let outside = parse_rx_chain(&m, [wr(MEM_SIZE as u64 - 8, 64)], &mut bufs);

        assert_eq!(ro, Err(PacketError::ReadOnlyInRx));
        assert_eq!(small, Err(PacketError::ShortHeader { got: 43 }));
        assert!(matches!(outside, Err(PacketError::BadAddress { .. })));
    }

    #[test]
    fn rx_write_larger_than_chain_is_refused() {
        let m = mem();
        let mut bufs = Vec::new();
        parse_rx_chain(&m, [wr(0x1000, 50)], &mut bufs).unwrap();

        let err = write_rx_chain(&m, &bufs, &rw_hdr(10), &[0u8; 10]);

        assert_eq!(err, Err(PacketError::ShortHeader { got: 50 }));
    }

    #[test]
    fn rst_reply_swaps_ports_and_comes_from_host() {
        let hdr = rw_hdr(3);

        let rst = hdr.rst_reply();

        assert_eq!(
            (
                rst.src_cid,
                rst.dst_cid,
                rst.src_port,
                rst.dst_port,
                rst.op,
                rst.len
            ),
            (HOST_CID, 3, 52, 1000, OP_RST, 0)
        );
    }
}
