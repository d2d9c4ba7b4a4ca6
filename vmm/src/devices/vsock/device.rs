//! The virtio-vsock device: features, config space, activation, and the queue work the
//! event handler triggers (tx: guest packets to the backend; rx: backend packets to the
//! guest).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::packet::{self, RxBuf, MAX_PKT_DATA};
use super::unix::{UnixBackend, UnixBackendConfig};
use super::{VsockBackend, VsockError};
use crate::devices::virtio::{
    ActivateError, ActiveQueue, Interrupt, VirtioDevice, VIRTIO_MMIO_INT_VRING,
};
use crate::logging::guest_warn;

/// Virtio device ID of a socket device.
pub const VSOCK_DEVICE_TYPE: u32 = 19;
/// Maximum size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indexes, in the order the driver sets them up.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
const NUM_QUEUES: usize = 3;
const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];

/// VIRTIO_F_VERSION_1: a modern (virtio 1.x) device.
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Chains handled per queue per event before yielding to the rest of the event loop (the
/// device re-signals its own queue to come back for the rest).
const MAX_CHAINS_PER_EVENT: usize = 2 * QUEUE_SIZE as usize;

/// A queue the device may no longer touch because the driver broke it.
#[derive(Debug)]
struct DeviceQueue {
    active: ActiveQueue,
    broken: bool,
}

#[derive(Debug)]
struct ActiveState {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<DeviceQueue>,
}

/// The virtio-vsock device, generic over its host end (the hybrid Unix-socket backend by
/// default).
#[derive(Debug)]
pub struct Vsock<B: VsockBackend = UnixBackend> {
    guest_cid: u64,
    backend: B,
    acked_features: u64,
    activate_evt: EventFd,
    state: Option<ActiveState>,
    /// Payload staging for one packet in either direction.
    scratch: Vec<u8>,
    rx_bufs: Vec<RxBuf>,
}

impl Vsock<UnixBackend> {
    /// A device for the guest `guest_cid` whose host side listens at `uds_path`
    /// (Firecracker's hybrid-vsock protocol; see the module documentation).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        Self::with_config(guest_cid, uds_path, UnixBackendConfig::default())
    }

    /// As [`Vsock::new`], with explicit backend limits and timeouts.
    pub fn with_config(
        guest_cid: u64,
        uds_path: &Path,
        config: UnixBackendConfig,
    ) -> Result<Self, VsockError> {
        check_cid(guest_cid)?;
        let backend = UnixBackend::new(guest_cid, uds_path, config)?;
        Self::with_backend(guest_cid, backend)
    }
}

fn check_cid(cid: u64) -> Result<(), VsockError> {
    // 0, 1 and 2 are the hypervisor, local and host; u32::MAX is VMADDR_CID_ANY.
    if (3..u64::from(u32::MAX)).contains(&cid) {
        Ok(())
    } else {
        Err(VsockError::InvalidCid(cid))
    }
}

impl<B: VsockBackend> Vsock<B> {
    /// A device in front of any backend.
    pub fn with_backend(guest_cid: u64, backend: B) -> Result<Self, VsockError> {
        check_cid(guest_cid)?;
        Ok(Self {
            guest_cid,
            backend,
            acked_features: 0,
            activate_evt: EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?,
            state: None,
            scratch: vec![0; MAX_PKT_DATA],
            rx_bufs: Vec::new(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    pub fn is_activated(&self) -> bool {
        self.state.is_some()
    }

    pub(crate) fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    /// The notify `EventFd` of queue `idx`, once active.
    pub(crate) fn queue_evt(&self, idx: usize) -> Option<&EventFd> {
        let state = self.state.as_ref()?;
        state.queues.get(idx).map(|q| &q.active.notify)
    }

    /// Move guest packets from the tx queue to the backend. Returns whether buffers were
    /// used.
    pub(crate) fn process_tx(&mut self) -> bool {
        let Some(state) = self.state.as_mut() else {
            return false;
        };
        let Some(dq) = state.queues.get_mut(TX_QUEUE) else {
            return false;
        };
        let mut used = false;
        for _ in 0..MAX_CHAINS_PER_EVENT {
            let Some(head) = pop_chain(dq, &state.mem) else {
                return used;
            };
            let (index, descs) = head;
            let result =
                packet::read_tx_chain(&state.mem, descs, &mut self.scratch).and_then(|(hdr, n)| {
                    packet::check_tx_header(&hdr, self.guest_cid).map(|()| (hdr, n))
                });
            match result {
                Ok((hdr, n)) => {
                    let data = self.scratch.get(..n).unwrap_or_default();
                    self.backend.send_pkt(&hdr, data);
                }
                Err(e) => {
                    guest_warn!(error = %e, "vsock: dropping guest tx packet");
                    if let Some(hdr) = e.rst_target(self.guest_cid) {
                        self.backend.reset_peer(hdr);
                    }
                }
            }
            used |= add_used(dq, &state.mem, index, 0);
        }
        // More may be waiting: come back after the rest of the event loop had its turn.
        if dq.active.notify.write(1).is_err() {
            guest_warn!("vsock: cannot re-signal tx queue");
        }
        used
    }

    /// Move backend packets into the guest's rx buffers. Returns whether buffers were
    /// used.
    pub(crate) fn process_rx(&mut self) -> bool {
        let Some(state) = self.state.as_mut() else {
            return false;
        };
        let Some(dq) = state.queues.get_mut(RX_QUEUE) else {
            return false;
        };
        let mut used = false;
        for _ in 0..MAX_CHAINS_PER_EVENT {
            if !self.backend.has_pending_rx() {
                return used;
            }
            let Some((index, descs)) = pop_chain(dq, &state.mem) else {
                return used;
            };
            let cap = match packet::parse_rx_chain(&state.mem, descs, &mut self.rx_bufs) {
                Ok(cap) => cap,
                Err(e) => {
                    guest_warn!(error = %e, "vsock: dropping unusable rx buffer");
                    used |= add_used(dq, &state.mem, index, 0);
                    continue;
                }
            };
            let room = cap.saturating_sub(packet::HDR_SIZE).min(self.scratch.len());
            let buf = self.scratch.get_mut(..room).unwrap_or_default();
            let Some(hdr) = self.backend.recv_pkt(buf) else {
                // Nothing after all: give the buffer back to the ring untouched.
                dq.active.queue.go_to_previous_position();
                return used;
            };
            let data = buf.get(..hdr.len as usize).unwrap_or_default();
            let len = match packet::write_rx_chain(&state.mem, &self.rx_bufs, &hdr, data) {
                Ok(len) => len,
                Err(e) => {
                    guest_warn!(error = %e, "vsock: rx buffer write failed");
                    self.backend.reset_peer(&reply_addr(&hdr));
                    0
                }
            };
            used |= add_used(dq, &state.mem, index, len);
        }
        if self.backend.has_pending_rx() && dq.active.notify.write(1).is_err() {
            guest_warn!("vsock: cannot re-signal rx queue");
        }
        used
    }

    /// Tell the guest about used buffers.
    pub(crate) fn signal_used(&mut self) {
        let Some(state) = self.state.as_ref() else {
            return;
        };
        if let Err(e) = state.interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
            guest_warn!(error = %e, "vsock: cannot raise interrupt");
        }
    }

    pub(crate) fn process_backend(&mut self) {
        self.backend.process_events();
    }
}

/// The address pair of a host packet seen from the guest's side, so
/// [`VsockBackend::reset_peer`] finds its connection.
fn reply_addr(hdr: &packet::PacketHeader) -> packet::PacketHeader {
    packet::PacketHeader {
        src_cid: hdr.dst_cid,
        dst_cid: hdr.src_cid,
        src_port: hdr.dst_port,
        dst_port: hdr.src_port,
        op: packet::OP_RST,
        ..*hdr
    }
}

type Chain<'a> = virtio_queue::DescriptorChain<&'a GuestMemoryMmap>;

/// Pop the next available chain, unless the driver broke the queue (then log once and
/// leave the queue alone for good).
fn pop_chain<'a>(dq: &mut DeviceQueue, mem: &'a GuestMemoryMmap) -> Option<(u16, Chain<'a>)> {
    if dq.broken {
        return None;
    }
    let queue: &mut Queue = &mut dq.active.queue;
    // The avail index may run at most one ring ahead of us; otherwise the queue is
    // corrupt (virtio-queue would log on every call).
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) if idx.0.wrapping_sub(queue.next_avail()) <= queue.size() => {}
        _ => {
            guest_warn!("vsock: driver corrupted a queue, ignoring it from now on");
            dq.broken = true;
            return None;
        }
    }
    let chain = queue.pop_descriptor_chain(mem)?;
    Some((chain.head_index(), chain))
}

/// Return a chain to the driver. Returns whether it was added to the used ring.
fn add_used(dq: &mut DeviceQueue, mem: &GuestMemoryMmap, index: u16, len: u32) -> bool {
    // An out-of-range head cannot be returned; the driver loses that entry.
    if index >= dq.active.queue.size() {
        guest_warn!(index, "vsock: descriptor head index out of range");
        return false;
    }
    match dq.active.queue.add_used(mem, index, len) {
        Ok(()) => true,
        Err(e) => {
            guest_warn!(error = %e, "vsock: cannot add to used ring");
            false
        }
    }
}

impl<B: VsockBackend> VirtioDevice for Vsock<B> {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let cid = self.guest_cid.to_le_bytes();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        let Some(end) = start.checked_add(data.len()) else {
            return;
        };
        if let Some(src) = cid.get(start..end) {
            data.copy_from_slice(src);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The config space (the guest CID) is read-only.
    }

    /// Only while no connection is open: a restored VM gets a fresh backend, and a
    /// connection the guest believes in would be gone.
    fn queue_positions(&self) -> Option<Vec<(u16, u16)>> {
        let state = self.state.as_ref()?;
        if !self.backend.is_idle() || state.queues.iter().any(|q| q.broken) {
            return None;
        }
        Some(
            state
                .queues
                .iter()
                .map(|q| (q.active.queue.next_avail(), q.active.queue.next_used()))
                .collect(),
        )
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if self.state.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: queues.len(),
            });
        }
        self.activate_evt.write(1).map_err(ActivateError::Backend)?;
        self.state = Some(ActiveState {
            mem,
            interrupt,
            queues: queues
                .into_iter()
                .map(|active| DeviceQueue {
                    active,
                    broken: false,
                })
                .collect(),
        });
        Ok(())
    }
}
