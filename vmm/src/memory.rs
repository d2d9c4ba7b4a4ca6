//! Guest RAM: anonymous, lazily-populated mappings below and above the 32-bit MMIO gap.
//!
//! Nothing here touches the guest pages: the mappings are `MAP_PRIVATE | MAP_ANONYMOUS |
//! MAP_NORESERVE`, so the host only pays for pages the guest (or the loader) writes.

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::hypervisor::{HypervisorError, Vm};
use crate::layout::{LOW_RAM_MAX, MIN_MEM_MIB, MMIO_GAP_END};

/// The guest memory type used across the VMM.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors building or mapping guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {mib} MiB is below the minimum of {min} MiB")]
    TooSmall { mib: u32, min: u32 },
    #[error("cannot allocate {mib} MiB of guest memory")]
    Allocate {
        mib: u32,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot map guest memory into the VM")]
    Map(#[source] HypervisorError),
}

/// The guest-physical RAM ranges for `mem_mib` MiB: up to 3 GiB from address 0, the rest
/// from 4 GiB.
pub fn ram_ranges(mem_mib: u32) -> Vec<(GuestAddress, usize)> {
    let total = u64::from(mem_mib) << 20;
    let low = total.min(LOW_RAM_MAX);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    let high = total - low;
    if high > 0 {
        ranges.push((GuestAddress(MMIO_GAP_END), high as usize));
    }
    ranges
}

/// Allocate `mem_mib` MiB of guest RAM (not touched, not reserved).
pub fn create_guest_memory(mem_mib: u32) -> Result<GuestMemoryMmap, MemoryError> {
    if mem_mib < MIN_MEM_MIB {
        return Err(MemoryError::TooSmall {
            mib: mem_mib,
            min: MIN_MEM_MIB,
        });
    }
    GuestMemoryMmap::from_ranges(&ram_ranges(mem_mib)).map_err(|source| MemoryError::Allocate {
        mib: mem_mib,
        source,
    })
}

/// Register every region of `mem` with the VM, one memory slot per region.
///
/// The VM must not outlive `mem` (keep a clone of the `GuestMemoryMmap` with the VM).
pub fn map_into_vm(vm: &dyn Vm, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region.as_ptr() as u64;
        // SAFETY: the region is a live anonymous mapping owned by `mem`, which the caller
        // keeps alive as long as the VM (this function's documented contract).
        unsafe {
            vm.map_memory(
                slot as u32,
                region.start_addr().raw_value(),
                region.len(),
                host,
            )
        }
        .map_err(MemoryError::Map)?;
    }
    Ok(())
}

/// End (exclusive) of the RAM below the MMIO gap.
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .find(|r| r.start_addr().raw_value() == 0)
        .map(|r| r.len())
        .unwrap_or(0)
}

/// Whether `addr..addr+len` lies entirely in guest RAM.
pub fn contains_range(mem: &GuestMemoryMmap, addr: u64, len: usize) -> bool {
    mem.check_range(GuestAddress(addr), len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_low_range() {
        let ranges = ram_ranges(128);

        assert_eq!(ranges, vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn memory_beyond_three_gib_continues_above_four_gib() {
        let ranges = ram_ranges(4096);

        assert_eq!(
            ranges,
            vec![
                (GuestAddress(0), 3 << 30),
                (GuestAddress(MMIO_GAP_END), 1 << 30)
            ]
        );
    }

    #[test]
    fn tiny_memory_is_refused() {
        let err = create_guest_memory(1).unwrap_err();

        assert!(matches!(err, MemoryError::TooSmall { mib: 1, .. }));
    }

    #[test]
    fn guest_memory_is_created_without_touching_it() {
        let mem = create_guest_memory(64).unwrap();

        assert_eq!(low_ram_end(&mem), 64 << 20);
        assert!(contains_range(&mem, (64 << 20) - 8, 8));
        assert!(!contains_range(&mem, (64 << 20) - 4, 8));
    }
}
