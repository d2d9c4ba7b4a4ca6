//! An ELF `vmlinux` loader: validates the headers, places each PT_LOAD segment at its
//! physical address (mapped from the file where possible, see `image.rs`) and finds the
//! PVH entry point in the Xen ELF notes. The ELF structures are linux-loader's.

use std::fs::File;
use std::os::unix::fs::FileExt;

use linux_loader::elf::{Elf64_Ehdr, Elf64_Nhdr, Elf64_Phdr};
use vm_memory::ByteValued;

use super::image::{self, ImageError};
use crate::layout::HIGH_RAM_START;
use crate::memory::GuestMemoryMmap;

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// Xen ELF note carrying the 32-bit PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Most program headers accepted.
const MAX_PHDRS: u16 = 64;
/// Most bytes of notes scanned per PT_NOTE segment.
const MAX_NOTES_LEN: u64 = 64 << 10;

/// Why an ELF image was refused.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("not a 64-bit little-endian x86-64 ELF executable")]
    NotX86_64,
    #[error("cannot read the ELF headers")]
    Read(#[source] std::io::Error),
    #[error("bad program headers ({0})")]
    ProgramHeaders(&'static str),
    #[error("segment at {addr:#x} ({len:#x} bytes) is below 1 MiB or wraps")]
    SegmentAddress { addr: u64, len: u64 },
    #[error("entry point {0:#x} is below 1 MiB")]
    Entry(u64),
    #[error("cannot place a segment in guest memory")]
    Place(#[from] ImageError),
}

/// A loaded ELF kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElfKernel {
    /// `e_entry` (the 64-bit entry's physical address for a vmlinux).
    pub entry: u64,
    /// The PVH entry point, if the image has one.
    pub pvh_entry: Option<u64>,
    /// End of the highest segment (including its zero-filled part).
    pub end: u64,
}

/// Whether `file` starts with the ELF magic.
pub fn is_elf(file: &File) -> bool {
    let mut magic = [0u8; 4];
    file.read_exact_at(&mut magic, 0).is_ok() && magic == ELF_MAGIC
}

fn read_obj<T: ByteValued + Default>(file: &File, offset: u64) -> Result<T, ElfError> {
    let mut obj = T::default();
    file.read_exact_at(obj.as_mut_slice(), offset)
        .map_err(ElfError::Read)?;
    Ok(obj)
}

/// Load the ELF kernel in `file` into `mem`.
pub fn load(mem: &GuestMemoryMmap, file: &File) -> Result<ElfKernel, ElfError> {
    let ehdr: Elf64_Ehdr = read_obj(file, 0)?;
    let ident = ehdr.e_ident;
    if ident.get(..4) != Some(&ELF_MAGIC[..])
        || ident.get(4) != Some(&ELFCLASS64)
        || ident.get(5) != Some(&ELFDATA2LSB)
        || ehdr.e_machine != EM_X86_64
    {
        return Err(ElfError::NotX86_64);
    }
    if usize::from(ehdr.e_phentsize) != std::mem::size_of::<Elf64_Phdr>() {
        return Err(ElfError::ProgramHeaders("entry size"));
    }
    if ehdr.e_phnum == 0 || ehdr.e_phnum > MAX_PHDRS {
        return Err(ElfError::ProgramHeaders("count"));
    }
    if ehdr.e_entry < HIGH_RAM_START {
        return Err(ElfError::Entry(ehdr.e_entry));
    }
    let mut phdrs = Vec::with_capacity(usize::from(ehdr.e_phnum));
    for i in 0..u64::from(ehdr.e_phnum) {
        let offset = ehdr
            .e_phoff
            .checked_add(i * std::mem::size_of::<Elf64_Phdr>() as u64)
            .ok_or(ElfError::ProgramHeaders("offset"))?;
        phdrs.push(read_obj::<Elf64_Phdr>(file, offset)?);
    }

    let mut end = 0u64;
    let mut pvh_entry = None;
    for phdr in &phdrs {
        match phdr.p_type {
            PT_LOAD => {
                if phdr.p_filesz > phdr.p_memsz {
                    return Err(ElfError::ProgramHeaders("file size above memory size"));
                }
                let seg_end = phdr.p_paddr.checked_add(phdr.p_memsz);
                let Some(seg_end) = seg_end.filter(|_| phdr.p_paddr >= HIGH_RAM_START) else {
                    return Err(ElfError::SegmentAddress {
                        addr: phdr.p_paddr,
                        len: phdr.p_memsz,
                    });
                };
                if !crate::memory::contains_range(mem, phdr.p_paddr, phdr.p_memsz as usize) {
                    return Err(ImageError::OutsideRam {
                        addr: phdr.p_paddr,
                        len: phdr.p_memsz,
                    }
                    .into());
                }
                image::place(mem, file, phdr.p_offset, phdr.p_paddr, phdr.p_filesz)?;
                end = end.max(seg_end);
            }
            PT_NOTE if pvh_entry.is_none() => pvh_entry = find_pvh_entry(file, phdr)?,
            _ => {}
        }
    }
    Ok(ElfKernel {
        entry: ehdr.e_entry,
        pvh_entry,
        end,
    })
}

/// Scan one PT_NOTE segment for the Xen PVH entry note.
fn find_pvh_entry(file: &File, phdr: &Elf64_Phdr) -> Result<Option<u64>, ElfError> {
    let len = phdr.p_filesz.min(MAX_NOTES_LEN);
    let mut pos = 0u64;
    let header = std::mem::size_of::<Elf64_Nhdr>() as u64;
    while pos + header <= len {
        let at = phdr
            .p_offset
            .checked_add(pos)
            .ok_or(ElfError::ProgramHeaders("note offset"))?;
        let nhdr: Elf64_Nhdr = read_obj(file, at)?;
        let name_len = u64::from(nhdr.n_namesz).next_multiple_of(4);
        let desc_len = u64::from(nhdr.n_descsz).next_multiple_of(4);
        if nhdr.n_type == XEN_ELFNOTE_PHYS32_ENTRY && nhdr.n_namesz == 4 && nhdr.n_descsz >= 4 {
            let mut name = [0u8; 4];
            file.read_exact_at(&mut name, at + header)
                .map_err(ElfError::Read)?;
            if &name == b"Xen\0" {
                let mut desc = [0u8; 4];
                file.read_exact_at(&mut desc, at + header + name_len)
                    .map_err(ElfError::Read)?;
                return Ok(Some(u64::from(u32::from_le_bytes(desc))));
            }
        }
        pos = pos
            .checked_add(header + name_len + desc_len)
            .ok_or(ElfError::ProgramHeaders("note size"))?;
    }
    Ok(None)
}
