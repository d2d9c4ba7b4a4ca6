//! Device tests: the driver's side of the three queues built by hand in guest memory, the
//! real event loop, and real Unix sockets for the host side.

mod device;
mod fuzz;
mod hybrid;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::packet::{
    check_tx_header, PacketHeader, HDR_SIZE, HOST_CID, OP_CREDIT_UPDATE, OP_REQUEST, OP_RW,
    TYPE_STREAM,
};
use super::{UnixBackend, UnixBackendConfig, Vsock, VsockBackend};
use crate::devices::virtio::testing::{DriverQueue, QSIZE};
pub use crate::devices::virtio::testing::{TempDir, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::devices::virtio::{ActiveQueue, Interrupt, VirtioDevice};

pub const CID: u64 = 3;
pub const MEM_SIZE: usize = 32 << 20;
/// Packet buffers are handed out from here on.
const BUF_BASE: u64 = 0x10_0000;

/// A test double backend: records what the device hands it and serves queued packets.
pub struct RecordingBackend {
    evt: EventFd,
    pub sent: Vec<(PacketHeader, Vec<u8>)>,
    pub resets: Vec<PacketHeader>,
    pub to_guest: VecDeque<(PacketHeader, Vec<u8>)>,
}

impl RecordingBackend {
    pub fn new() -> Self {
        Self {
            evt: EventFd::new(EFD_NONBLOCK).unwrap(),
            sent: Vec::new(),
            resets: Vec::new(),
            to_guest: VecDeque::new(),
        }
    }
}

impl AsRawFd for RecordingBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

impl VsockBackend for RecordingBackend {
    fn send_pkt(&mut self, hdr: &PacketHeader, data: &[u8]) {
        // The device's promise: only checked headers, and exactly the payload.
        assert_eq!(check_tx_header(hdr, CID), Ok(()));
        let expected = if hdr.op == OP_RW { hdr.len as usize } else { 0 };
        assert_eq!(data.len(), expected);
        if self.sent.len() < 100_000 {
            self.sent.push((*hdr, data.to_vec()));
        }
    }

    fn reset_peer(&mut self, hdr: &PacketHeader) {
        assert_eq!(hdr.src_cid, CID);
        assert_eq!(hdr.dst_cid, HOST_CID);
        if self.resets.len() < 100_000 {
            self.resets.push(*hdr);
        }
    }

    fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<PacketHeader> {
        let (hdr, data) = self.to_guest.pop_front()?;
        buf[..data.len()].copy_from_slice(&data);
        Some(hdr)
    }

    fn has_pending_rx(&self) -> bool {
        !self.to_guest.is_empty()
    }

    fn process_events(&mut self) {
        let _ = self.evt.read();
    }
}

/// A guest-originated packet header, addressed to the host.
pub fn guest_hdr(op: u16, src_port: u32, dst_port: u32) -> PacketHeader {
    PacketHeader {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

/// The guest side of an activated device, driven through the real event loop.
pub struct Guest<B: VsockBackend + 'static> {
    pub mem: GuestMemoryMmap,
    pub dev: Arc<Mutex<Vsock<B>>>,
    em: EventManager<Arc<Mutex<Vsock<B>>>>,
    pub rxq: DriverQueue,
    pub txq: DriverQueue,
    notify: Vec<EventFd>,
    pub irq: EventFd,
    pub irq_status: Arc<AtomicU32>,
    next_buf: u64,
}

impl Guest<UnixBackend> {
    /// A device with the hybrid backend listening at `uds`.
    pub fn unix(uds: &Path, config: UnixBackendConfig) -> Self {
        Self::activate(Vsock::with_config(CID, uds, config).unwrap())
    }

    pub fn backend_counts(&self) -> (usize, usize, usize) {
        let dev = self.dev.lock().unwrap();
        let b = dev.backend();
        (
            b.connection_count(),
            b.handshake_count(),
            b.pending_rx_count(),
        )
    }
}

impl<B: VsockBackend + 'static> Guest<B> {
    pub fn activate(dev: Vsock<B>) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(dev.clone());
        let rxq = DriverQueue::new(0);
        let txq = DriverQueue::new(1);
        let evq = DriverQueue::new(2);
        let notify: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let queues = [&rxq, &txq, &evq]
            .iter()
            .zip(&notify)
            .map(|(q, n)| ActiveQueue {
                queue: q.device_queue(),
                notify: n.try_clone().unwrap(),
            })
            .collect();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq_status = Arc::new(AtomicU32::new(0));
        let interrupt = Arc::new(Interrupt::new(
            irq_status.clone(),
            Arc::new(irq.try_clone().unwrap()),
        ));
        dev.lock()
            .unwrap()
            .activate(mem.clone(), interrupt, queues)
            .unwrap();
        let mut guest = Self {
            mem,
            dev,
            em,
            rxq,
            txq,
            notify,
            irq,
            irq_status,
            next_buf: BUF_BASE,
        };
        guest.pump();
        guest
    }

    /// Run the event loop until nothing is ready.
    pub fn pump(&mut self) {
        for _ in 0..10_000 {
            if self.em.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("event loop never went idle");
    }

    /// Run the event loop (waiting for events) until `done` or `limit` passes.
    pub fn pump_until(&mut self, limit: Duration, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            self.em.run_with_timeout(10).unwrap();
            self.pump();
            if done(self) {
                return true;
            }
        }
        false
    }

    /// Guest memory for one buffer of `len` bytes.
    pub fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.next_buf;
        self.next_buf += u64::from(len).max(1).next_multiple_of(64);
        if self.next_buf + 0x10_0000 > MEM_SIZE as u64 {
            self.next_buf = BUF_BASE;
        }
        addr
    }

    pub fn kick_tx(&mut self) {
        self.notify[1].write(1).unwrap();
        self.pump();
    }

    pub fn kick_rx(&mut self) {
        self.notify[0].write(1).unwrap();
        self.pump();
    }

    /// Queue a packet on tx as the Linux driver does: header and payload descriptors.
    pub fn queue_tx(&mut self, hdr: &PacketHeader, data: &[u8]) {
        let h = self.alloc(HDR_SIZE as u32);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .unwrap();
        if data.is_empty() {
            self.txq
                .add_chain(&self.mem, &[(h, HDR_SIZE as u32, false)]);
        } else {
            let d = self.alloc(data.len() as u32);
            self.mem.write_slice(data, GuestAddress(d)).unwrap();
            self.txq.add_chain(
                &self.mem,
                &[(h, HDR_SIZE as u32, false), (d, data.len() as u32, false)],
            );
        }
    }

    /// Send one packet and run the loop.
    pub fn send(&mut self, hdr: &PacketHeader, data: &[u8]) {
        self.queue_tx(hdr, data);
        self.kick_tx();
    }

    /// Offer `n` rx buffers of `size` bytes, header included, one descriptor each (as
    /// Linux 6.1 does with 4096-byte buffers).
    pub fn give_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            // Stay well inside the ring.
            if self.rxq.bufs.len() >= usize::from(QSIZE) / 4 {
                break;
            }
            let b = self.alloc(size);
            self.rxq.add_chain(&self.mem, &[(b, size, true)]);
        }
        self.kick_rx();
    }

    /// Offer `n` rx buffers as older kernels do: a header descriptor and a `data_len`
    /// payload descriptor.
    pub fn give_rx_split(&mut self, n: usize, data_len: u32) {
        for _ in 0..n {
            let h = self.alloc(HDR_SIZE as u32);
            let d = self.alloc(data_len);
            self.rxq.add_chain(
                &self.mem,
                &[(h, HDR_SIZE as u32, true), (d, data_len, true)],
            );
        }
        self.kick_rx();
    }

    /// The next packet the device put in an rx buffer: header, payload, used length.
    pub fn recv(&mut self) -> Option<(PacketHeader, Vec<u8>)> {
        let (id, len) = self.rxq.pop_used(&self.mem)?;
        let bufs = self.rxq.bufs.remove(&(id as u16)).unwrap_or_default();
        let mut bytes = Vec::new();
        for (addr, blen) in bufs {
            let mut chunk = vec![0u8; blen as usize];
            self.mem.read_slice(&mut chunk, GuestAddress(addr)).unwrap();
            bytes.extend_from_slice(&chunk);
        }
        bytes.truncate(len as usize);
        if bytes.len() < HDR_SIZE {
            return Some((PacketHeader::default(), Vec::new()));
        }
        let hdr = PacketHeader::from_bytes(bytes[..HDR_SIZE].try_into().unwrap());
        let data = bytes[HDR_SIZE..].to_vec();
        assert_eq!(
            data.len(),
            hdr.len as usize,
            "used length matches header len"
        );
        Some((hdr, data))
    }

    /// Every packet the device delivered so far.
    pub fn recv_all(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        std::iter::from_fn(|| self.recv()).collect()
    }

    /// Receive until a packet with `op` arrives (others are returned too), giving rx
    /// buffers as needed and waiting up to two seconds.
    pub fn recv_op(&mut self, op: u16) -> Vec<(PacketHeader, Vec<u8>)> {
        let mut got = Vec::new();
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end {
            while let Some(p) = self.recv() {
                let stop = p.0.op == op;
                got.push(p);
                if stop {
                    return got;
                }
            }
            if self.rxq.bufs.len() < 8 {
                self.give_rx(8, 4096);
            }
            self.em.run_with_timeout(10).unwrap();
            self.pump();
        }
        panic!("no packet with op {op} arrived; got {got:?}");
    }

    /// Accept a host-initiated connection as the Linux guest does: answer the REQUEST.
    pub fn accept_request(&mut self) -> PacketHeader {
        let got = self.recv_op(OP_REQUEST);
        let req = got.last().unwrap().0;
        let mut resp = guest_hdr(super::packet::OP_RESPONSE, req.dst_port, req.src_port);
        resp.buf_alloc = 256 * 1024;
        self.send(&resp, &[]);
        req
    }

    /// Tell the device our receive buffer for connection (`src`, `dst`) and how much of
    /// it we consumed.
    pub fn credit_update(&mut self, src_port: u32, dst_port: u32, buf_alloc: u32, fwd_cnt: u32) {
        let mut hdr = guest_hdr(OP_CREDIT_UPDATE, src_port, dst_port);
        hdr.buf_alloc = buf_alloc;
        hdr.fwd_cnt = fwd_cnt;
        self.send(&hdr, &[]);
    }

    pub fn irq_count(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }
}
