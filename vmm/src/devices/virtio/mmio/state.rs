//! A transport's registers and its queues' ring positions, for snapshots. Restoring
//! builds the queues again and activates the device as DRIVER_OK would have, without the
//! guest doing anything.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use virtio_queue::QueueT;

use super::{MmioError, MmioTransport, QueueConfig, S_DRIVER_OK, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::virtio::ActiveQueue;

/// One queue: the driver's configuration and where the device was in its rings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct QueueSnapshot {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// Everything the driver set through the transport's registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct TransportSnapshot {
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub activated: bool,
    pub queues: Vec<QueueSnapshot>,
}

impl MmioTransport {
    /// The registers and ring positions now (the device must be idle: its event loop
    /// stopped, no vCPU running).
    pub fn save(&self) -> Result<TransportSnapshot, MmioError> {
        let positions = if self.activated {
            let dev = self.device.lock().map_err(|_| MmioError::NoQueues)?;
            dev.queue_positions().ok_or(MmioError::NotSaveable {
                device_type: self.device_type,
            })?
        } else {
            Vec::new()
        };
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let (next_avail, next_used) = positions.get(i).copied().unwrap_or_default();
                QueueSnapshot {
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                    next_avail,
                    next_used,
                }
            })
            .collect();
        Ok(TransportSnapshot {
            device_type: self.device_type,
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status().load(Ordering::SeqCst),
            activated: self.activated,
            queues,
        })
    }

    /// Put back a freshly created transport's registers and, when the device was
    /// activated, activate it on queues at the saved ring positions. The saved values
    /// are checked as a driver's writes would be.
    pub fn restore(&mut self, saved: &TransportSnapshot) -> Result<(), MmioError> {
        if self.activated || self.status != 0 {
            return Err(MmioError::BadSnapshot("the transport is already in use"));
        }
        if saved.device_type != self.device_type {
            return Err(MmioError::BadSnapshot("another device type"));
        }
        if saved.queues.len() != self.queues.len() {
            return Err(MmioError::BadSnapshot("another number of queues"));
        }
        if saved.driver_features & !self.offered_features != 0 {
            return Err(MmioError::BadSnapshot(
                "features this device does not offer",
            ));
        }
        for (q, s) in self.queues.iter_mut().zip(&saved.queues) {
            *q = QueueConfig {
                max_size: q.max_size,
                size: s.size,
                ready: s.ready,
                desc: s.desc,
                avail: s.avail,
                used: s.used,
            };
        }
        self.driver_features = saved.driver_features;
        self.device_features_sel = saved.device_features_sel;
        self.driver_features_sel = saved.driver_features_sel;
        self.queue_sel = saved.queue_sel;
        self.config_generation = saved.config_generation;
        self.interrupt
            .status()
            .store(saved.interrupt_status, Ordering::SeqCst);
        self.status = saved.status;
        if !saved.activated {
            return Ok(());
        }
        if saved.status & S_DRIVER_OK == 0 {
            return Err(MmioError::BadSnapshot("activated without DRIVER_OK"));
        }
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut active = Vec::with_capacity(self.queues.len());
        for ((q, s), fd) in self.queues.iter().zip(&saved.queues).zip(&self.notify) {
            if q.problem(&self.mem).is_some() {
                return Err(MmioError::BadSnapshot("a queue outside guest memory"));
            }
            let mut queue = q
                .build(event_idx)
                .ok_or(MmioError::BadSnapshot("a queue that cannot be built"))?;
            queue.set_next_avail(s.next_avail);
            queue.set_next_used(s.next_used);
            let notify = fd.try_clone().map_err(MmioError::EventFd)?;
            active.push(ActiveQueue { queue, notify });
        }
        let mut dev = self.device.lock().map_err(|_| MmioError::NoQueues)?;
        dev.ack_features(self.driver_features);
        dev.activate(self.mem.clone(), self.interrupt.clone(), active)
            .map_err(|_| MmioError::BadSnapshot("the device refused to activate"))?;
        drop(dev);
        self.activated = true;
        // What the guest queued just before the snapshot was never looked at: the device
        // looks once when the VM runs (`kick_restored`).
        self.kick_owed = true;
        Ok(())
    }

    /// After a restore: have the device look at its queues once (what the guest queued
    /// just before the snapshot was never looked at). Not part of [`Self::restore`], but
    /// done once the VM runs: a look can start work on other threads (an fs worker enters
    /// its seccomp list at its first queue event: ~1 ms of kernel work each under
    /// kvm_pvm), which would hold up the VM's setup. Does nothing otherwise.
    pub fn kick_restored(&mut self) -> Result<(), MmioError> {
        if std::mem::take(&mut self.kick_owed) {
            for fd in &self.notify {
                fd.write(1).map_err(MmioError::EventFd)?;
            }
        }
        Ok(())
    }
}
