//! The virtio-mmio transport (virtio 1.x, register layout version 2) for any
//! [`VirtioDevice`].
//!
//! The transport owns what the driver negotiates through registers: the feature windows,
//! the per-queue configuration and the status state machine. On DRIVER_OK it builds the
//! `virtio-queue` queues and hands them to the device; on Status = 0 it resets. Every
//! guest access is validated: a bad offset, size or value is ignored (reads return 0),
//! never a panic.

mod state;
pub use state::{QueueSnapshot, TransportSnapshot};

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActiveQueue, Interrupt, VirtioDevice, VIRTIO_MMIO_INT_CONFIG};
use crate::devices::BusDevice;
use crate::hypervisor::InterruptLine;
use crate::logging::{guest_debug, guest_warn};
use crate::memory::GuestMemoryMmap;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Register layout version of virtio 1.x.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("MXC\0" is not a PCI vendor; any value works).
pub const MMIO_VENDOR_ID: u32 = 0x0043_584d;

/// Register offsets (virtio 1.2, section 4.2.2).
mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of the QueueNotify register (for an ioeventfd on it).
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// Transport features this implementation cannot provide; never offered to the driver.
const UNSUPPORTED_TRANSPORT_FEATURES: u64 =
    (1 << VIRTIO_F_RING_PACKED) | (1 << VIRTIO_F_NOTIFICATION_DATA) | (1 << VIRTIO_F_RING_RESET);

const S_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

/// Size in bytes of the split-ring parts for a queue of `size` entries.
fn desc_table_bytes(size: u16) -> usize {
    16 * usize::from(size)
}
fn avail_ring_bytes(size: u16) -> usize {
    6 + 2 * usize::from(size)
}
fn used_ring_bytes(size: u16) -> usize {
    6 + 8 * usize::from(size)
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("device queue {index} has invalid maximum size {size}")]
    QueueMaxSize { index: usize, size: u16 },
    #[error("device has no queues")]
    NoQueues,
    #[error("cannot create a queue notify eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("virtio device type {device_type} keeps state a snapshot cannot hold")]
    NotSaveable { device_type: u32 },
    #[error("the saved virtio-mmio state does not fit this device: {0}")]
    BadSnapshot(&'static str),
}

/// The driver-visible configuration of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }

    fn reset(&mut self) {
        *self = Self::new(self.max_size);
    }

    /// Why this queue cannot be used with `mem`, if it cannot.
    fn problem(&self, mem: &GuestMemoryMmap) -> Option<&'static str> {
        let size = self.size;
        if !self.ready {
            return Some("not ready");
        }
        if size == 0 || size > self.max_size || !size.is_power_of_two() {
            return Some("bad size");
        }
        if self.desc % 16 != 0 || self.avail % 2 != 0 || self.used % 4 != 0 {
            return Some("misaligned ring");
        }
        let in_ram = |addr: u64, len: usize| mem.check_range(GuestAddress(addr), len);
        if !in_ram(self.desc, desc_table_bytes(size))
            || !in_ram(self.avail, avail_ring_bytes(size))
            || !in_ram(self.used, used_ring_bytes(size))
        {
            return Some("ring outside guest memory");
        }
        None
    }

    /// Build the `virtio-queue` queue (call only when `problem` is `None`).
    fn build(&self, event_idx: bool) -> Option<Queue> {
        let mut q = Queue::new(self.max_size).ok()?;
        q.try_set_size(self.size).ok()?;
        q.try_set_desc_table_address(GuestAddress(self.desc)).ok()?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .ok()?;
        q.try_set_used_ring_address(GuestAddress(self.used)).ok()?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        Some(q)
    }
}

fn set_low(value: &mut u64, low: u32) {
    *value = (*value & !0xffff_ffff) | u64::from(low);
}

fn set_high(value: &mut u64, high: u32) {
    *value = (*value & 0xffff_ffff) | (u64::from(high) << 32);
}

/// A virtio device behind the virtio-mmio register interface.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<QueueConfig>,
    notify: Vec<EventFd>,
    device_type: u32,
    offered_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// The device could not reset after an activation; it cannot be activated again.
    spent: bool,
    /// Restored activated: the device is to look at its queues once the VM runs.
    kick_owed: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("activated", &self.activated)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Put `device` behind a transport. `irq` is raised for every interrupt.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        irq: Arc<dyn InterruptLine>,
    ) -> Result<Self, MmioError> {
        let (device_type, max_sizes, features) = {
            let dev = device.lock().map_err(|_| MmioError::NoQueues)?;
            (
                dev.device_type(),
                dev.queue_max_sizes().to_vec(),
                dev.avail_features(),
            )
        };
        if max_sizes.is_empty() {
            return Err(MmioError::NoQueues);
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut notify = Vec::with_capacity(max_sizes.len());
        for (index, &size) in max_sizes.iter().enumerate() {
            if size == 0 || !size.is_power_of_two() {
                return Err(MmioError::QueueMaxSize { index, size });
            }
            queues.push(QueueConfig::new(size));
            notify.push(EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(Arc::new(AtomicU32::new(0)), irq)),
            queues,
            notify,
            device_type,
            offered_features: features & !UNSUPPORTED_TRANSPORT_FEATURES,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            spent: false,
            kick_owed: false,
        })
    }

    /// The queue-notify eventfds, by queue index. Register each as an ioeventfd on
    /// `base + QUEUE_NOTIFY_OFFSET` with the queue index as datamatch.
    pub fn notify_eventfds(&self) -> &[EventFd] {
        &self.notify
    }

    /// The device's virtio type.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The status register as the driver last left it.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device is activated.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK, and only
    /// while the selected queue is not ready.
    fn queue_writable(&self) -> bool {
        self.status & (S_FEATURES_OK | S_DRIVER_OK | S_FAILED) == S_FEATURES_OK
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => MMIO_VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features as u32,
                1 => (self.offered_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status().load(Ordering::SeqCst),
            reg::STATUS => self.status,
            // No shared-memory regions: length and base read as all ones.
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                guest_debug!(offset, "virtio-mmio: read of unknown register");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => self.write_queue(|q| q.size = value.min(0xffff) as u16),
            reg::QUEUE_READY => self.write_queue_ready(value),
            reg::QUEUE_DESC_LOW => self.write_queue(|q| set_low(&mut q.desc, value)),
            reg::QUEUE_DESC_HIGH => self.write_queue(|q| set_high(&mut q.desc, value)),
            reg::QUEUE_DRIVER_LOW => self.write_queue(|q| set_low(&mut q.avail, value)),
            reg::QUEUE_DRIVER_HIGH => self.write_queue(|q| set_high(&mut q.avail, value)),
            reg::QUEUE_DEVICE_LOW => self.write_queue(|q| set_low(&mut q.used, value)),
            reg::QUEUE_DEVICE_HIGH => self.write_queue(|q| set_high(&mut q.used, value)),
            reg::QUEUE_NOTIFY => self.notify_queue(value),
            reg::INTERRUPT_ACK => {
                self.interrupt.status().fetch_and(!value, Ordering::SeqCst);
            }
            reg::STATUS => self.write_status(value),
            reg::SHM_SEL => {}
            _ => guest_debug!(offset, value, "virtio-mmio: write to unknown register"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & (S_DRIVER | S_FEATURES_OK | S_FAILED) != S_DRIVER {
            guest_debug!("virtio-mmio: driver features written outside negotiation");
            return;
        }
        match self.driver_features_sel {
            0 => set_low(&mut self.driver_features, value),
            1 => set_high(&mut self.driver_features, value),
            _ => {}
        }
    }

    fn write_queue(&mut self, update: impl FnOnce(&mut QueueConfig)) {
        if !self.queue_writable() {
            guest_debug!("virtio-mmio: queue register written outside queue setup");
            return;
        }
        match self.selected_queue() {
            Some(q) if !q.ready => update(q),
            _ => guest_debug!("virtio-mmio: write to a ready or missing queue"),
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        if !self.queue_writable() {
            return;
        }
        if let Some(q) = self.selected_queue() {
            q.ready = value == 1;
        }
    }

    fn notify_queue(&mut self, value: u32) {
        if !self.activated {
            return;
        }
        // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index.
        match self.notify.get(value as usize) {
            Some(fd) => {
                if let Err(e) = fd.write(1) {
                    guest_warn!(error = %e, "virtio-mmio: cannot signal queue notify");
                }
            }
            None => guest_debug!(value, "virtio-mmio: notify of a queue that does not exist"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let current = self.status;
        if value & S_FAILED != 0 {
            self.status |= S_FAILED;
            return;
        }
        if current & (S_FAILED | S_NEEDS_RESET) != 0 {
            guest_debug!(value, "virtio-mmio: status change before reset");
            return;
        }
        let next = match current {
            0 => S_ACK,
            s if s == S_ACK => S_ACK | S_DRIVER,
            s if s == S_ACK | S_DRIVER => S_ACK | S_DRIVER | S_FEATURES_OK,
            s if s == S_ACK | S_DRIVER | S_FEATURES_OK => {
                S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
            }
            _ => current,
        };
        if value != next {
            guest_debug!(
                current,
                value,
                "virtio-mmio: illegal status transition refused"
            );
            return;
        }
        match value & !current {
            S_FEATURES_OK => {
                if self.features_acceptable() {
                    self.status = value;
                    if let Ok(mut dev) = self.device.lock() {
                        dev.ack_features(self.driver_features);
                    }
                }
            }
            S_DRIVER_OK => {
                if self.activate() {
                    self.status = value;
                } else {
                    self.status = current | S_NEEDS_RESET;
                    let _ = self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG);
                }
            }
            _ => self.status = value,
        }
    }

    /// The driver acked only offered features, and VERSION_1 among them.
    fn features_acceptable(&self) -> bool {
        let unoffered = self.driver_features & !self.offered_features;
        let version_1 = self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
        if unoffered != 0 || !version_1 {
            guest_debug!(
                features = self.driver_features,
                "virtio-mmio: feature set refused"
            );
            return false;
        }
        true
    }

    fn activate(&mut self) -> bool {
        if self.spent || self.activated {
            guest_warn!(
                device_type = self.device_type,
                "virtio-mmio: device cannot be activated again without a reset"
            );
            return false;
        }
        for (index, q) in self.queues.iter().enumerate() {
            if let Some(problem) = q.problem(&self.mem) {
                guest_warn!(index, problem, "virtio-mmio: queue refused at activation");
                return false;
            }
        }
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut active = Vec::with_capacity(self.queues.len());
        for (q, fd) in self.queues.iter().zip(&self.notify) {
            let (Some(queue), Ok(notify)) = (q.build(event_idx), fd.try_clone()) else {
                return false;
            };
            active.push(ActiveQueue { queue, notify });
        }
        let Ok(mut dev) = self.device.lock() else {
            return false;
        };
        match dev.activate(self.mem.clone(), self.interrupt.clone(), active) {
            Ok(()) => {
                self.activated = true;
                true
            }
            Err(e) => {
                guest_warn!(error = %e, "virtio-mmio: device activation failed");
                false
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            let reset_ok = self.device.lock().map(|mut d| d.reset()).unwrap_or(false);
            if !reset_ok {
                self.spent = true;
            }
            self.activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        for fd in &self.notify {
            // Drain a pending notification so it does not leak into the next activation.
            let _ = fd.read();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.status().store(0, Ordering::SeqCst);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            if let Ok(dev) = self.device.lock() {
                dev.read_config(offset - reg::CONFIG, data);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            guest_debug!(offset, len = data.len(), "virtio-mmio: bad register read");
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if let Ok(mut dev) = self.device.lock() {
                dev.write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            guest_debug!(offset, len = data.len(), "virtio-mmio: bad register write");
            return;
        };
        if offset % 4 != 0 {
            guest_debug!(offset, "virtio-mmio: unaligned register write");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{ActivateError, VIRTIO_MMIO_INT_VRING};
    use vm_memory::Bytes;

    const MEM_SIZE: usize = 0x1_0000;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
    const TEST_FEATURE: u64 = 1 << 3;

    #[derive(Default)]
    struct TestDevice {
        acked: u64,
        config: [u8; 8],
        mem: Option<GuestMemoryMmap>,
        interrupt: Option<Arc<Interrupt>>,
        queues: Vec<ActiveQueue>,
        activations: u32,
        resets: u32,
        cannot_reset: bool,
    }

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn avail_features(&self) -> u64 {
            VERSION_1 | TEST_FEATURE | (1 << VIRTIO_F_RING_PACKED)
        }
        fn ack_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let start = offset as usize;
            if let Some(src) = self.config.get(start..start.saturating_add(data.len())) {
                data.copy_from_slice(src);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let start = offset as usize;
            if let Some(dst) = self.config.get_mut(start..start.saturating_add(data.len())) {
                dst.copy_from_slice(data);
            }
        }
        fn activate(
            &mut self,
            mem: GuestMemoryMmap,
            interrupt: Arc<Interrupt>,
            queues: Vec<ActiveQueue>,
        ) -> Result<(), ActivateError> {
            if self.mem.is_some() {
                return Err(ActivateError::AlreadyActive);
            }
            self.mem = Some(mem);
            self.interrupt = Some(interrupt);
            self.queues = queues;
            self.activations += 1;
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            if self.cannot_reset {
                return false;
            }
            self.mem = None;
            self.queues.clear();
            true
        }
        fn queue_positions(&self) -> Option<Vec<(u16, u16)>> {
            Some(
                self.queues
                    .iter()
                    .map(|q| (q.queue.next_avail(), q.queue.next_used()))
                    .collect(),
            )
        }
    }

    impl TestDevice {
        /// Consume every available chain of queue 0: report (head, bytes, descriptors),
        /// mark each used with its byte count (a head the queue refuses is skipped, as a
        /// real device must), and interrupt the driver.
        fn process(&mut self) -> Vec<(u16, u32, usize)> {
            let mem = self.mem.clone().unwrap();
            let q = &mut self.queues[0].queue;
            let mut seen = Vec::new();
            while let Some(chain) = q.pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                let descs: Vec<_> = chain.collect();
                let bytes = descs.iter().map(|d| d.len()).fold(0u32, u32::wrapping_add);
                seen.push((head, bytes, descs.len()));
                let _ = q.add_used(&mem, head, bytes);
            }
            self.interrupt
                .as_ref()
                .unwrap()
                .trigger(VIRTIO_MMIO_INT_VRING)
                .unwrap();
            seen
        }
    }

    struct Harness {
        transport: MmioTransport,
        device: Arc<Mutex<TestDevice>>,
        mem: GuestMemoryMmap,
        irqfd: EventFd,
    }

    fn harness_with(device: TestDevice) -> Harness {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let device = Arc::new(Mutex::new(device));
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let transport = MmioTransport::new(
            mem.clone(),
            device.clone(),
            Arc::new(irqfd.try_clone().unwrap()),
        )
        .unwrap();
        Harness {
            transport,
            device,
            mem,
            irqfd,
        }
    }

    fn harness() -> Harness {
        harness_with(TestDevice::default())
    }

    impl Harness {
        fn w(&mut self, offset: u64, value: u32) {
            self.transport.write(offset, &value.to_le_bytes());
        }

        fn r(&mut self, offset: u64) -> u32 {
            let mut data = [0u8; 4];
            self.transport.read(offset, &mut data);
            u32::from_le_bytes(data)
        }

        fn negotiate(&mut self, features: u64) {
            self.w(reg::STATUS, S_ACK);
            self.w(reg::STATUS, S_ACK | S_DRIVER);
            self.w(reg::DRIVER_FEATURES_SEL, 0);
            self.w(reg::DRIVER_FEATURES, features as u32);
            self.w(reg::DRIVER_FEATURES_SEL, 1);
            self.w(reg::DRIVER_FEATURES, (features >> 32) as u32);
            self.w(reg::STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        }

        fn setup_queue(&mut self, index: u32, size: u32, base: u64) {
            self.w(reg::QUEUE_SEL, index);
            self.w(reg::QUEUE_NUM, size);
            self.w(reg::QUEUE_DESC_LOW, (base + DESC) as u32);
            self.w(reg::QUEUE_DESC_HIGH, ((base + DESC) >> 32) as u32);
            self.w(reg::QUEUE_DRIVER_LOW, (base + AVAIL) as u32);
            self.w(reg::QUEUE_DRIVER_HIGH, 0);
            self.w(reg::QUEUE_DEVICE_LOW, (base + USED) as u32);
            self.w(reg::QUEUE_DEVICE_HIGH, 0);
            self.w(reg::QUEUE_READY, 1);
        }

        fn activate(&mut self) {
            self.negotiate(VERSION_1 | TEST_FEATURE);
            self.setup_queue(0, 16, 0);
            self.setup_queue(1, 8, 0x8000);
            self.w(reg::STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        }

        fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = DESC + 16 * u64::from(index);
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }

        /// Publish `heads` in queue 0's available ring.
        fn publish(&self, heads: &[u16]) {
            for (i, head) in heads.iter().enumerate() {
                self.mem
                    .write_obj(*head, GuestAddress(AVAIL + 4 + 2 * i as u64))
                    .unwrap();
            }
            self.mem
                .write_obj(heads.len() as u16, GuestAddress(AVAIL + 2))
                .unwrap();
        }

        fn used_entry(&self, i: u64) -> (u32, u32) {
            let at = USED + 4 + 8 * i;
            (
                self.mem.read_obj(GuestAddress(at)).unwrap(),
                self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        }
    }

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    #[test]
    fn a_saved_transport_restores_into_a_fresh_one_where_the_rings_were() {
        let mut h = harness();
        h.activate();
        h.write_desc(0, 0x4000, 8, 0, 0);
        h.write_desc(1, 0x4100, 8, 0, 0);
        h.write_desc(2, 0x4200, 8, 0, 0);
        h.publish(&[0, 1]);
        assert_eq!(h.device.lock().unwrap().process().len(), 2);

        let saved = h.transport.save().unwrap();
        let device = Arc::new(Mutex::new(TestDevice::default()));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut fresh = MmioTransport::new(
            h.mem.clone(),
            device.clone(),
            Arc::new(irq.try_clone().unwrap()),
        )
        .unwrap();
        fresh.restore(&saved).unwrap();

        assert_eq!(saved.queues[0].next_avail, 2);
        assert_eq!(fresh.save().unwrap(), saved);
        let mut status = [0u8; 4];
        fresh.read(reg::STATUS, &mut status);
        assert_eq!(
            u32::from_le_bytes(status),
            S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
        );
        assert_eq!(device.lock().unwrap().acked, VERSION_1 | TEST_FEATURE);
        // The restored device carries on with the next buffer, not the first again.
        h.publish(&[0, 1, 2]);
        let seen = device.lock().unwrap().process();
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), vec![2]);
        // And it is told to look at its queues once, when the VM runs, not before.
        assert!(fresh.notify_eventfds()[0].read().is_err());
        fresh.kick_restored().unwrap();
        assert_eq!(fresh.notify_eventfds()[0].read().unwrap(), 1);
        fresh.kick_restored().unwrap();
        assert!(fresh.notify_eventfds()[0].read().is_err(), "one look only");
        assert!(fresh.restore(&saved).is_err(), "restored twice");
    }

    #[test]
    fn a_saved_transport_that_does_not_fit_is_refused() {
        let mut h = harness();
        h.activate();
        let saved = h.transport.save().unwrap();
        let fresh = |edit: &dyn Fn(&mut TransportSnapshot)| {
            let mut bad = saved.clone();
            edit(&mut bad);
            let device = Arc::new(Mutex::new(TestDevice::default()));
            let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
            let mut t = MmioTransport::new(h.mem.clone(), device.clone(), irq).unwrap();
            let err = t.restore(&bad).unwrap_err().to_string();
            assert_eq!(device.lock().unwrap().activations, 0, "{err}");
            err
        };

        assert!(fresh(&|s| s.device_type = 19).contains("another device type"));
        assert!(fresh(&|s| s.driver_features |= 1 << 40).contains("does not offer"));
        assert!(fresh(&|s| s.queues[0].desc = 1 << 40).contains("outside guest memory"));
        assert!(fresh(&|s| s.queues.truncate(1)).contains("number of queues"));
        assert!(fresh(&|s| s.status = S_ACK).contains("without DRIVER_OK"));
    }

    #[test]
    fn a_device_without_saveable_state_cannot_be_saved_once_active() {
        struct Opaque(TestDevice);
        impl VirtioDevice for Opaque {
            fn device_type(&self) -> u32 {
                self.0.device_type()
            }
            fn queue_max_sizes(&self) -> &[u16] {
                self.0.queue_max_sizes()
            }
            fn avail_features(&self) -> u64 {
                self.0.avail_features()
            }
            fn ack_features(&mut self, features: u64) {
                self.0.ack_features(features);
            }
            fn read_config(&self, offset: u64, data: &mut [u8]) {
                self.0.read_config(offset, data);
            }
            fn write_config(&mut self, offset: u64, data: &[u8]) {
                self.0.write_config(offset, data);
            }
            fn activate(
                &mut self,
                mem: GuestMemoryMmap,
                interrupt: Arc<Interrupt>,
                queues: Vec<ActiveQueue>,
            ) -> Result<(), ActivateError> {
                self.0.activate(mem, interrupt, queues)
            }
        }
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let device = Arc::new(Mutex::new(Opaque(TestDevice::default())));
        let transport = MmioTransport::new(mem, device, irq).unwrap();
        let mut h = Harness {
            transport,
            device: Arc::new(Mutex::new(TestDevice::default())),
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
            irqfd: EventFd::new(EFD_NONBLOCK).unwrap(),
        };

        assert!(h.transport.save().is_ok(), "not activated yet");
        h.activate();
        let err = h.transport.save().unwrap_err().to_string();
        assert!(
            err.contains("type 42 keeps state a snapshot cannot hold"),
            "{err}"
        );
    }

    #[test]
    fn identification_registers_describe_a_modern_device() {
        let mut h = harness();

        let ids = [
            h.r(reg::MAGIC_VALUE),
            h.r(reg::VERSION),
            h.r(reg::DEVICE_ID),
            h.r(reg::VENDOR_ID),
        ];

        assert_eq!(ids, [MMIO_MAGIC_VALUE, 2, 42, MMIO_VENDOR_ID]);
    }

    #[test]
    fn feature_windows_show_offered_features_without_unsupported_transport_bits() {
        let mut h = harness();

        h.w(reg::DEVICE_FEATURES_SEL, 0);
        let low = h.r(reg::DEVICE_FEATURES);
        h.w(reg::DEVICE_FEATURES_SEL, 1);
        let high = h.r(reg::DEVICE_FEATURES);
        h.w(reg::DEVICE_FEATURES_SEL, 7);
        let beyond = h.r(reg::DEVICE_FEATURES);

        assert_eq!(low, TEST_FEATURE as u32);
        assert_eq!(high, 1, "VERSION_1 only; RING_PACKED is masked");
        assert_eq!(beyond, 0);
    }

    #[test]
    fn full_negotiation_activates_the_device_with_configured_queues() {
        let mut h = harness();

        h.activate();

        let dev = h.device.lock().unwrap();
        assert_eq!(
            h.transport.status(),
            S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
        );
        assert_eq!(dev.acked, VERSION_1 | TEST_FEATURE);
        assert_eq!(dev.activations, 1);
        assert_eq!(dev.queues.len(), 2);
        assert_eq!(dev.queues[0].queue.size(), 16);
        assert_eq!(dev.queues[0].queue.desc_table(), DESC);
        assert_eq!(dev.queues[1].queue.avail_ring(), 0x8000 + AVAIL);
        assert_eq!(dev.queues[1].queue.used_ring(), 0x8000 + USED);
    }

    #[test]
    fn unoffered_features_make_features_ok_fail() {
        let mut h = harness();

        h.negotiate(VERSION_1 | (1 << VIRTIO_F_RING_PACKED));

        assert_eq!(h.r(reg::STATUS), S_ACK | S_DRIVER);
        assert_eq!(h.device.lock().unwrap().acked, 0);
    }

    #[test]
    fn a_legacy_driver_without_version_1_is_refused() {
        let mut h = harness();

        h.negotiate(TEST_FEATURE);

        assert_eq!(h.r(reg::STATUS), S_ACK | S_DRIVER);
    }

    #[test]
    fn driver_features_written_before_driver_status_are_ignored() {
        let mut h = harness();

        h.w(reg::DRIVER_FEATURES_SEL, 1);
        h.w(reg::DRIVER_FEATURES, 1);
        h.w(reg::STATUS, S_ACK);
        h.w(reg::STATUS, S_ACK | S_DRIVER);
        h.w(reg::STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);

        assert_eq!(h.r(reg::STATUS), S_ACK | S_DRIVER);
    }

    #[test]
    fn status_steps_cannot_be_skipped_or_undone() {
        let mut h = harness();

        h.w(reg::STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        let skipped = h.r(reg::STATUS);
        h.w(reg::STATUS, S_ACK);
        h.w(reg::STATUS, S_DRIVER);
        let cleared_ack = h.r(reg::STATUS);
        h.w(reg::STATUS, 0xffff_ff7f);
        let garbage = h.r(reg::STATUS);

        assert_eq!(skipped, 0);
        assert_eq!(cleared_ack, S_ACK);
        assert_eq!(garbage, S_ACK);
        assert_eq!(h.device.lock().unwrap().activations, 0);
    }

    #[test]
    fn failed_status_sticks_until_reset() {
        let mut h = harness();
        h.negotiate(VERSION_1);

        h.w(reg::STATUS, S_FAILED);
        h.w(
            reg::STATUS,
            S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK | S_FAILED,
        );
        let failed = h.r(reg::STATUS);
        h.w(reg::STATUS, 0);

        assert_eq!(failed, S_ACK | S_DRIVER | S_FEATURES_OK | S_FAILED);
        assert_eq!(h.r(reg::STATUS), 0);
        assert_eq!(h.device.lock().unwrap().activations, 0);
    }

    #[test]
    fn invalid_queue_sizes_fail_activation_with_needs_reset() {
        for bad_size in [0u32, 3, 32, 0x1_0010] {
            let mut h = harness();
            h.negotiate(VERSION_1);
            h.setup_queue(0, bad_size, 0);
            h.setup_queue(1, 8, 0x8000);

            h.w(reg::STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);

            assert_eq!(
                h.r(reg::STATUS),
                S_ACK | S_DRIVER | S_FEATURES_OK | S_NEEDS_RESET,
                "size {bad_size}"
            );
            assert_eq!(h.r(reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
            assert_eq!(h.device.lock().unwrap().activations, 0);
        }
    }

    #[test]
    fn rings_outside_guest_memory_or_misaligned_fail_activation() {
        for base in [MEM_SIZE as u64 - 0x1000, 0xffff_ffff_0000_0000, 0x8001] {
            let mut h = harness();
            h.negotiate(VERSION_1);
            h.setup_queue(0, 16, base);
            h.setup_queue(1, 8, 0x8000);

            h.w(reg::STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);

            assert_ne!(h.r(reg::STATUS) & S_NEEDS_RESET, 0, "base {base:#x}");
            assert_eq!(h.device.lock().unwrap().activations, 0);
        }
    }

    #[test]
    fn a_queue_left_unready_fails_activation() {
        let mut h = harness();
        h.negotiate(VERSION_1);
        h.setup_queue(0, 16, 0);

        h.w(reg::STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);

        assert_ne!(h.r(reg::STATUS) & S_NEEDS_RESET, 0);
    }

    #[test]
    fn out_of_range_queue_select_reads_zero_and_ignores_writes() {
        let mut h = harness();
        h.negotiate(VERSION_1);

        h.w(reg::QUEUE_SEL, 2);
        let max = h.r(reg::QUEUE_NUM_MAX);
        h.w(reg::QUEUE_NUM, 4);
        h.w(reg::QUEUE_READY, 1);
        let ready = h.r(reg::QUEUE_READY);
        h.w(reg::QUEUE_SEL, u32::MAX);
        h.w(reg::QUEUE_DESC_LOW, 0x1000);

        assert_eq!((max, ready), (0, 0));
    }

    #[test]
    fn queue_registers_are_read_only_outside_queue_setup() {
        let mut h = harness();
        h.activate();

        h.w(reg::QUEUE_SEL, 0);
        h.w(reg::QUEUE_READY, 0);
        h.w(reg::QUEUE_DESC_LOW, 0x4000);

        assert_eq!(h.r(reg::QUEUE_READY), 1);
        assert_eq!(h.transport.queues[0].desc, DESC);
    }

    #[test]
    fn bad_register_sizes_offsets_and_alignment_never_panic() {
        let mut h = harness();
        h.activate();
        let mut one = [0xaau8; 1];
        let mut eight = [0xaau8; 8];
        let mut empty: [u8; 0] = [];

        h.transport.read(reg::MAGIC_VALUE, &mut one);
        h.transport.read(reg::MAGIC_VALUE, &mut eight);
        h.transport.read(reg::VERSION + 1, &mut [0u8; 4]);
        h.transport.read(u64::MAX, &mut eight);
        h.transport.read(0x0f0, &mut empty);
        h.transport.write(reg::STATUS, &[0]);
        h.transport.write(reg::STATUS + 2, &[0, 0, 0, 0]);
        h.transport.write(reg::QUEUE_NOTIFY, &[0; 8]);
        h.transport.write(u64::MAX, &[1, 2, 3]);
        h.transport.write(0x0f8, &[0; 4]);

        assert_eq!(one, [0]);
        assert_eq!(eight, [0; 8]);
        assert_eq!(
            h.transport.status(),
            S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
        );
    }

    #[test]
    fn config_space_is_forwarded_and_bounded() {
        let mut h = harness();
        h.device.lock().unwrap().config = [1, 2, 3, 4, 5, 6, 7, 8];
        let mut two = [0u8; 2];
        let mut past_end = [0xffu8; 4];

        h.transport.read(reg::CONFIG + 2, &mut two);
        h.transport.read(reg::CONFIG + 6, &mut past_end);
        h.transport.write(reg::CONFIG, &[9]);

        assert_eq!(two, [3, 4]);
        assert_eq!(past_end, [0; 4]);
        assert_eq!(h.device.lock().unwrap().config[0], 9);
    }

    #[test]
    fn queue_notify_signals_the_queue_eventfd_only_when_active() {
        let mut h = harness();
        h.w(reg::QUEUE_NOTIFY, 0);
        let before = h.transport.notify_eventfds()[0].read().is_err();
        h.activate();

        h.w(reg::QUEUE_NOTIFY, 1);
        h.w(reg::QUEUE_NOTIFY, 9);

        assert!(before, "no notification before activation");
        assert!(h.transport.notify_eventfds()[0].read().is_err());
        assert_eq!(h.transport.notify_eventfds()[1].read().unwrap(), 1);
        let dev = h.device.lock().unwrap();
        assert!(dev.queues[0].notify.read().is_err());
    }

    #[test]
    fn a_descriptor_chain_round_trip_updates_the_used_ring_and_interrupts() {
        let mut h = harness();
        h.activate();
        h.write_desc(0, 0x5000, 100, NEXT, 1);
        h.write_desc(1, 0x6000, 200, WRITE, 0);
        h.write_desc(2, 0x7000, 50, 0, 0);
        h.publish(&[0, 2]);

        let seen = h.device.lock().unwrap().process();
        let status = h.r(reg::INTERRUPT_STATUS);
        h.w(reg::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);

        assert_eq!(seen, vec![(0, 300, 2), (2, 50, 1)]);
        assert_eq!(h.mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 2);
        assert_eq!(h.used_entry(0), (0, 300));
        assert_eq!(h.used_entry(1), (2, 50));
        assert_eq!(status, VIRTIO_MMIO_INT_VRING);
        assert_eq!(h.r(reg::INTERRUPT_STATUS), 0);
        assert_eq!(h.irqfd.read().unwrap(), 1);
    }

    #[test]
    fn malformed_chains_are_cut_short_without_panicking() {
        let mut h = harness();
        h.activate();
        // head 0: a loop 0 -> 1 -> 0 ...
        h.write_desc(0, 0x5000, 1, NEXT, 1);
        h.write_desc(1, 0x5000, 1, NEXT, 0);
        // head 3: next points past the table
        h.write_desc(3, 0x5000, 1, NEXT, 200);
        // head 4: buffer far outside guest memory, huge length
        h.write_desc(4, u64::MAX - 4, u32::MAX, 0, 0);
        // avail entries 300 and 0xffff are not descriptor indexes at all
        h.publish(&[0, 300, 3, 4, 0xffff]);

        let seen = h.device.lock().unwrap().process();

        assert_eq!(seen.len(), 5, "{seen:?}");
        assert!(seen.iter().all(|(_, _, n)| *n <= 16), "{seen:?}");
        assert_eq!(
            seen[1],
            (300, 0, 0),
            "an out-of-range head yields no descriptors"
        );
        assert_eq!(seen[4], (0xffff, 0, 0));
    }

    #[test]
    fn an_avail_index_far_ahead_is_rejected() {
        let mut h = harness();
        h.activate();
        h.mem.write_obj(0x8000u16, GuestAddress(AVAIL + 2)).unwrap();

        let seen = h.device.lock().unwrap().process();

        assert!(seen.is_empty());
    }

    #[test]
    fn reset_clears_negotiation_and_allows_a_second_activation() {
        let mut h = harness();
        h.activate();
        h.w(reg::QUEUE_NOTIFY, 0);

        h.w(reg::STATUS, 0);
        let after_reset = (
            h.r(reg::STATUS),
            h.r(reg::INTERRUPT_STATUS),
            h.r(reg::QUEUE_READY),
        );
        h.activate();

        assert_eq!(after_reset, (0, 0, 0));
        let dev = h.device.lock().unwrap();
        assert_eq!((dev.resets, dev.activations), (1, 2));
        assert!(h.transport.is_activated());
    }

    #[test]
    fn a_device_that_cannot_reset_is_not_activated_twice() {
        let mut h = harness_with(TestDevice {
            cannot_reset: true,
            ..Default::default()
        });
        h.activate();

        h.w(reg::STATUS, 0);
        h.activate();

        assert_ne!(h.r(reg::STATUS) & S_NEEDS_RESET, 0);
        assert_eq!(h.device.lock().unwrap().activations, 1);
    }

    #[test]
    fn shared_memory_regions_read_as_absent() {
        let mut h = harness();

        h.w(reg::SHM_SEL, 0);

        assert_eq!(h.r(reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(h.r(reg::SHM_BASE_HIGH), u32::MAX);
    }
}
