//! The Linux boot protocol's zero page (`boot_params`) for the 64-bit entry point.

use linux_loader::loader::bootparam::E820_MAX_ENTRIES_ZEROPAGE;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::{BootError, Initrd};
use crate::layout::{CMDLINE_ADDR, ZERO_PAGE_ADDR};
use crate::memory::GuestMemoryMmap;

const BOOT_FLAG: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;

/// Write the zero page: the kernel's own setup header (bzImage) or a minimal one (ELF),
/// plus command line, initrd and E820 map.
pub(super) fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    map: &[(u64, u64, u32)],
    initrd: Option<Initrd>,
    cmdline_len: usize,
) -> Result<(), BootError> {
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootError::TooManyMemoryRegions(map.len()));
    }
    let mut params = boot_params::default();
    let mut hdr = header.unwrap_or_else(|| setup_header {
        boot_flag: BOOT_FLAG,
        header: HDRS_MAGIC,
        kernel_alignment: KERNEL_ALIGNMENT,
        ..Default::default()
    });
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        hdr.ramdisk_image = initrd.addr as u32;
        hdr.ramdisk_size = initrd.size as u32;
    }
    params.hdr = hdr;
    let mut table = [boot_e820_entry::default(); E820_MAX_ENTRIES_ZEROPAGE];
    for (slot, &(addr, size, r#type)) in table.iter_mut().zip(map) {
        *slot = boot_e820_entry { addr, size, r#type };
    }
    params.e820_table = table;
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|source| BootError::Write {
            what: "zero page",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn an_elf_kernel_gets_a_minimal_header_with_cmdline_and_initrd() {
        let mem = create_guest_memory(16).unwrap();
        let initrd = Initrd {
            addr: 0x80_0000,
            size: 99,
        };

        write_zero_page(&mem, None, &[(0, 0x9fc00, 1)], Some(initrd), 42).unwrap();

        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let hdr = params.hdr;
        let entry = params.e820_table[0];
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG);
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.type_of_loader }, LOADER_TYPE_UNDEFINED);
        assert_eq!(
            ({ hdr.cmd_line_ptr }, { hdr.cmdline_size }),
            (CMDLINE_ADDR as u32, 42)
        );
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x80_0000, 99)
        );
        assert_eq!({ params.e820_entries }, 1);
        assert_eq!(
            ({ entry.addr }, { entry.size }, { entry.r#type }),
            (0, 0x9fc00, 1)
        );
    }

    #[test]
    fn a_bzimage_header_is_kept() {
        let mem = create_guest_memory(16).unwrap();
        let header = setup_header {
            version: 0x20f,
            init_size: 0x1234,
            ..Default::default()
        };

        write_zero_page(&mem, Some(header), &[], None, 0).unwrap();

        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let hdr = params.hdr;
        assert_eq!(({ hdr.version }, { hdr.init_size }), (0x20f, 0x1234));
    }
}
