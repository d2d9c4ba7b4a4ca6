//! Host-side cost per FUSE request, printed as a table (not a test of speed: it asserts
//! nothing about time). Run it optimised:
//!
//! ```text
//! cargo test -p vmm --release --lib fs_request_cost -- --ignored --nocapture
//! ```
//!
//! Three columns per operation, from one run:
//! - **in device**: the worker's own work for one request, timed around
//!   `Serving::process_queue` on the calling thread: popping the chain, the checks, the
//!   FUSE server, the policy layer, the passthrough and its system calls, the used ring.
//! - **round trip**: the same request through the real worker thread: the driver's kick
//!   (an eventfd write), the worker's wake-up, the work, the interrupt eventfd, and the
//!   driver's wake-up. On a real VM the guest's exits add to this.
//! - **host syscalls**: what the same operation costs a host process calling the kernel
//!   directly (`fstatat`, `pread`, `pwrite` on the same files), the floor for the device.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicU32;

use fuse_backend_rs::abi::fuse_abi::{GetattrIn, ReadIn, WriteIn};
use vm_memory_017::ByteValued;

use super::client::cstr;
use super::*;
use crate::devices::fs::bridge::{convert_queue, GuestRam};
use crate::devices::fs::filter::PolicyFs;
use crate::devices::fs::protocol::opcode as op;
use crate::devices::fs::queue_handler::Serving;
use crate::devices::fs::{share, FsLimits};

/// The device's work driven on the calling thread, without the worker.
struct SyncDevice {
    mem: GuestMemoryMmap,
    queue: DriverQueue,
    serving: Serving,
    unique: u64,
}

impl SyncDevice {
    fn new(share_cfg: &FsShareConfig) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let ram = GuestRam::new(&mem).unwrap();
        let queues = (0..2u64)
            .map(|i| {
                let q = convert_queue(i as usize, &DriverQueue::new(i).device_queue(), &ram);
                (q.unwrap(), EventFd::new(EFD_NONBLOCK).unwrap())
            })
            .collect();
        let interrupt = Arc::new(Interrupt::new(
            Arc::new(AtomicU32::new(0)),
            Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        ));
        let fs = PolicyFs::new(
            share::prepare(share_cfg).unwrap(),
            FsLimits::default(),
            None,
        )
        .unwrap();
        Self {
            mem,
            queue: DriverQueue::new(1),
            serving: Serving::new(
                ram,
                queues,
                interrupt,
                Arc::new(fs),
                Default::default(),
                Default::default(),
            ),
            unique: 0,
        }
    }

    /// One request on the request queue: the time the device spent on it, and the reply.
    fn call(&mut self, opcode: u32, nodeid: u64, parts: &[&[u8]], room: u32) -> (Duration, Reply) {
        self.unique += 1;
        let bufs = lay_out_request(&self.mem, self.unique, (0, 0), opcode, nodeid, parts, room);
        self.queue.add_chain(&self.mem, &bufs);
        let start = Instant::now();
        self.serving.process_queue(REQUEST);
        let spent = start.elapsed();
        let (_, used) = self.queue.pop_used(&self.mem).unwrap();
        (spent, decode_reply(&self.mem, used))
    }
}

struct Stats {
    mean: f64,
    p50: f64,
    p99: f64,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let n = samples.len();
    Stats {
        mean: samples.iter().map(|d| us(*d)).sum::<f64>() / n as f64,
        p50: us(samples[n / 2]),
        p99: us(samples[n * 99 / 100]),
    }
}

fn time_n(n: usize, mut f: impl FnMut()) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect()
}

const N: usize = 20_000;
const WARMUP: usize = 1_000;

#[test]
#[ignore = "benchmark; run with --release --ignored --nocapture"]
fn fs_request_cost() {
    let dir = TempDir::new();
    std::fs::write(dir.path("data.bin"), pattern(1 << 20, 1)).unwrap();
    std::fs::write(dir.path("out.bin"), vec![0u8; 1 << 20]).unwrap();
    let cfg = share_of(dir.root(), false, &[]);
    let block = pattern(4096, 2);

    // The device's own work.
    let mut dev = SyncDevice::new(&cfg);
    let init = fuse_backend_rs::abi::fuse_abi::InitIn {
        major: 7,
        minor: 36,
        max_readahead: 0,
        flags: 0x20 | 0x40_0000,
    };
    dev.call(op::INIT, 0, &[init.as_slice()], 4096);
    let node = |r: &Reply| u64::from_le_bytes(r.body[..8].try_into().unwrap());
    let data = node(&dev.call(op::LOOKUP, 1, &[&cstr("data.bin")], 4096).1);
    let out = node(&dev.call(op::LOOKUP, 1, &[&cstr("out.bin")], 4096).1);
    let open = |dev: &mut SyncDevice, n: u64| {
        let args = fuse_backend_rs::abi::fuse_abi::OpenIn {
            flags: libc::O_RDWR as u32,
            fuse_flags: 0,
        };
        node(&dev.call(op::OPEN, n, &[args.as_slice()], 4096).1)
    };
    let data_fh = open(&mut dev, data);
    let out_fh = open(&mut dev, out);
    let read_in = ReadIn {
        fh: data_fh,
        offset: 8192,
        size: 4096,
        ..Default::default()
    };
    let write_in = WriteIn {
        fh: out_fh,
        offset: 8192,
        size: 4096,
        ..Default::default()
    };
    let getattr_in = GetattrIn::default();
    let name = cstr("data.bin");
    type Req<'a> = (&'static str, u32, u64, Vec<&'a [u8]>, u32);
    let requests: Vec<Req> = vec![
        ("LOOKUP", op::LOOKUP, 1, vec![&name[..]], 4096),
        (
            "GETATTR",
            op::GETATTR,
            data,
            vec![getattr_in.as_slice()],
            4096,
        ),
        (
            "READ 4 KiB",
            op::READ,
            data,
            vec![read_in.as_slice()],
            16 + 4096,
        ),
        (
            "WRITE 4 KiB",
            op::WRITE,
            out,
            vec![write_in.as_slice(), &block[..]],
            4096,
        ),
    ];
    let mut in_device = Vec::new();
    for (label, opcode, nodeid, parts, room) in &requests {
        for _ in 0..WARMUP {
            let (_, r) = dev.call(*opcode, *nodeid, parts, *room);
            assert_eq!(r.errno, 0, "{label}");
        }
        let samples = (0..N)
            .map(|_| dev.call(*opcode, *nodeid, parts, *room).0)
            .collect();
        in_device.push(stats(samples));
    }

    // Through the worker thread.
    let mut guest = Guest::new(&cfg);
    guest.init();
    let gdata = guest.lookup(1, "data.bin").unwrap().nodeid;
    let gout = guest.lookup(1, "out.bin").unwrap().nodeid;
    let gdata_fh = guest.open(gdata, libc::O_RDWR).unwrap();
    let gout_fh = guest.open(gout, libc::O_RDWR).unwrap();
    let mut round_trip = Vec::new();
    let runs: [&mut dyn FnMut(&mut Guest); 4] = [
        &mut |g| {
            g.lookup(1, "data.bin").unwrap();
        },
        &mut |g| {
            g.getattr(gdata).unwrap();
        },
        &mut |g| {
            g.read(gdata, gdata_fh, 8192, 4096).unwrap();
        },
        &mut |g| {
            g.write(gout, gout_fh, 8192, &block).unwrap();
        },
    ];
    for run in runs {
        for _ in 0..WARMUP {
            run(&mut guest);
        }
        round_trip.push(stats(time_n(N / 4, || run(&mut guest))));
    }

    // The host's own system calls on the same files.
    let data_file = std::fs::File::open(dir.path("data.bin")).unwrap();
    let out_file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path("out.bin"))
        .unwrap();
    let root = std::fs::File::open(dir.root()).unwrap();
    let mut buf = vec![0u8; 4096];
    let c_name = std::ffi::CString::new("data.bin").unwrap();
    let fstatat = || {
        let mut st = std::mem::MaybeUninit::<libc::stat64>::uninit();
        // SAFETY: fstatat64(2) on a valid dirfd and C string, writing into `st`.
        let rc = unsafe {
            libc::fstatat64(
                root.as_raw_fd(),
                c_name.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        assert_eq!(rc, 0);
    };
    let host = [
        stats(time_n(N, fstatat)),
        stats(time_n(N, fstatat)),
        stats(time_n(N, || {
            data_file.read_exact_at(&mut buf, 8192).unwrap();
        })),
        stats(time_n(N, || out_file.write_all_at(&block, 8192).unwrap())),
    ];

    println!();
    println!("fs device: host-side cost per FUSE request (µs; mean / p50 / p99)");
    println!("| request | in device | round trip via worker | host syscall alone |");
    println!("|---|---|---|---|");
    for (i, (label, ..)) in requests.iter().enumerate() {
        let f = |s: &Stats| format!("{:.1} / {:.1} / {:.1}", s.mean, s.p50, s.p99);
        println!(
            "| {label} | {} | {} | {} |",
            f(&in_device[i]),
            f(&round_trip[i]),
            f(&host[i])
        );
    }
    println!("(host syscall for LOOKUP and GETATTR: one fstatat)");
}
