//! Fuzz the virtio-fs server through its policy filter: FUSE requests from a hostile guest
//! over the device's two queues, served by the worker's code path (`queue_handler`, the
//! protocol checks, `PolicyFs` over fuse-backend-rs's passthrough) on a real directory
//! with a denied file, a hard link to it and a denied file in a subdirectory.
//!
//! Input: one knob byte (bit 0: a read-only share; bit 1: no INIT first), then requests,
//! each `flags:u8 len:u16le` and `len` bytes starting with a `fuse_in_header`. The flags
//! pick the reply room, the queue, a split of the request over two descriptors, whether
//! the header's `len` is left as the input says, and whether the node id and the first
//! argument (a file handle for most opcodes) are replaced by ones the server handed out
//! earlier in this input (selected by the low byte of `unique`).
//!
//! `MXC_FUZZ_TRACE=1` prints each request's opcode, used length and error.
//!
//! Checks: no panic; the server writes guest memory only in the reply buffers and the
//! used rings; and the denied file's content (random bytes, new in every process, so the
//! input cannot hold them) never appears in anything the server writes.
#![no_main]

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::fs::FsShareConfig;
use vmm::fuzzing::FsServer;

const MEM_SIZE: usize = 1 << 20;
const QSIZE: u16 = 16;
/// Queue i's rings: descriptors at RINGS[i], avail ring 0x400 above, used ring 0x800 above.
const RINGS: [u64; 2] = [0x0000, 0x1000];
const REQ_BASE: u64 = 0x1_0000;
const REPLY_BASE: u64 = 0x4_0000;
const ROOMS: [u32; 8] = [0, 15, 16, 40, 144, 4096, 0x1_0000, 0xb_ffff];
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const SECRET_WINDOW: usize = 8;

/// The denied file's content: random, drawn once per process, and the keyed hashes of
/// its windows. The check compares hashes only, so the fuzzer's comparison tracing never
/// sees the secret bytes (it could otherwise write them into a file and read them back).
struct Secret {
    bytes: Vec<u8>,
    hasher: RandomState,
    windows: HashSet<u64>,
}

fn secret() -> &'static Secret {
    static SECRET: OnceLock<Secret> = OnceLock::new();
    SECRET.get_or_init(|| {
        let mut bytes = vec![0u8; 256];
        let got = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
        got.expect("random bytes for the secret");
        let hasher = RandomState::new();
        let windows = bytes
            .windows(SECRET_WINDOW)
            .map(|w| hasher.hash_one(w))
            .collect();
        Secret {
            bytes,
            hasher,
            windows,
        }
    })
}

/// A fresh share for one input, removed on drop.
struct Share(PathBuf);

impl Share {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("mxc-fuzz-fs-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let secret = &secret().bytes;
        std::fs::create_dir_all(root.join("d")).expect("share directory");
        std::fs::write(root.join("f"), b"public bytes of f\n").expect("f");
        std::fs::write(root.join("d/g"), b"public bytes of g\n").expect("g");
        std::fs::write(root.join("secret"), secret).expect("secret");
        std::fs::write(root.join("d/secret2"), secret).expect("secret2");
        std::fs::hard_link(root.join("secret"), root.join("hard")).expect("hard link");
        std::os::unix::fs::symlink("secret", root.join("link")).expect("symlink");
        Self(std::fs::canonicalize(root).expect("canonical root"))
    }

    fn config(&self, readonly: bool) -> FsShareConfig {
        FsShareConfig {
            tag: "mxcfs0".into(),
            host_path: self.0.clone(),
            guest_path: "/work".into(),
            readonly,
            denied: vec![self.0.join("secret"), self.0.join("d/secret2")],
            root_allowlist: None,
            hidden_inodes: Vec::new(),
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn queue(base: u64) -> Queue {
    let mut q = Queue::new(QSIZE).expect("queue");
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some((base + 0x400) as u32), Some(0));
    q.set_used_ring_address(Some((base + 0x800) as u32), Some(0));
    q.set_ready(true);
    q
}

/// The driver's side of one queue.
struct Driver {
    base: u64,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    fn submit(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) {
        for (i, (addr, len, write)) in bufs.iter().enumerate() {
            let mut flags = if *write { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
            mem.write_slice(&raw, GuestAddress(self.base + 16 * i as u64))
                .expect("descriptor table");
        }
        let slot = u64::from(self.avail_idx % QSIZE);
        mem.write_obj(0u16, GuestAddress(self.base + 0x400 + 4 + 2 * slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.base + 0x400 + 2))
            .expect("avail ring");
    }

    /// The used length of the chain the device returned, if it returned one.
    fn used(&mut self, mem: &GuestMemoryMmap) -> Option<u32> {
        let idx: u16 = mem.read_obj(GuestAddress(self.base + 0x800 + 2)).ok()?;
        if idx == self.used_seen {
            return None;
        }
        let slot = u64::from(self.used_seen % QSIZE);
        self.used_seen = self.used_seen.wrapping_add(1);
        let at = self.base + 0x800 + 4 + 8 * slot;
        let id: u32 = mem.read_obj(GuestAddress(at)).ok()?;
        assert_eq!(id, 0, "the device returned a head it was not given");
        mem.read_obj(GuestAddress(at + 4)).ok()
    }
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut out = vec![0u8; MEM_SIZE];
    mem.read_slice(&mut out, GuestAddress(0))
        .expect("inside memory");
    out
}

/// Whether the server may write byte `i`: the reply buffers and the used rings.
fn allowed(i: usize, room: u32) -> bool {
    let i = i as u64;
    let in_used = RINGS
        .iter()
        .any(|b| (b + 0x800..b + 0x800 + 6 + 8 * u64::from(QSIZE)).contains(&i));
    in_used || (REPLY_BASE..REPLY_BASE + u64::from(room)).contains(&i)
}

/// Checks what changed between `before` and `after`: only allowed bytes, and no run of
/// the secret's bytes. Pages are compared whole first (a byte loop over all of memory,
/// with the fuzzer's comparison tracing, would be most of the time spent).
fn check_writes(before: &[u8], after: &[u8], room: u32) {
    const PAGE: usize = 4096;
    for (p, (b, a)) in before.chunks(PAGE).zip(after.chunks(PAGE)).enumerate() {
        if a != b {
            check_page(
                before,
                after,
                p * PAGE,
                (p * PAGE + PAGE).min(after.len()),
                room,
            );
        }
    }
}

fn check_page(before: &[u8], after: &[u8], from: usize, to: usize, room: u32) {
    let secret = secret();
    let mut i = from;
    while i < to {
        if before[i] == after[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < after.len() && before[i] != after[i] {
            assert!(allowed(i, room), "the server wrote guest memory at {i:#x}");
            i += 1;
        }
        let from = start.saturating_sub(SECRET_WINDOW - 1);
        let to = (i + SECRET_WINDOW - 1).min(after.len());
        for w in after[from..to].windows(SECRET_WINDOW) {
            assert!(
                !secret.windows.contains(&secret.hasher.hash_one(w)),
                "a reply holds bytes of the denied file at {from:#x}..{to:#x}"
            );
        }
    }
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn init_request() -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&56u32.to_le_bytes());
    r.extend_from_slice(&26u32.to_le_bytes()); // INIT
    r.extend_from_slice(&0u64.to_le_bytes());
    r.extend_from_slice(&0u64.to_le_bytes());
    r.extend_from_slice(&[0u8; 16]);
    r.extend_from_slice(&7u32.to_le_bytes());
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&(1u32 << 17).to_le_bytes());
    r.extend_from_slice(&0x0041_2021u32.to_le_bytes());
    r
}

struct Session {
    mem: GuestMemoryMmap,
    server: FsServer,
    drivers: [Driver; 2],
    nodes: Vec<u64>,
    handles: Vec<u64>,
}

impl Session {
    fn send(&mut self, flags: u8, mut req: Vec<u8>) {
        let room = ROOMS[usize::from(flags & 7)];
        let q = usize::from(flags >> 7);
        let select = usize::from(req.get(8).copied().unwrap_or(0));
        let total = req.len() as u32;
        if flags & 0x08 == 0 {
            if let Some(len) = req.get_mut(..4) {
                len.copy_from_slice(&total.to_le_bytes());
            }
        }
        if flags & 0x10 != 0 {
            let node = self.nodes[select % self.nodes.len()];
            if let Some(dst) = req.get_mut(16..24) {
                dst.copy_from_slice(&node.to_le_bytes());
            }
        }
        if flags & 0x20 != 0 && !self.handles.is_empty() {
            let fh = self.handles[select % self.handles.len()];
            if let Some(dst) = req.get_mut(40..48) {
                dst.copy_from_slice(&fh.to_le_bytes());
            }
        }
        let opcode = req
            .get(4..8)
            .map_or(0, |o| u32::from_le_bytes(o.try_into().unwrap_or([0; 4])));
        self.mem
            .write_slice(&req, GuestAddress(REQ_BASE))
            .expect("request area");
        let mut bufs = Vec::new();
        let len = req.len() as u32;
        if flags & 0x40 != 0 {
            let half = len / 2;
            bufs.push((REQ_BASE, half, false));
            bufs.push((REQ_BASE + u64::from(half), len - half, false));
        } else {
            bufs.push((REQ_BASE, len, false));
        }
        if room > 0 {
            bufs.push((REPLY_BASE, room.min(16), true));
            if room > 16 {
                bufs.push((REPLY_BASE + 16, room - 16, true));
            }
        }
        self.drivers[q].submit(&self.mem, &bufs);
        let before = snapshot(&self.mem);
        self.server.process_queue(q);
        let after = snapshot(&self.mem);
        check_writes(&before, &after, room);
        let used = self.drivers[q].used(&self.mem);
        assert!(used.is_some(), "the server kept a chain");
        let used = used.unwrap_or(0);
        assert!(
            used <= room,
            "the server says it wrote more than the chain holds"
        );
        if std::env::var_os("MXC_FUZZ_TRACE").is_some() {
            let errno = after
                .get(REPLY_BASE as usize + 4..REPLY_BASE as usize + 8)
                .map_or(0, |e| i32::from_le_bytes(e.try_into().unwrap_or([0; 4])));
            eprintln!("opcode {opcode} on queue {q}: used {used}, error {errno}");
        }
        self.learn(opcode, &after, used);
    }

    /// Remember the node ids and handles a successful reply hands out.
    fn learn(&mut self, opcode: u32, mem: &[u8], used: u32) {
        let start = REPLY_BASE as usize;
        let Some(reply) = mem.get(start..start + used as usize) else {
            return;
        };
        if reply.len() < 16 || reply[4..8] != [0; 4] {
            return;
        }
        let body = &reply[16..];
        let (node, fh) = match opcode {
            1 | 6 | 8 | 9 | 13 => (u64_at(body, 0), None),
            35 => (u64_at(body, 0), u64_at(body, 128)),
            14 | 27 => (None, u64_at(body, 0)),
            _ => (None, None),
        };
        if let Some(n) = node.filter(|_| self.nodes.len() < 32) {
            self.nodes.push(n);
        }
        if let Some(h) = fh.filter(|_| self.handles.len() < 32) {
            self.handles.push(h);
        }
    }
}

fn run(knob: u8, mut input: &[u8], share: &Share) {
    let config = share.config(knob & 1 != 0);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory");
    let queues = RINGS.map(queue);
    let server = FsServer::new(&config, 1 << 20, &mem, &queues).expect("the share is served");
    let mut session = Session {
        mem,
        server,
        drivers: RINGS.map(|base| Driver {
            base,
            avail_idx: 0,
            used_seen: 0,
        }),
        nodes: vec![1],
        handles: Vec::new(),
    };
    if knob & 2 == 0 {
        session.send(5, init_request());
    }
    while let Some((head, rest)) = input.split_at_checked(3) {
        let len = usize::from(u16::from_le_bytes([head[1], head[2]]));
        let take = len.min(rest.len());
        session.send(head[0], rest[..take].to_vec());
        input = &rest[take..];
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&knob, input)) = data.split_first() else {
        return;
    };
    let share = Share::new();
    run(knob, input, &share);
});
