//! The driver's side of a split virtqueue, built by hand in guest memory, for device
//! tests (vsock, fs): well-formed chains and malformed rings alike.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Entries of every test queue.
pub const QSIZE: u16 = 256;
/// Where the rings live: queue i at RING_BASE + i * RING_STRIDE.
const RING_BASE: u64 = 0x1000;
const RING_STRIDE: u64 = 0x4000;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

/// A fresh directory under the system temp dir (its canonical path), removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mxc-vmm-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(std::fs::canonicalize(dir).unwrap())
    }

    pub fn root(&self) -> &Path {
        &self.0
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One split virtqueue seen from the driver.
pub struct DriverQueue {
    desc: u64,
    avail: u64,
    used: u64,
    /// The descriptor `add_chain` writes next.
    pub next_desc: u16,
    /// The avail index as the driver last published it.
    pub avail_idx: u16,
    used_seen: u16,
    /// The buffers behind each outstanding head (`add_chain`).
    pub bufs: HashMap<u16, Vec<(u64, u32)>>,
}

impl DriverQueue {
    pub fn new(index: u64) -> Self {
        let base = RING_BASE + index * RING_STRIDE;
        Self {
            desc: base,
            avail: base + 16 * u64::from(QSIZE),
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            bufs: HashMap::new(),
        }
    }

    /// The device's view of this queue (addresses set, ready).
    pub fn device_queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Write descriptor `index` verbatim (any index, flags, next: malformed ones too).
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, at).unwrap();
    }

    /// Make `head` available (any value, out-of-range ones too).
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Set the avail index directly (to corrupt the ring).
    pub fn set_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.avail_idx = idx;
        mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// Add a well-formed chain of `(addr, len, device_writable)` buffers; returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, (addr, len, write)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QSIZE;
            let last = i + 1 == bufs.len();
            let flags = if *write { VIRTQ_DESC_F_WRITE } else { 0 }
                | if last { 0 } else { VIRTQ_DESC_F_NEXT };
            self.write_desc(mem, index, *addr, *len, flags, self.next_desc);
        }
        self.bufs
            .insert(head, bufs.iter().map(|(a, l, _)| (*a, *l)).collect());
        self.publish(mem, head);
        head
    }

    /// The next used element `(id, len)`, if the device returned one.
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.used_seen {
            return None;
        }
        let slot = u64::from(self.used_seen % QSIZE);
        let at = self.used + 4 + 8 * slot;
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id, len))
    }

    /// Used elements not yet popped.
    pub fn used_pending(&self, mem: &GuestMemoryMmap) -> u16 {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        idx.wrapping_sub(self.used_seen)
    }
}
