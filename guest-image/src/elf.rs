//! Checks that a binary can run as a static program in the guest: an x86-64 ELF
//! executable without a program interpreter (`PT_INTERP`), since the guest has no
//! dynamic loader or shared libraries of its own.

use thiserror::Error;

const PT_INTERP: u32 = 3;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;

/// Why a binary is not a static x86-64 executable.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ElfError {
    /// Not a 64-bit little-endian x86-64 ELF executable (or truncated).
    #[error("not an x86-64 ELF executable")]
    NotExecutable,
    /// It names a program interpreter: it is dynamically linked.
    #[error("dynamically linked (it has an ELF program interpreter)")]
    Dynamic,
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    let raw = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([raw[0], raw[1]]))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let raw = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    let raw = bytes.get(at..at.checked_add(8)?)?;
    let mut word = [0u8; 8];
    word.copy_from_slice(raw);
    Some(u64::from_le_bytes(word))
}

/// Accepts a static x86-64 executable (static or static-pie); rejects anything else.
pub fn check_static_x86_64(bytes: &[u8]) -> Result<(), ElfError> {
    let header_ok = bytes.get(..6) == Some(b"\x7fELF\x02\x01".as_slice());
    let e_type = u16_at(bytes, 16).ok_or(ElfError::NotExecutable)?;
    let e_machine = u16_at(bytes, 18).ok_or(ElfError::NotExecutable)?;
    if !header_ok || !(e_type == ET_EXEC || e_type == ET_DYN) || e_machine != EM_X86_64 {
        return Err(ElfError::NotExecutable);
    }
    let phoff = u64_at(bytes, 32).ok_or(ElfError::NotExecutable)?;
    let phentsize = u16_at(bytes, 54).ok_or(ElfError::NotExecutable)?;
    let phnum = u16_at(bytes, 56).ok_or(ElfError::NotExecutable)?;
    let phoff = usize::try_from(phoff).map_err(|_| ElfError::NotExecutable)?;
    if phnum == 0 || phentsize < 56 {
        return Err(ElfError::NotExecutable);
    }
    for index in 0..usize::from(phnum) {
        let at = index
            .checked_mul(usize::from(phentsize))
            .and_then(|off| off.checked_add(phoff))
            .ok_or(ElfError::NotExecutable)?;
        match u32_at(bytes, at) {
            Some(PT_INTERP) => return Err(ElfError::Dynamic),
            Some(_) => {}
            None => return Err(ElfError::NotExecutable),
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 header with `types` as its program header types.
    pub(crate) fn fake_elf(e_type: u16, types: &[u32]) -> Vec<u8> {
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[16..18].copy_from_slice(&e_type.to_le_bytes());
        elf[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for p_type in types {
            let mut phdr = vec![0u8; 56];
            phdr[..4].copy_from_slice(&p_type.to_le_bytes());
            elf.extend_from_slice(&phdr);
        }
        elf
    }

    #[test]
    fn static_executable_is_accepted() {
        let elf = fake_elf(ET_EXEC, &[1, 1, 4]);

        let result = check_static_x86_64(&elf);

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn static_pie_is_accepted() {
        let elf = fake_elf(ET_DYN, &[1, 2, 1]);

        let result = check_static_x86_64(&elf);

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn interpreter_means_dynamic() {
        let elf = fake_elf(ET_DYN, &[6, PT_INTERP, 1]);

        let result = check_static_x86_64(&elf);

        assert_eq!(result, Err(ElfError::Dynamic));
    }

    #[test]
    fn script_is_not_an_executable() {
        let result = check_static_x86_64(b"#!/bin/sh\necho hi\n");

        assert_eq!(result, Err(ElfError::NotExecutable));
    }

    #[test]
    fn truncated_program_headers_are_rejected() {
        let mut elf = fake_elf(ET_EXEC, &[1, 1]);
        elf.truncate(64 + 56 + 2);

        let result = check_static_x86_64(&elf);

        assert_eq!(result, Err(ElfError::NotExecutable));
    }

    #[test]
    fn program_header_offset_overflow_is_rejected() {
        let mut elf = fake_elf(ET_EXEC, &[1]);
        elf[32..40].copy_from_slice(&u64::MAX.to_le_bytes());

        let result = check_static_x86_64(&elf);

        assert_eq!(result, Err(ElfError::NotExecutable));
    }

    #[test]
    fn host_busybox_is_static() {
        let bytes = std::fs::read("/bin/busybox").unwrap_or_default();

        let result = check_static_x86_64(&bytes);

        assert_eq!(result, Ok(()), "Debian's busybox-static must be installed");
    }
}
