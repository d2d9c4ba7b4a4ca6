//! PVH boot information: `hvm_start_info`, the module list (the initrd) and the memory
//! map, as the Xen PVH ABI (used by Linux's `pvh_start_xen`) defines them.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};

use super::{BootError, Initrd};
use crate::layout::{
    CMDLINE_ADDR, PVH_INFO_ADDR, PVH_MEMMAP_ADDR, PVH_MEMMAP_MAX, PVH_MODLIST_ADDR,
};
use crate::memory::GuestMemoryMmap;

/// `hvm_start_info.magic` ("xEn3" with bit 7 set on the 'n').
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Write `hvm_start_info` and the tables it points at.
pub(super) fn write_start_info(
    mem: &GuestMemoryMmap,
    map: &[(u64, u64, u32)],
    initrd: Option<Initrd>,
) -> Result<(), BootError> {
    if map.len() > PVH_MEMMAP_MAX {
        return Err(BootError::TooManyMemoryRegions(map.len()));
    }
    let err = |what| move |source| BootError::Write { what, source };
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        };
        let at = PVH_MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))
            .map_err(err("PVH memory map"))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_ADDR))
            .map_err(err("PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))
        .map_err(err("PVH start info"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn start_info_points_at_the_memory_map_module_and_cmdline() {
        let mem = create_guest_memory(16).unwrap();
        let map = [(0, 0x9fc00, 1), (0x10_0000, 0xf0_0000, 1)];
        let initrd = Initrd {
            addr: 0x80_0000,
            size: 1234,
        };

        write_start_info(&mem, &map, Some(initrd)).unwrap();

        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        let second: hvm_memmap_table_entry =
            mem.read_obj(GuestAddress(PVH_MEMMAP_ADDR + 24)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!((info.nr_modules, info.modlist_paddr), (1, PVH_MODLIST_ADDR));
        assert_eq!(
            (info.memmap_paddr, info.memmap_entries),
            (PVH_MEMMAP_ADDR, 2)
        );
        assert_eq!(info.cmdline_paddr, CMDLINE_ADDR);
        assert_eq!((module.paddr, module.size), (0x80_0000, 1234));
        assert_eq!(
            (second.addr, second.size, second.type_),
            (0x10_0000, 0xf0_0000, 1)
        );
    }

    #[test]
    fn without_an_initrd_there_are_no_modules() {
        let mem = create_guest_memory(16).unwrap();

        write_start_info(&mem, &[(0, 0x9fc00, 1)], None).unwrap();

        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
    }
}
