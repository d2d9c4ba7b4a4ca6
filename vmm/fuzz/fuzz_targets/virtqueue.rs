//! Fuzz the virtqueue walk of the devices: split queues with arbitrary ring contents
//! (descriptor tables, avail rings, indexes, indirect tables, loops), the queue positions
//! a restored VM starts from, and a guest that rewrites memory between kicks. Either the
//! vsock device's tx and rx work (`pop_chain`, the chain parsers, `add_used`) runs against
//! a backend that echoes what it gets, or (bit 7 of the last set-up byte) the fs device's
//! worker serves its two queues (`pop_chain`, `take_request`, the FUSE server) over a
//! read-only share.
//!
//! Input: 16 bytes of queue set-up (size and positions of each queue, knobs), then up to
//! three patches the guest applies between rounds (`offset:u16 len:u8 bytes`), then the
//! bytes that fill guest memory. Nothing may panic, and the device may write guest memory
//! only in its used rings and in device-writable buffers of the queues it answers on.
#![no_main]

use std::collections::{HashSet, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::fs::FsShareConfig;
use vmm::devices::virtio::{ActiveQueue, Interrupt, VirtioDevice};
use vmm::devices::vsock::packet::{HDR_SIZE, HOST_CID, OP_RW, TYPE_STREAM};
use vmm::devices::vsock::{PacketHeader, Vsock, VsockBackend};
use vmm::fuzzing::{vsock_process_rx, vsock_process_tx, FsServer};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: usize = 0x1_0000;
const CID: u64 = 3;
/// Queue i's rings: descriptors at BASE[i], the avail ring 0x100 above, the used ring
/// 0x200 above (close together, so that small inputs fill them; the tables of large queues
/// overlap the next queue's rings, which a hostile driver may do anyway).
const BASE: [u64; 3] = [0x000, 0x400, 0x800];
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// A backend that checks what the device hands it and echoes RW payloads back.
struct Echo {
    fd: EventFd,
    pending: VecDeque<(PacketHeader, Vec<u8>)>,
}

impl AsRawFd for Echo {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl VsockBackend for Echo {
    fn send_pkt(&mut self, hdr: &PacketHeader, data: &[u8]) {
        assert_eq!(
            (hdr.src_cid, hdr.dst_cid, hdr.type_),
            (CID, HOST_CID, TYPE_STREAM)
        );
        assert_eq!(
            data.len(),
            if hdr.op == OP_RW { hdr.len as usize } else { 0 }
        );
        if self.pending.len() < 64 {
            let reply = PacketHeader {
                src_cid: HOST_CID,
                dst_cid: CID,
                src_port: hdr.dst_port,
                dst_port: hdr.src_port,
                ..*hdr
            };
            self.pending.push_back((reply, data.to_vec()));
        }
    }

    fn reset_peer(&mut self, hdr: &PacketHeader) {
        if self.pending.len() < 64 {
            self.pending.push_back((hdr.rst_reply(), Vec::new()));
        }
    }

    fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<PacketHeader> {
        let (mut hdr, data) = self.pending.pop_front()?;
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        hdr.len = n as u32;
        Some(hdr)
    }

    fn has_pending_rx(&self) -> bool {
        !self.pending.is_empty()
    }

    fn process_events(&mut self) {}
}

fn queue(i: usize, setup: &[u8]) -> Queue {
    let raw_size = setup[0];
    // Mostly small power-of-two sizes (a full ring of 256 makes each input slow to run),
    // sometimes up to 256, sometimes anything (the transport would refuse those).
    let size = if raw_size & 0x80 != 0 {
        u16::from(raw_size & 0x7f)
    } else if raw_size & 0x20 != 0 {
        1 << (raw_size % 9)
    } else {
        1 << (raw_size % 5)
    };
    let base = BASE[i];
    let mut q = Queue::new(256).expect("queue");
    q.set_size(size);
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some((base + 0x100) as u32), Some(0));
    q.set_used_ring_address(Some((base + 0x200) as u32), Some(0));
    q.set_next_avail(u16::from_le_bytes([setup[1], setup[2]]));
    q.set_next_used(u16::from_le_bytes([setup[3], setup[1]]));
    q.set_event_idx(raw_size & 0x40 != 0 && raw_size & 0x80 == 0);
    q.set_ready(true);
    q
}

fn parse_desc(raw: &[u8]) -> Option<(u64, u32, u16)> {
    let addr = u64::from_le_bytes(raw.get(..8)?.try_into().ok()?);
    let len = u32::from_le_bytes(raw.get(8..12)?.try_into().ok()?);
    let flags = u16::from_le_bytes(raw.get(12..14)?.try_into().ok()?);
    Some((addr, len, flags))
}

/// The bytes of guest memory at `[start, start + len)` that exist (a table running past
/// the end of memory is cut there).
fn table(mem: &[u8], start: u64, len: u64) -> &[u8] {
    let s = start.min(MEM_SIZE as u64) as usize;
    let e = start.saturating_add(len).min(MEM_SIZE as u64) as usize;
    &mem[s..e]
}

/// Which bytes of guest memory the device may write now: the `used` queues' used rings,
/// and every buffer that a descriptor of a `buffers` queue (or of an indirect table it
/// points to) lets the device write.
fn writable(mem: &[u8], used: &[&Queue], buffers: &[&Queue]) -> Vec<bool> {
    let mut delta = vec![0i32; MEM_SIZE + 1];
    let mut allow = |start: u64, len: u64| {
        let s = start.min(MEM_SIZE as u64) as usize;
        let e = start.saturating_add(len).min(MEM_SIZE as u64) as usize;
        if s < e {
            delta[s] += 1;
            delta[e] -= 1;
        }
    };
    for q in used {
        allow(q.used_ring(), 6 + 8 * u64::from(q.size()));
    }
    let mut indirect = HashSet::new();
    for q in buffers {
        let descs = table(mem, q.desc_table(), 16 * u64::from(q.size()));
        for (addr, len, flags) in descs.chunks_exact(16).filter_map(parse_desc) {
            if flags & F_WRITE != 0 {
                allow(addr, u64::from(len));
            }
            if flags & F_INDIRECT != 0 && indirect.insert((addr, len)) {
                let entries = table(mem, addr, u64::from(len));
                for (a, l, f) in entries.chunks_exact(16).filter_map(parse_desc) {
                    if f & F_WRITE != 0 {
                        allow(a, u64::from(l));
                    }
                }
            }
        }
    }
    let mut out = Vec::with_capacity(MEM_SIZE);
    let mut level = 0;
    for d in &delta[..MEM_SIZE] {
        level += d;
        out.push(level > 0);
    }
    out
}

enum Device {
    Vsock(Vsock<Echo>),
    /// The share lives as long as the server.
    Fs {
        server: FsServer,
        _share: Share,
    },
}

/// An activated vsock device on the three queues, with host packets waiting as `setup`
/// asks.
fn vsock(mem: &GuestMemoryMmap, setup: &[u8]) -> Vsock<Echo> {
    let backend = Echo {
        fd: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        pending: VecDeque::new(),
    };
    let mut dev = Vsock::with_backend(CID, backend).expect("device");
    let active = (0..3)
        .map(|i| ActiveQueue {
            queue: queue(i, &setup[4 * i..4 * i + 4]),
            notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        })
        .collect();
    let irq: Arc<EventFd> = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let interrupt = Arc::new(Interrupt::new(Arc::new(AtomicU32::new(0)), irq));
    dev.activate(mem.clone(), interrupt, active)
        .expect("activation");
    // Host packets waiting before the guest gave any buffer.
    for i in 0..setup[13] & 3 {
        let hdr = PacketHeader {
            src_cid: HOST_CID,
            dst_cid: CID,
            src_port: 1024,
            dst_port: u32::from(i),
            op: OP_RW,
            type_: TYPE_STREAM,
            ..PacketHeader::default()
        };
        let len = usize::from(setup[14]) * 64 + HDR_SIZE;
        dev.backend_mut().pending.push_back((hdr, vec![i; len]));
    }
    dev
}

/// A fresh directory to share for one input, removed on drop.
struct Share(PathBuf);

impl Share {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("mxc-fuzz-vq-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("d")).expect("share directory");
        std::fs::write(root.join("f"), b"public bytes of f\n").expect("f");
        std::fs::write(root.join("secret"), b"denied bytes\n").expect("secret");
        Self(std::fs::canonicalize(root).expect("canonical root"))
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut out = vec![0u8; MEM_SIZE];
    mem.read_slice(&mut out, GuestAddress(0))
        .expect("inside memory");
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((setup, mut rest)) = data.split_at_checked(16) else {
        return;
    };
    let mut patches = Vec::new();
    for _ in 0..usize::from(setup[12] & 3) {
        let Some((head, tail)) = rest.split_at_checked(3) else {
            return;
        };
        let offset = u64::from(u16::from_le_bytes([head[0], head[1]]));
        let Some((bytes, tail)) = tail.split_at_checked(usize::from(head[2])) else {
            return;
        };
        patches.push((offset, bytes));
        rest = tail;
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory");
    mem.write_slice(&rest[..rest.len().min(MEM_SIZE)], GuestAddress(0))
        .expect("inside memory");

    let queues: Vec<Queue> = (0..3).map(|i| queue(i, &setup[4 * i..4 * i + 4])).collect();
    // The transport refuses to activate with a queue that is not valid.
    if !queues.iter().all(|q| q.is_valid(&mem)) {
        return;
    }
    let mut device = if setup[15] & 0x80 != 0 {
        // The fs device on the first two queues (high priority, requests), over a
        // read-only share: the same walk through its own code (fs/queue_handler).
        let share = Share::new();
        let config = FsShareConfig {
            tag: "mxcfs0".into(),
            host_path: share.0.clone(),
            guest_path: "/work".into(),
            readonly: true,
            denied: vec![share.0.join("secret")],
            root_allowlist: None,
            hidden_inodes: Vec::new(),
        };
        let server = FsServer::new(&config, 0, &mem, &queues[..2]).expect("the share is served");
        Device::Fs {
            server,
            _share: share,
        }
    } else {
        Device::Vsock(vsock(&mem, setup))
    };
    let (used, buffers): (Vec<&Queue>, Vec<&Queue>) = match device {
        Device::Vsock(_) => (queues.iter().collect(), vec![&queues[0]]),
        Device::Fs { .. } => (queues[..2].iter().collect(), queues[..2].iter().collect()),
    };

    for round in 0..=patches.len() {
        if let Some((offset, bytes)) = round.checked_sub(1).and_then(|r| patches.get(r)) {
            let end = (*offset as usize + bytes.len()).min(MEM_SIZE);
            let n = end.saturating_sub(*offset as usize);
            let _ = mem.write_slice(&bytes[..n], GuestAddress(*offset));
        }
        let before = snapshot(&mem);
        let allowed = writable(&before, &used, &buffers);
        match &mut device {
            Device::Vsock(dev) => {
                if setup[15] & (1 << round) != 0 {
                    vsock_process_rx(dev);
                }
                vsock_process_tx(dev);
                vsock_process_rx(dev);
            }
            Device::Fs { server, .. } => {
                server.process_queue(0);
                server.process_queue(1);
            }
        }
        let after = snapshot(&mem);
        if before == after {
            continue;
        }
        // A buffer may overlap a descriptor table, so the device may have written the
        // descriptors it walked later: what they allow counts too.
        let allowed_after = writable(&after, &used, &buffers);
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            assert!(
                a == b || allowed[i] || allowed_after[i],
                "the device wrote guest memory at {i:#x}"
            );
        }
    }
});
