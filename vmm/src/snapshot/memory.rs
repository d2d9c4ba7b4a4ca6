//! Guest RAM in a snapshot: written with its zero pages left as holes, checksummed, and
//! mapped back copy-on-write.
//!
//! Reading the whole file for its checksum would dominate a restore, so it is done once
//! per version of the file: a restore that has checked it records the file's identity on
//! disk (device, inode, size, modification and change times) in [`VERIFIED_FILE`], and
//! later restores of the very same file skip the read. Any write, truncation, copy or
//! replacement changes that identity and the next restore checks the whole file again.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use vm_memory::mmap::MmapRegion;
use vm_memory::{
    FileOffset, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
};

use super::SnapshotError;
use crate::memory::{ram_ranges, GuestMemoryMmap};

/// Bytes copied, hashed and written at a time.
const CHUNK: usize = 4 << 20;
/// Zero runs shorter than this are written anyway (a hole is per page).
const PAGE: usize = 4096;

/// Write every region of `mem`, in order, to the new file `path` (0600). Returns its
/// length and CRC-32.
pub(super) fn write(path: &Path, mem: &GuestMemoryMmap) -> Result<(u64, u32), SnapshotError> {
    let io = |what| SnapshotError::io(what, path);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io("create"))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let mut done = 0usize;
        while done < len {
            let n = CHUNK.min(len - done);
            let chunk = buf.get_mut(..n).unwrap_or_default();
            let slice = region
                .get_slice(MemoryRegionAddress(done as u64), n)
                .map_err(|e| SnapshotError::Unsaveable(format!("reading guest memory: {e}")))?;
            slice.copy_to(chunk);
            hasher.update(chunk);
            write_nonzero_pages(&file, chunk, offset).map_err(io("write"))?;
            done += n;
            offset += n as u64;
        }
    }
    file.set_len(offset)
        .and_then(|()| file.sync_all())
        .map_err(io("write"))?;
    Ok((offset, hasher.finalize()))
}

/// Write the pages of `chunk` that are not all zeros, at `offset` on.
fn write_nonzero_pages(file: &File, chunk: &[u8], offset: u64) -> std::io::Result<()> {
    let mut run: Option<usize> = None;
    let pages = chunk.chunks(PAGE).enumerate();
    let count = chunk.len().div_ceil(PAGE);
    for (i, page) in pages.chain(std::iter::once((count, &[][..]))) {
        let zero = page.iter().all(|&b| b == 0);
        match (run, zero) {
            (None, false) => run = Some(i),
            (Some(start), true) => {
                let bytes = chunk.get(start * PAGE..(i * PAGE).min(chunk.len()));
                file.write_all_at(bytes.unwrap_or_default(), offset + (start * PAGE) as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The record of the last whole-file check of `memory`, beside it.
pub const VERIFIED_FILE: &str = "memory.verified";
/// A record is never larger than this.
const MAX_VERIFIED_FILE: u64 = 4096;
/// File times come from a coarse clock: a write within the same tick as the check
/// could leave them unchanged. A check is recorded only for a file this long unchanged.
const SETTLE_NS: i128 = 2_000_000_000;

/// The memory file on disk when its whole content last matched `crc32`.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Verified {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    crc32: u32,
}

impl Verified {
    pub(super) fn of(meta: &std::fs::Metadata, crc32: u32) -> Self {
        let ns = |secs: i64, nsecs: i64| i128::from(secs) * 1_000_000_000 + i128::from(nsecs);
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            crc32,
        }
    }
}

/// Check that the open memory `file` (`meta` its metadata, read from the open file)
/// holds what checksums to `crc32`: by the record of an earlier check of this very file
/// in `dir`, or else by reading it all (and recording that, if the file has been
/// unchanged for a while at `now_ns`). Returns whether the whole file was read.
pub(super) fn verify(
    dir: &Path,
    file: &File,
    path: &Path,
    meta: &std::fs::Metadata,
    crc32: u32,
    now_ns: i128,
) -> Result<bool, SnapshotError> {
    let record_path = dir.join(VERIFIED_FILE);
    let current = Verified::of(meta, crc32);
    if read_record(&record_path).as_ref() == Some(&current) {
        return Ok(false);
    }
    if checksum(file, path)? != crc32 {
        return Err(SnapshotError::Corrupt {
            path: path.to_path_buf(),
            why: "guest memory does not match its checksum".into(),
        });
    }
    if now_ns - current.ctime_ns.max(current.mtime_ns) >= SETTLE_NS {
        // Best effort: a restore from a read-only directory checks the whole file again.
        let _ = write_record(dir, &record_path, &current);
    }
    Ok(true)
}

/// The record in `path`, if there is one that is ours, private and well-formed (any
/// other is ignored: the whole file is checked instead).
fn read_record(path: &Path) -> Option<Verified> {
    let file = File::open(path).ok()?;
    let meta = file.metadata().ok()?;
    super::check_private(path, &meta).ok()?;
    let mut text = Vec::new();
    file.take(MAX_VERIFIED_FILE).read_to_end(&mut text).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Put `record` in `path` (0600), written under a temporary name and renamed.
fn write_record(dir: &Path, path: &Path, record: &Verified) -> Result<(), SnapshotError> {
    let text = serde_json::to_vec(record)
        .map_err(|e| SnapshotError::Unsaveable(format!("cannot encode the record: {e}")))?;
    let tmp = dir.join(format!(".{VERIFIED_FILE}.{}.tmp", std::process::id()));
    let result = super::write_private(&tmp, &text).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(SnapshotError::io("rename into place", path))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The CRC-32 of the whole of `file`.
pub(super) fn checksum(mut file: &File, path: &Path) -> Result<u32, SnapshotError> {
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(SnapshotError::io("read", path))?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(buf.get(..n).unwrap_or_default());
    }
}

/// Guest RAM of `mem_mib` MiB mapped copy-on-write from `file` (the layout `write`
/// produced for the same size). The guest's writes stay in this process.
pub fn map_memory(
    file: &File,
    path: &Path,
    mem_mib: u32,
) -> Result<GuestMemoryMmap, SnapshotError> {
    let ranges = ram_ranges(mem_mib);
    let total: u64 = ranges.iter().map(|(_, size)| *size as u64).sum();
    let len = file
        .metadata()
        .map_err(SnapshotError::io("read", path))?
        .len();
    // A mapping past the end of the file would fault the VMM when the guest touches it.
    if len != total {
        return Err(SnapshotError::Corrupt {
            path: path.to_path_buf(),
            why: format!("{len} bytes of memory for a {mem_mib} MiB guest"),
        });
    }
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for (addr, size) in ranges {
        let clone = file
            .try_clone()
            .map_err(SnapshotError::io("reopen", path))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(clone, offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| SnapshotError::Io {
            what: "map",
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        let region = GuestRegionMmap::new(mapping, addr).ok_or_else(|| SnapshotError::Corrupt {
            path: path.to_path_buf(),
            why: "a memory region past the end of the address space".into(),
        })?;
        regions.push(region);
        offset += size as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        why: format!("guest memory layout: {e}"),
    })
}
