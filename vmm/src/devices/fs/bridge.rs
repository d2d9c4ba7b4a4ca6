//! The vm-memory 0.17 / virtio-queue 0.17 view of guest RAM and queues that fuse-backend-rs
//! 0.14 needs, over the VMM's vm-memory 0.18 memory (see the module documentation of
//! [`crate::devices::fs`]).

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vm_memory_017 as vm017;

/// Guest RAM as fuse-backend-rs sees it.
pub type GuestMemory017 = vm017::GuestMemoryMmap<()>;

/// Errors building the 0.17 view.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot describe guest memory region at {start:#x} ({len:#x} bytes)")]
    Region {
        start: u64,
        len: usize,
        #[source]
        source: vm017::mmap::MmapRegionError,
    },
    #[error("guest memory region at {start:#x} wraps around the address space")]
    Wraps { start: u64 },
    #[error("cannot assemble the guest memory view")]
    Collection(#[source] vm017::GuestRegionCollectionError),
    #[error("queue {index} is not set up as a valid virtqueue")]
    InvalidQueue { index: usize },
}

/// A vm-memory 0.17 view of guest RAM that keeps the RAM it views alive.
#[derive(Debug)]
pub struct GuestRam {
    // Field order is drop order: the view goes before the memory it borrows from.
    view: GuestMemory017,
    backing: GuestMemoryMmap,
}

impl GuestRam {
    /// A view of every region of `mem`, at the same guest addresses and the same host
    /// mappings. Holds a clone of `mem` (its regions are reference-counted), so the mappings
    /// live at least as long as the view.
    pub fn new(mem: &GuestMemoryMmap) -> Result<Self, BridgeError> {
        let backing = mem.clone();
        let mut regions = Vec::new();
        for region in backing.iter() {
            let start = region.start_addr().raw_value();
            let len = region.len() as usize;
            // SAFETY: `region.as_ptr()` and `len` describe a live mapping of this process
            // (the 0.18 region owns it and unmaps it only when dropped). `backing`, a clone
            // sharing the same reference-counted regions, is stored next to the view and is
            // dropped after it (field order), and the 0.17 region built from a raw pointer
            // does not own the mapping, so it never unmaps it. The VMM never remaps guest
            // RAM while devices run. Concurrent guest writes are what vm-memory is built for
            // in both versions (all accesses are volatile copies, never references).
            let mapping = unsafe {
                vm017::MmapRegion::<()>::build_raw(
                    region.as_ptr(),
                    len,
                    region.prot(),
                    region.flags(),
                )
            }
            .map_err(|source| BridgeError::Region { start, len, source })?;
            let region = vm017::GuestRegionMmap::new(mapping, vm017::GuestAddress(start))
                .ok_or(BridgeError::Wraps { start })?;
            regions.push(region);
        }
        let view = GuestMemory017::from_regions(regions).map_err(BridgeError::Collection)?;
        Ok(Self { view, backing })
    }

    pub fn view(&self) -> &GuestMemory017 {
        &self.view
    }

    /// The memory the view stands for.
    pub fn backing(&self) -> &GuestMemoryMmap {
        &self.backing
    }
}

/// A virtio-queue 0.17 queue with the same rings, size and position as `queue`. Only the
/// returned queue may be used from then on.
pub fn convert_queue(
    index: usize,
    queue: &virtio_queue::Queue,
    ram: &GuestRam,
) -> Result<virtio_queue_017::Queue, BridgeError> {
    use virtio_queue::QueueT as _;
    use virtio_queue_017::QueueT as _;
    let invalid = || BridgeError::InvalidQueue { index };
    let mut q = virtio_queue_017::Queue::new(queue.max_size()).map_err(|_| invalid())?;
    q.try_set_size(queue.size()).map_err(|_| invalid())?;
    q.try_set_desc_table_address(vm017::GuestAddress(queue.desc_table()))
        .map_err(|_| invalid())?;
    q.try_set_avail_ring_address(vm017::GuestAddress(queue.avail_ring()))
        .map_err(|_| invalid())?;
    q.try_set_used_ring_address(vm017::GuestAddress(queue.used_ring()))
        .map_err(|_| invalid())?;
    q.set_next_avail(queue.next_avail());
    q.set_next_used(queue.next_used());
    q.set_event_idx(queue.event_idx_enabled());
    q.set_ready(queue.ready());
    if !q.is_valid(ram.view()) {
        return Err(invalid());
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};
    use vm_memory_017::Bytes as _;

    #[test]
    fn the_view_sees_the_same_bytes_both_ways() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap();
        let ram = GuestRam::new(&mem).unwrap();

        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        ram.view()
            .write_obj(0x1234_5678u32, vm017::GuestAddress((1 << 32) + 8))
            .unwrap();
        let seen_by_view: u32 = ram.view().read_obj(vm017::GuestAddress(0x1000)).unwrap();
        let seen_by_vmm: u32 = mem.read_obj(GuestAddress((1 << 32) + 8)).unwrap();
        let outside = ram.view().read_obj::<u32>(vm017::GuestAddress(2 << 20));

        assert_eq!(seen_by_view, 0xdead_beef);
        assert_eq!(seen_by_vmm, 0x1234_5678);
        assert!(outside.is_err());
    }

    #[test]
    fn the_view_outlives_the_vmm_handle() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_obj(7u64, GuestAddress(64)).unwrap();
        let ram = GuestRam::new(&mem).unwrap();

        drop(mem);
        let value: u64 = ram.view().read_obj(vm017::GuestAddress(64)).unwrap();

        assert_eq!(value, 7);
    }

    #[test]
    fn a_queue_keeps_its_rings_and_position() {
        use virtio_queue::QueueT;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let ram = GuestRam::new(&mem).unwrap();
        let mut q = virtio_queue::Queue::new(256).unwrap();
        q.set_size(128);
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        q.set_next_avail(5);
        q.set_next_used(4);
        q.set_ready(true);
        let mut broken = virtio_queue::Queue::new(256).unwrap();
        broken.set_desc_table_address(Some(0xff_0000), Some(0));
        broken.set_ready(true);

        let converted = convert_queue(0, &q, &ram).unwrap();
        let refused = convert_queue(1, &broken, &ram);

        use virtio_queue_017::QueueT as _;
        assert_eq!(converted.size(), 128);
        assert_eq!(converted.desc_table(), 0x1000);
        assert_eq!(converted.avail_ring(), 0x2000);
        assert_eq!(converted.used_ring(), 0x3000);
        assert_eq!(converted.next_avail(), 5);
        assert_eq!(converted.next_used(), 4);
        assert!(converted.ready());
        assert!(matches!(
            refused,
            Err(BridgeError::InvalidQueue { index: 1 })
        ));
    }
}
