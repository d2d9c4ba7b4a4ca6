//! Putting file contents into guest memory without copying: whole pages are mapped
//! copy-on-write from the file (`MAP_PRIVATE | MAP_FIXED` over the guest RAM mapping);
//! only partial pages at the edges are read. Kernel and initrd pages then cost nothing
//! until the guest touches them, and the host page cache holds one copy for all VMs.
//!
//! The file must stay unchanged while the VM runs (its pages are shared until the guest
//! writes them): image files are written once and replaced by rename, never in place.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::memory::GuestMemoryMmap;

const PAGE: u64 = 4096;

/// Errors placing file contents in guest memory.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{len:#x} bytes at guest address {addr:#x} are not inside one guest RAM region")]
    OutsideRam { addr: u64, len: u64 },
    #[error("cannot read {len:#x} bytes at file offset {offset:#x}")]
    Read {
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}

/// The host address of `addr..addr+len`, which must lie in one RAM region.
fn host_range(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Result<*mut u8, ImageError> {
    let outside = || ImageError::OutsideRam { addr, len };
    let region = mem.find_region(GuestAddress(addr)).ok_or_else(outside)?;
    let offset = addr - region.start_addr().0;
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(outside());
    }
    region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|_| outside())
}

/// Copy `len` bytes at file `offset` to `host`.
///
/// # Safety
/// `host..host+len` must be inside a live guest RAM mapping.
unsafe fn copy(file: &File, offset: u64, host: *mut u8, len: u64) -> Result<(), ImageError> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: the caller guarantees the range is mapped guest RAM; nothing else holds a
    // Rust reference into guest memory while the kernel is being loaded.
    let dst = unsafe { std::slice::from_raw_parts_mut(host, len as usize) };
    file.read_exact_at(dst, offset)
        .map_err(|source| ImageError::Read {
            offset,
            len,
            source,
        })
}

/// Map whole pages of `file` at `host`; false if the kernel refused.
///
/// # Safety
/// `host..host+len` must be page-aligned and inside a live guest RAM mapping.
unsafe fn map(file: &File, offset: u64, host: *mut u8, len: u64) -> bool {
    let Ok(file_offset) = libc::off_t::try_from(offset) else {
        return false;
    };
    // SAFETY: the range lies inside guest RAM owned by `GuestMemoryMmap` (caller), so
    // MAP_FIXED only replaces pages of that mapping; no Rust reference points into it.
    let mapped = unsafe {
        libc::mmap(
            host.cast(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            file.as_raw_fd(),
            file_offset,
        )
    };
    mapped == host.cast()
}

/// Put `len` bytes of `file` from `offset` at guest address `addr`. Bytes of guest RAM
/// outside that range are left as they are (zero in fresh memory).
pub fn place(
    mem: &GuestMemoryMmap,
    file: &File,
    offset: u64,
    addr: u64,
    len: u64,
) -> Result<(), ImageError> {
    let host = host_range(mem, addr, len)?;
    // Mapping pages past the end of the file would fault later: check up front.
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(ImageError::Read {
            offset,
            len,
            source: std::io::ErrorKind::UnexpectedEof.into(),
        });
    }
    let host_addr = host as u64;
    if (host_addr % PAGE) != (offset % PAGE) {
        // SAFETY: `host_range` checked the whole range is guest RAM.
        return unsafe { copy(file, offset, host, len) };
    }
    let head = ((PAGE - host_addr % PAGE) % PAGE).min(len);
    let body = (len - head) / PAGE * PAGE;
    let tail = len - head - body;
    // SAFETY: all three parts are sub-ranges of the checked guest RAM range; the body is
    // page-aligned because host and file offset are congruent modulo the page size.
    unsafe {
        copy(file, offset, host, head)?;
        let body_host = host.add(head as usize);
        if body > 0 && !map(file, offset + head, body_host, body) {
            copy(file, offset + head, body_host, body)?;
        }
        copy(
            file,
            offset + head + body,
            host.add((head + body) as usize),
            tail,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use std::io::Write;
    use vm_memory::Bytes;

    fn temp_file(name: &str, bytes: &[u8]) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("mxc-image-{name}-{}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        (path.clone(), File::open(&path).unwrap())
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn congruent_ranges_are_mapped_and_edges_copied() {
        let data = pattern(5 * 4096);
        let (path, file) = temp_file("congruent", &data);
        let mem = create_guest_memory(16).unwrap();

        place(&mem, &file, 0x800, 0x10_0800, 3 * 4096 + 0x10).unwrap();
        std::fs::remove_file(path).unwrap();

        let mut got = vec![0u8; 3 * 4096 + 0x10];
        mem.read_slice(&mut got, GuestAddress(0x10_0800)).unwrap();
        let after: u8 = mem
            .read_obj(GuestAddress(0x10_0800 + 3 * 4096 + 0x10))
            .unwrap();
        let before: u8 = mem.read_obj(GuestAddress(0x10_07ff)).unwrap();
        assert_eq!(got, data[0x800..0x800 + 3 * 4096 + 0x10]);
        assert_eq!((before, after), (0, 0), "bytes around the range stay zero");
    }

    #[test]
    fn mapped_pages_are_private_to_the_guest() {
        let data = pattern(2 * 4096);
        let (path, file) = temp_file("private", &data);
        let mem = create_guest_memory(16).unwrap();

        place(&mem, &file, 0, 0x20_0000, 2 * 4096).unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x20_0000)).unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        std::fs::remove_file(path).unwrap();

        assert_eq!(on_disk, data);
    }

    #[test]
    fn misaligned_ranges_are_copied() {
        let data = pattern(3 * 4096);
        let (path, file) = temp_file("misaligned", &data);
        let mem = create_guest_memory(16).unwrap();

        place(&mem, &file, 0x123, 0x30_0000, 2 * 4096).unwrap();
        std::fs::remove_file(path).unwrap();

        let mut got = vec![0u8; 2 * 4096];
        mem.read_slice(&mut got, GuestAddress(0x30_0000)).unwrap();
        assert_eq!(got, data[0x123..0x123 + 2 * 4096]);
    }

    #[test]
    fn ranges_outside_ram_or_past_the_file_are_errors() {
        let (path, file) = temp_file("short", &pattern(4096));
        let mem = create_guest_memory(16).unwrap();

        let outside = place(&mem, &file, 0, (16 << 20) - 8, 16);
        let past_eof = place(&mem, &file, 0, 0x40_0000, 3 * 4096 + 1);
        std::fs::remove_file(path).unwrap();

        assert!(matches!(outside, Err(ImageError::OutsideRam { .. })));
        assert!(matches!(past_eof, Err(ImageError::Read { .. })));
    }
}
