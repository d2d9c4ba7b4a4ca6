//! Device tests: the driver's side of the two queues built by hand in guest memory, FUSE
//! requests written byte by byte, the real worker thread and real host directories.

mod bench;
mod bulk;
mod client;
mod device;
mod malformed;
mod policy;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Fs, FsShareConfig, ServerOptions};
use crate::devices::virtio::testing::DriverQueue;
pub use crate::devices::virtio::testing::{TempDir, VIRTQ_DESC_F_NEXT};
use crate::devices::virtio::{ActiveQueue, Interrupt, VirtioDevice};

pub const MEM_SIZE: usize = 8 << 20;
/// Request bytes (header and arguments) are written here.
pub const REQ_BASE: u64 = 0x10_0000;
/// Replies are written here.
pub const REPLY_BASE: u64 = 0x30_0000;
/// Free for tests that lay out buffers themselves.
pub const RAW_BASE: u64 = 0x50_0000;

/// The high-priority queue and the request queue.
pub const HIPRIO: usize = 0;
pub const REQUEST: usize = 1;

/// A share of `root` with the given flags.
pub fn share_of(root: &Path, readonly: bool, denied: &[PathBuf]) -> FsShareConfig {
    FsShareConfig {
        tag: "mxcfs0".into(),
        host_path: root.to_path_buf(),
        guest_path: "/work".into(),
        readonly,
        denied: denied.to_vec(),
        root_allowlist: None,
        hidden_inodes: Vec::new(),
    }
}

/// A decoded reply.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Positive errno, 0 for success.
    pub errno: i32,
    pub unique: u64,
    /// The payload after the out header.
    pub body: Vec<u8>,
    /// Bytes the device said it wrote.
    pub used: u32,
}

/// The guest side of an activated fs device.
pub struct Guest {
    pub mem: GuestMemoryMmap,
    pub dev: Arc<Mutex<Fs>>,
    pub queues: [DriverQueue; 2],
    notify: Vec<EventFd>,
    irq: EventFd,
    pub irq_status: Arc<AtomicU32>,
    unique: u64,
    /// The caller credentials put in every request header.
    pub creds: (u32, u32),
}

impl Guest {
    pub fn new(share: &FsShareConfig) -> Self {
        Self::with_options(share, ServerOptions::default())
    }

    pub fn with_options(share: &FsShareConfig, options: ServerOptions) -> Self {
        Self::activate(Fs::with_options(share, options).unwrap())
    }

    pub fn activate(mut dev: Fs) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let queues = [DriverQueue::new(0), DriverQueue::new(1)];
        let notify: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let active = queues
            .iter()
            .zip(&notify)
            .map(|(q, n)| ActiveQueue {
                queue: q.device_queue(),
                notify: n.try_clone().unwrap(),
            })
            .collect();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq_status = Arc::new(AtomicU32::new(0));
        let interrupt = Arc::new(Interrupt::new(
            irq_status.clone(),
            Arc::new(irq.try_clone().unwrap()),
        ));
        dev.activate(mem.clone(), interrupt, active).unwrap();
        Self {
            mem,
            dev: Arc::new(Mutex::new(dev)),
            queues,
            notify,
            irq,
            irq_status,
            unique: 0,
            creds: (0, 0),
        }
    }

    pub fn next_unique(&mut self) -> u64 {
        self.unique += 1;
        self.unique
    }

    pub fn kick(&self, queue: usize) {
        self.notify[queue].write(1).unwrap();
    }

    /// Wait until the device returns a chain on `queue`: `(head, used length)`.
    pub fn wait_used(&mut self, queue: usize) -> (u32, u32) {
        self.try_wait_used(queue, Duration::from_secs(20))
            .expect("the device never returned the chain")
    }

    pub fn try_wait_used(&mut self, queue: usize, limit: Duration) -> Option<(u32, u32)> {
        let end = Instant::now() + limit;
        loop {
            if let Some(used) = self.queues[queue].pop_used(&self.mem) {
                return Some(used);
            }
            if Instant::now() >= end {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.irq),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one valid pollfd that lives across the call.
            unsafe { libc::poll(&mut pfd, 1, 20) };
            let _ = self.irq.read();
        }
    }

    /// Put a chain on `queue`, kick, wait: returns the used length.
    pub fn send_chain(&mut self, queue: usize, bufs: &[(u64, u32, bool)]) -> u32 {
        self.queues[queue].add_chain(&self.mem, bufs);
        self.kick(queue);
        self.wait_used(queue).1
    }

    /// A raw `fuse_in_header` (the guest may lie in `len`).
    pub fn header(len: u32, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
        Self::header_as(len, opcode, unique, nodeid, (0, 0))
    }

    pub fn header_as(
        len: u32,
        opcode: u32,
        unique: u64,
        nodeid: u64,
        creds: (u32, u32),
    ) -> Vec<u8> {
        let mut h = Vec::with_capacity(40);
        h.extend_from_slice(&len.to_le_bytes());
        h.extend_from_slice(&opcode.to_le_bytes());
        h.extend_from_slice(&unique.to_le_bytes());
        h.extend_from_slice(&nodeid.to_le_bytes());
        h.extend_from_slice(&creds.0.to_le_bytes()); // uid
        h.extend_from_slice(&creds.1.to_le_bytes()); // gid
        h.extend_from_slice(&1u32.to_le_bytes()); // pid
        h.extend_from_slice(&0u32.to_le_bytes()); // padding
        h
    }

    /// Send a request as the Linux driver lays it out: the header and the first argument in
    /// one readable descriptor, each further part in its own, then a reply header descriptor
    /// and (if `reply_room` > 16) one data descriptor.
    pub fn request_on(
        &mut self,
        queue: usize,
        opcode: u32,
        nodeid: u64,
        parts: &[&[u8]],
        reply_room: u32,
    ) -> Reply {
        let unique = self.next_unique();
        let bufs = lay_out_request(
            &self.mem, unique, self.creds, opcode, nodeid, parts, reply_room,
        );
        let used = self.send_chain(queue, &bufs);
        self.read_reply(used)
    }

    pub fn request(&mut self, opcode: u32, nodeid: u64, parts: &[&[u8]], reply_room: u32) -> Reply {
        self.request_on(REQUEST, opcode, nodeid, parts, reply_room)
    }

    /// Decode the reply at REPLY_BASE given the used length.
    pub fn read_reply(&self, used: u32) -> Reply {
        decode_reply(&self.mem, used)
    }

    pub fn usage(&self) -> (usize, usize) {
        self.dev.lock().unwrap().usage()
    }

    pub fn worker_alive(&self) -> bool {
        !self.dev.lock().unwrap().worker_finished()
    }
}

/// Decode the reply at REPLY_BASE given the used length.
pub fn decode_reply(mem: &GuestMemoryMmap, used: u32) -> Reply {
    if used < 16 {
        return Reply {
            errno: -1,
            unique: 0,
            body: Vec::new(),
            used,
        };
    }
    let mut bytes = vec![0u8; used as usize];
    mem.read_slice(&mut bytes, GuestAddress(REPLY_BASE))
        .unwrap();
    let len = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
    let error = i32::from_le_bytes(bytes[4..8].try_into().unwrap());
    let unique = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    assert_eq!(len, used, "out header len matches the used length");
    Reply {
        errno: -error,
        unique,
        body: bytes[16..].to_vec(),
        used,
    }
}

/// Write a request at REQ_BASE as the Linux driver lays it out (the header and the first
/// argument in one readable buffer, each further part in its own, then a reply header
/// buffer and, if `reply_room` > 16, one data buffer at REPLY_BASE) and return the chain's
/// buffers.
pub fn lay_out_request(
    mem: &GuestMemoryMmap,
    unique: u64,
    creds: (u32, u32),
    opcode: u32,
    nodeid: u64,
    parts: &[&[u8]],
    reply_room: u32,
) -> Vec<(u64, u32, bool)> {
    let len = 40 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut bufs = Vec::new();
    let mut first = Guest::header_as(len as u32, opcode, unique, nodeid, creds);
    let mut rest = parts.iter();
    if let Some(p) = rest.next() {
        first.extend_from_slice(p);
    }
    let mut at = REQ_BASE;
    mem.write_slice(&first, GuestAddress(at)).unwrap();
    bufs.push((at, first.len() as u32, false));
    at += first.len() as u64;
    for p in rest {
        mem.write_slice(p, GuestAddress(at)).unwrap();
        bufs.push((at, p.len() as u32, false));
        at += p.len() as u64;
    }
    if reply_room > 0 {
        bufs.push((REPLY_BASE, reply_room.min(16), true));
        if reply_room > 16 {
            bufs.push((REPLY_BASE + 16, reply_room - 16, true));
        }
    }
    // Stale bytes from an earlier reply must not pass for this one.
    mem.write_slice(&[0u8; 16], GuestAddress(REPLY_BASE))
        .unwrap();
    bufs
}

/// Whether the tests run as root (the CI machines do; some tests need it and say so).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A cheap checksum for round-trip tests (64-bit words, multiply-xor).
pub fn checksum(data: &[u8]) -> u64 {
    let mix = |h: u64, w: u64| (h ^ w).wrapping_mul(0x0100_0000_01b3).rotate_left(29);
    let mut chunks = data.chunks_exact(8);
    let mut h = chunks.by_ref().fold(0xcbf2_9ce4_8422_2325u64, |h, c| {
        mix(h, u64::from_le_bytes(c.try_into().unwrap()))
    });
    for b in chunks.remainder() {
        h = mix(h, u64::from(*b));
    }
    mix(h, data.len() as u64)
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
