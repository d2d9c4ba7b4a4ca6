//! Port-I/O and MMIO buses: route a trapped guest access to the device that owns the
//! address range.

use std::sync::{Arc, Mutex};

use crate::devices::BusDevice;

/// Errors building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
    #[error("device range {base:#x}+{len:#x} is empty or wraps")]
    BadRange { base: u64, len: u64 },
}

#[derive(Debug)]
struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping device ranges, sorted by base address.
#[derive(Debug, Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Give `base..base+len` to `device`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let overlaps = self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(pos, Entry { base, len, device });
        Ok(())
    }

    /// The device owning `addr`, with `addr`'s offset into its range.
    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let pos = self.entries.partition_point(|e| e.base <= addr);
        let entry = self.entries.get(pos.checked_sub(1)?)?;
        let offset = addr - entry.base;
        (offset < entry.len).then_some((entry, offset))
    }

    /// Forward a read; returns false (and leaves `data` alone) when nothing owns `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((entry, offset)) = self.find(addr) else {
            return false;
        };
        if let Ok(mut device) = entry.device.lock() {
            device.read(offset, data);
        }
        true
    }

    /// Forward a write; returns false when nothing owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((entry, offset)) = self.find(addr) else {
            return false;
        };
        if let Ok(mut device) = entry.device.lock() {
            device.write(offset, data);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_owner_with_their_offset() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x100, 0x10, a.clone()).unwrap();
        bus.insert(0x200, 0x10, b.clone()).unwrap();
        let mut data = [0u8; 1];

        let hit = bus.read(0x20f, &mut data);
        let miss = bus.write(0x110, &[1]);
        bus.write(0x101, &[7]);

        assert!(hit);
        assert_eq!(data, [0x0f]);
        assert!(!miss);
        assert_eq!(a.lock().unwrap().writes, vec![(1, vec![7])]);
        assert!(b.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn overlapping_and_wrapping_ranges_are_refused() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();

        let overlap = bus.insert(0x10f, 0x10, Arc::new(Mutex::new(Recorder::default())));
        let wrap = bus.insert(u64::MAX, 2, Arc::new(Mutex::new(Recorder::default())));
        let empty = bus.insert(0x300, 0, Arc::new(Mutex::new(Recorder::default())));

        assert!(matches!(overlap, Err(BusError::Overlap { .. })));
        assert!(matches!(wrap, Err(BusError::BadRange { .. })));
        assert!(matches!(empty, Err(BusError::BadRange { .. })));
    }

    #[test]
    fn addresses_below_every_device_miss() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        let mut data = [0xaa; 4];

        let hit = bus.read(0, &mut data);

        assert!(!hit);
        assert_eq!(data, [0xaa; 4]);
    }
}
