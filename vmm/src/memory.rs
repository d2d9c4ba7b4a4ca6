//! Guest RAM: anonymous, lazily-populated mappings below and above the 32-bit MMIO gap.
//!
//! Nothing here touches the guest pages: the mappings are `MAP_PRIVATE | MAP_ANONYMOUS |
//! MAP_NORESERVE`, so the host only pays for pages the guest (or the loader) writes.
//!
//! Each mapping starts at a 2 MiB-aligned host address ([`HUGE_PAGE`]), as QEMU places
//! its RAM: the hypervisor can map a guest's 2 MiB page with one huge entry of its second
//! level page tables (EPT/NPT) only where the guest-physical and host addresses agree
//! modulo 2 MiB, and only then do the host's transparent huge pages reach the guest.
//! Left where `mmap` puts it, the mapping was aligned or not by accident of the process's
//! layout (below a malloc arena of glibc's, 64 MiB-aligned, it was; in a musl build of
//! the VMM it was not, and a boot to agent ready in the nested hardware-KVM lane took
//! 905 / 919 ms against 834 / 842 aligned, every page the guest touched a fault of its
//! own).

use std::sync::Arc;

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
        source: std::io::Error,
    },
    #[error("guest memory at {gpa:#x} ({len} bytes) is not a valid vm-memory region")]
    Region {
        gpa: u64,
        len: usize,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest memory at {gpa:#x} ({len} bytes) runs past the end of the address space")]
    PastEnd { gpa: u64, len: usize },
    #[error("guest memory regions do not form a valid layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
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

/// The host alignment of every guest RAM mapping: an x86 huge page.
pub const HUGE_PAGE: usize = 2 << 20;

/// Guest RAM made by [`create_guest_memory`]: the memory, and the mappings behind it,
/// which it owns. It dereferences to the [`GuestMemoryMmap`] the VMM works with; clones of
/// that share its regions. Dropped, it unmaps each mapping once nothing else holds its
/// region (a clone still alive keeps its mapping, which is then left to the process's end).
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    mappings: Vec<(Arc<vm_memory::GuestRegionMmap<()>>, Mapping)>,
}

impl GuestRam {
    /// The guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

impl std::ops::Deref for GuestRam {
    type Target = GuestMemoryMmap;

    fn deref(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // Our collection's references go first; what is left per region is ours alone
        // unless a clone of the memory outlives this.
        self.memory = GuestMemoryMmap::default();
        for (region, mapping) in self.mappings.drain(..) {
            if Arc::strong_count(&region) == 1 {
                drop(region);
                drop(mapping);
            } else {
                tracing::debug!(
                    len = mapping.len,
                    "guest memory still referenced: its mapping stays"
                );
                std::mem::forget(mapping);
            }
        }
    }
}

/// One anonymous mapping, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    addr: usize,
    len: usize,
}

/// Protection and flags of every guest RAM mapping.
const PROT: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;
const FLAGS: libc::c_int = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

impl Mapping {
    /// Map `len` bytes (a multiple of the page size) at a [`HUGE_PAGE`]-aligned address:
    /// map `len` + 2 MiB (untouched, so it costs nothing yet) and give back the slack
    /// before and after the aligned part.
    fn aligned(len: usize) -> std::io::Result<Self> {
        let reserve = len
            .checked_add(HUGE_PAGE)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a new anonymous mapping at an address of the kernel's choosing; nothing
        // existing is touched.
        let base = unsafe { libc::mmap(std::ptr::null_mut(), reserve, PROT, FLAGS, -1, 0) };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = base as usize;
        let addr = base.next_multiple_of(HUGE_PAGE);
        let head = addr - base;
        // SAFETY: both ranges are the parts of the mapping just made that lie outside
        // `addr..addr+len` (the tail is never empty: `head` < 2 MiB); nothing uses them.
        unsafe {
            if head > 0 {
                libc::munmap(base as *mut libc::c_void, head);
            }
            libc::munmap((addr + len) as *mut libc::c_void, HUGE_PAGE - head);
        }
        Ok(Self { addr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours ([`Mapping::aligned`]) and, dropped, no longer used
        // ([`GuestRam`]'s drop drops it only with the last reference to its region).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Allocate `mem_mib` MiB of guest RAM (not touched, not reserved), each range at a
/// 2 MiB-aligned host address.
pub fn create_guest_memory(mem_mib: u32) -> Result<GuestRam, MemoryError> {
    if mem_mib < MIN_MEM_MIB {
        return Err(MemoryError::TooSmall {
            mib: mem_mib,
            min: MIN_MEM_MIB,
        });
    }
    let mut mappings = Vec::new();
    for (gpa, len) in ram_ranges(mem_mib) {
        let mapping = Mapping::aligned(len).map_err(|source| MemoryError::Allocate {
            mib: mem_mib,
            source,
        })?;
        // SAFETY: `mapping` is a live private anonymous read-write mapping of exactly
        // `len` bytes, which `GuestRam` keeps until the region made here is its alone.
        let region =
            unsafe { vm_memory::MmapRegion::build_raw(mapping.addr as *mut u8, len, PROT, FLAGS) }
                .map_err(|source| MemoryError::Region {
                    gpa: gpa.raw_value(),
                    len,
                    source,
                })?;
        let region = vm_memory::GuestRegionMmap::new(region, gpa).ok_or(MemoryError::PastEnd {
            gpa: gpa.raw_value(),
            len,
        })?;
        mappings.push((Arc::new(region), mapping));
    }
    let memory = GuestMemoryMmap::from_arc_regions(
        mappings
            .iter()
            .map(|(region, _)| Arc::clone(region))
            .collect(),
    )
    .map_err(MemoryError::Layout)?;
    Ok(GuestRam { memory, mappings })
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
    use vm_memory::Bytes;

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

    /// Whether every page of `addr..addr+len` is mapped in this process (`mincore` fails
    /// with ENOMEM where one is not).
    fn mapped(addr: usize, len: usize) -> bool {
        let mut pages = vec![0u8; len.div_ceil(4096)];
        // SAFETY: mincore only reads the page tables and writes `pages`, one byte per page.
        unsafe { libc::mincore(addr as *mut libc::c_void, len, pages.as_mut_ptr()) == 0 }
    }

    /// Whether no page of `addr..addr+len` is mapped.
    fn unmapped(addr: usize, len: usize) -> bool {
        (addr..addr + len)
            .step_by(4096)
            .all(|page| !mapped(page, 4096))
    }

    #[test]
    fn every_range_of_guest_memory_starts_at_a_huge_page_boundary() {
        for mib in [16, 64, 255, 4096] {
            let ram = create_guest_memory(mib).unwrap();

            let regions: Vec<_> = ram.iter().collect();
            assert_eq!(regions.len(), ram_ranges(mib).len());
            for region in regions {
                assert_eq!(
                    region.as_ptr() as usize % HUGE_PAGE,
                    0,
                    "{mib} MiB: the range at {:#x}",
                    region.start_addr().raw_value()
                );
                // Congruent with its guest-physical address modulo 2 MiB: what lets the
                // hypervisor map the guest's huge pages with huge entries.
                assert_eq!(region.start_addr().raw_value() % HUGE_PAGE as u64, 0);
            }
        }
    }

    #[test]
    fn guest_memory_is_unmapped_with_the_last_reference_and_not_before() {
        let ram = create_guest_memory(64).unwrap();
        let addr = ram.iter().next().unwrap().as_ptr() as usize;
        let len = 64 << 20;
        let clone = ram.memory().clone();
        clone.write_obj(0xfeed_u64, GuestAddress(0x1000)).unwrap();

        drop(ram);
        assert!(mapped(addr, len), "a clone still uses it");
        assert_eq!(clone.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0xfeed);

        // The last owner unmaps it, and the slack of its reservation is gone too. In a
        // child of this process with one thread, where no other test maps anything.
        let child = crate::seccomp::tests::in_child_with(&[], || {
            let len = 64 << 20;
            let Ok(ram) = create_guest_memory(64) else {
                return 2;
            };
            let addr = ram.iter().next().map_or(0, |r| r.as_ptr() as usize);
            let before = mapped(addr, len);
            drop(ram);
            // The reservation's tail (2 MiB less its head) lies right above the mapping.
            let after = (unmapped(addr, len), unmapped(addr + len, 4096));
            match (before, after) {
                (true, (true, true)) => 0,
                _ => 1,
            }
        });
        assert_eq!(
            child,
            Ok(0),
            "unmapped with its last reference, slack included"
        );
    }

    #[test]
    fn guest_memory_is_created_without_touching_it() {
        let mem = create_guest_memory(64).unwrap();

        assert_eq!(low_ram_end(&mem), 64 << 20);
        assert!(contains_range(&mem, (64 << 20) - 8, 8));
        assert!(!contains_range(&mem, (64 << 20) - 4, 8));
    }
}
