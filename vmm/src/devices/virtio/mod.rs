//! The virtio device model shared by every virtio device and the MMIO transport.
//!
//! A device implements [`VirtioDevice`]; the MMIO transport (`mmio.rs`) owns feature
//! negotiation, queue setup and the status register, and calls [`VirtioDevice::activate`]
//! once the driver sets DRIVER_OK. From then on the device runs from the VMM's
//! `event-manager` loop: it is also an `event_manager::MutEventSubscriber` that watches
//! its queue-notify `EventFd`s (signalled by the transport on a QUEUE_NOTIFY write, or by
//! a KVM ioeventfd) and its backend's file descriptors.
//!
//! `activate` runs on a vCPU thread (the driver's DRIVER_OK write), outside the event
//! loop, so it has no `EventOps`: a device typically signals an "activated" eventfd it
//! registered in `MutEventSubscriber::init` and adds the queue eventfds when the loop
//! delivers that event. The transport keeps no queue state after activation; a reset
//! (Status = 0) calls `reset`, and a device that returns false is never activated again.

pub mod mmio;
pub use mmio::{QueueSnapshot, TransportSnapshot};
#[cfg(test)]
pub(crate) mod testing;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::hypervisor::InterruptLine;

/// Interrupt status bit: a used buffer was added to a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
/// Interrupt status bit: the configuration space changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// Errors raised while activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device expects {expected} queues, driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("device is already activated")]
    AlreadyActive,
    #[error("backend failed to start")]
    Backend(#[source] std::io::Error),
}

/// How a device tells the guest it has work: sets a bit in the transport's
/// InterruptStatus register and raises the device's interrupt line (which the
/// hypervisor backend wires to the guest's irqchip).
#[derive(Debug)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    line: Arc<dyn InterruptLine>,
}

impl Interrupt {
    pub fn new(status: Arc<AtomicU32>, line: Arc<dyn InterruptLine>) -> Self {
        Self { status, line }
    }

    /// Raise `bits` (`VIRTIO_MMIO_INT_VRING` or `VIRTIO_MMIO_INT_CONFIG`).
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.line.trigger()
    }

    /// The shared InterruptStatus word (the transport reads and acks it).
    pub fn status(&self) -> &Arc<AtomicU32> {
        &self.status
    }
}

/// One activated queue: the queue state plus the eventfd the transport signals when the
/// driver writes its index to QueueNotify.
#[derive(Debug)]
pub struct ActiveQueue {
    pub queue: Queue,
    pub notify: EventFd,
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (e.g. 19 for vsock, 26 for fs).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (VIRTIO_F_VERSION_1 included).
    fn avail_features(&self) -> u64;
    /// The driver acknowledged `features` (already masked to what was offered).
    fn ack_features(&mut self, features: u64);
    /// Read from the device-specific config space. Out-of-range reads leave `data` zeroed.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write to the device-specific config space. Out-of-range writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start processing. Called once the driver sets DRIVER_OK with every queue ready.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;
    /// The driver wrote 0 to Status. Return true if the device could reset itself.
    fn reset(&mut self) -> bool {
        false
    }
    /// For a snapshot of an activated device: each queue's (next_avail, next_used) ring
    /// positions. `None` (the default): the device keeps state of its own that a
    /// snapshot cannot hold, and the VM cannot be saved.
    fn queue_positions(&self) -> Option<Vec<(u16, u16)>> {
        None
    }
}
