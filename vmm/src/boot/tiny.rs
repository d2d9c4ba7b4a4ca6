//! Tiny hand-made guest kernels for tests and examples: a minimal ELF64 executable that
//! loads a few bytes of code at [`LOAD_ADDR`], entered through PVH (32-bit protected
//! mode) or the 64-bit boot protocol. The code given must be valid in the mode used.

/// Where the code is loaded and entered.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// `body` followed by `hlt; jmp back to hlt`: valid in 32-bit and 64-bit mode.
pub fn program(body: &[u8]) -> Vec<u8> {
    let mut code = body.to_vec();
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
    code
}

/// A guest that executes `ud2` with no IDT: #UD, #GP, #DF, then a triple fault.
pub fn triple_fault() -> Vec<u8> {
    program(&[0x0f, 0x0b])
}

/// A minimal ELF64 executable loading `code` at [`LOAD_ADDR`], with a Xen PVH entry
/// note when `pvh` is set, laid out as a Linux vmlinux has it (a 64-bit descriptor,
/// 4-byte note alignment), so that QEMU boots it too.
pub fn elf_kernel(code: &[u8], pvh: bool) -> Vec<u8> {
    let phnum: u16 = if pvh { 2 } else { 1 };
    let phoff = 64u64;
    let note_off = phoff + 56 * u64::from(phnum);
    let note: Vec<u8> = if pvh {
        let mut n = Vec::new();
        n.extend_from_slice(&4u32.to_le_bytes()); // namesz
        n.extend_from_slice(&8u32.to_le_bytes()); // descsz
        n.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        n.extend_from_slice(b"Xen\0");
        n.extend_from_slice(&LOAD_ADDR.to_le_bytes());
        n
    } else {
        Vec::new()
    };
    let code_off = (note_off + note.len() as u64).next_multiple_of(16);

    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    elf.extend_from_slice(&phoff.to_le_bytes());
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, phnum, 64, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    let mut phdr = |p_type: u32, offset: u64, addr: u64, size: u64, align: u64| {
        elf.extend_from_slice(&p_type.to_le_bytes());
        elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
        for v in [offset, addr, addr, size, size, align] {
            elf.extend_from_slice(&v.to_le_bytes());
        }
    };
    phdr(1, code_off, LOAD_ADDR, code.len() as u64, 0x1000);
    if pvh {
        phdr(4, note_off, 0, note.len() as u64, 4);
    }
    elf.extend_from_slice(&note);
    elf.resize(code_off as usize, 0);
    elf.extend_from_slice(code);
    elf
}
