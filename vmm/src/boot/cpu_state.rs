//! The boot vCPU's state at kernel entry: a flat GDT, segment registers, and either
//! 32-bit protected mode (PVH) or identity-mapped long mode (64-bit boot protocol).

use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::hypervisor::{DescriptorTable, Regs, Segment, SpecialRegs, VcpuX86};
use crate::layout::{
    BOOT_GDT_ADDR, BOOT_IDT_ADDR, BOOT_STACK_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, PVH_INFO_ADDR,
    ZERO_PAGE_ADDR,
};
use crate::memory::GuestMemoryMmap;

/// GDT: null, 64-bit code (0x08), flat data (0x10), 32-bit code (0x18).
const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00cf_9b00_0000_ffff,
];
const CODE64_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const CODE32_SELECTOR: u16 = 0x18;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 0x2;

/// Unpack GDT descriptor `entry` loaded with `selector`.
fn segment(entry: u64, selector: u16) -> Segment {
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let limit = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
    let g = (entry >> 55) & 1 == 1;
    Segment {
        base,
        // With 4 KiB granularity the effective limit covers the whole last page.
        limit: if g {
            ((limit << 12) | 0xfff) as u32
        } else {
            limit as u32
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        s: (entry >> 44) & 1 == 1,
        dpl: ((entry >> 45) & 0x3) as u8,
        present: (entry >> 47) & 1 == 1,
        avl: (entry >> 52) & 1 == 1,
        l: (entry >> 53) & 1 == 1,
        db: (entry >> 54) & 1 == 1,
        g,
        unusable: false,
    }
}

fn gdt_segment(selector: u16) -> Segment {
    let entry = GDT.get(usize::from(selector >> 3)).copied().unwrap_or(0);
    segment(entry, selector)
}

/// Write the boot GDT (and an empty IDT after it).
pub(super) fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let mut bytes = Vec::with_capacity(GDT.len() * 8 + 8);
    for entry in GDT {
        bytes.extend_from_slice(&entry.to_le_bytes());
    }
    bytes.extend_from_slice(&[0; 8]);
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_ADDR))
        .map_err(|source| BootError::Write {
            what: "boot GDT",
            source,
        })
}

/// Identity-map the first 4 GiB with 2 MiB pages (PML4 → one PDPT → four PDs).
pub(super) fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let err = |source| BootError::Write {
        what: "page tables",
        source,
    };
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))
        .map_err(err)?;
    let mut pdpt = Vec::with_capacity(4 * 8);
    let mut pds = Vec::with_capacity(4 * 512 * 8);
    for pd in 0..4u64 {
        pdpt.extend_from_slice(&((PD_ADDR + pd * 0x1000) | 0x3).to_le_bytes());
        for i in 0..512u64 {
            // Present | writable | 2 MiB page.
            pds.extend_from_slice(&(((pd * 512 + i) << 21) | 0x83).to_le_bytes());
        }
    }
    mem.write_slice(&pdpt, GuestAddress(PDPT_ADDR))
        .map_err(err)?;
    mem.write_slice(&pds, GuestAddress(PD_ADDR)).map_err(err)
}

fn flat_sregs(mut sregs: SpecialRegs, code_selector: u16) -> SpecialRegs {
    let data = gdt_segment(DATA_SELECTOR);
    sregs.cs = gdt_segment(code_selector);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt = DescriptorTable {
        base: BOOT_GDT_ADDR,
        limit: (GDT.len() * 8 - 1) as u16,
    };
    sregs.idt = DescriptorTable {
        base: BOOT_IDT_ADDR,
        limit: 7,
    };
    sregs
}

/// PVH entry: 32-bit protected mode, paging off, RBX = `hvm_start_info`.
pub(super) fn enter_pvh(vcpu: &dyn VcpuX86, entry: u64) -> Result<(), BootError> {
    let current = vcpu.special_regs().map_err(BootError::Registers)?;
    let mut sregs = flat_sregs(current, CODE32_SELECTOR);
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_special_regs(&sregs)
        .map_err(BootError::Registers)?;
    let regs = Regs {
        rip: entry,
        rbx: PVH_INFO_ADDR,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(BootError::Registers)
}

/// 64-bit boot protocol entry: long mode, identity map, RSI = zero page.
pub(super) fn enter_long_mode(vcpu: &dyn VcpuX86, entry: u64) -> Result<(), BootError> {
    let current = vcpu.special_regs().map_err(BootError::Registers)?;
    let mut sregs = flat_sregs(current, CODE64_SELECTOR);
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_special_regs(&sregs)
        .map_err(BootError::Registers)?;
    let regs = Regs {
        rip: entry,
        rsi: ZERO_PAGE_ADDR,
        rsp: BOOT_STACK_ADDR,
        rbp: BOOT_STACK_ADDR,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(BootError::Registers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_descriptor_unpacks_to_a_flat_long_mode_segment() {
        let seg = gdt_segment(CODE64_SELECTOR);

        assert_eq!(
            seg,
            Segment {
                base: 0,
                limit: 0xffff_ffff,
                selector: 0x08,
                type_: 0xb,
                present: true,
                dpl: 0,
                db: false,
                s: true,
                l: true,
                g: true,
                avl: false,
                unusable: false,
            }
        );
    }

    #[test]
    fn data_and_code32_descriptors_are_flat_32_bit() {
        let data = gdt_segment(DATA_SELECTOR);
        let code32 = gdt_segment(CODE32_SELECTOR);

        assert_eq!(
            (data.type_, data.db, data.l, data.limit),
            (0x3, true, false, 0xffff_ffff)
        );
        assert_eq!((code32.type_, code32.db, code32.l), (0xb, true, false));
    }

    #[test]
    fn an_unknown_selector_is_a_null_segment() {
        let seg = gdt_segment(0x80);

        assert!(!seg.present);
    }
}
