//! A hostile driver: malformed chains and requests get an error reply or are returned
//! unanswered; none stops the worker, and the device keeps serving.

use vm_memory::GuestAddress;
use vm_memory_017::ByteValued;

use super::*;
use crate::devices::fs::protocol::{opcode as op, MAX_MESSAGE_LEN};

fn serving_guest() -> (TempDir, Guest) {
    let dir = TempDir::new();
    std::fs::write(dir.path("f"), b"data").unwrap();
    std::fs::create_dir(dir.path("d")).unwrap();
    let mut guest = Guest::new(&share_of(dir.root(), false, &[]));
    guest.init();
    (dir, guest)
}

/// The device still answers a normal request.
fn still_serves(guest: &mut Guest) -> bool {
    guest.lookup(1, "f").is_ok() && guest.worker_alive()
}

/// Write `bytes` at RAW_BASE + `offset` and return the address.
fn raw(guest: &Guest, offset: u64, bytes: &[u8]) -> u64 {
    let at = RAW_BASE + offset;
    guest.mem.write_slice(bytes, GuestAddress(at)).unwrap();
    at
}

#[test]
fn a_short_or_missing_header_is_returned_unanswered() {
    let (_dir, mut guest) = serving_guest();
    let short = raw(&guest, 0, &Guest::header(40, op::GETATTR, 1, 1)[..20]);

    let no_header = guest.send_chain(REQUEST, &[(short, 20, false), (REPLY_BASE, 4096, true)]);
    let only_writable = guest.send_chain(REQUEST, &[(REPLY_BASE, 4096, true)]);
    let empty_readable = guest.send_chain(REQUEST, &[(short, 0, false), (REPLY_BASE, 64, true)]);

    assert_eq!(no_header, 0);
    assert_eq!(only_writable, 0);
    assert_eq!(empty_readable, 0);
    assert!(still_serves(&mut guest));
}

#[test]
fn a_length_that_disagrees_with_the_chain_gets_einval() {
    let (_dir, mut guest) = serving_guest();
    let body = [0u8; 16];
    let mut too_long = Guest::header(100, op::GETATTR, 77, 1);
    too_long.extend_from_slice(&body);
    let mut too_short = Guest::header(40, op::GETATTR, 78, 1);
    too_short.extend_from_slice(&body);
    let a = raw(&guest, 0, &too_long);
    let b = raw(&guest, 4096, &too_short);

    let used_a = guest.send_chain(REQUEST, &[(a, 56, false), (REPLY_BASE, 4096, true)]);
    let reply_a = guest.read_reply(used_a);
    let used_b = guest.send_chain(REQUEST, &[(b, 56, false), (REPLY_BASE, 4096, true)]);
    let reply_b = guest.read_reply(used_b);

    assert_eq!((reply_a.errno, reply_a.unique), (libc::EINVAL, 77));
    assert_eq!((reply_b.errno, reply_b.unique), (libc::EINVAL, 78));
    assert!(still_serves(&mut guest));
}

#[test]
fn unknown_and_unserved_opcodes_get_enosys() {
    let (_dir, mut guest) = serving_guest();
    let opcodes = [
        0,
        7,
        19,
        op::SETXATTR,
        op::GETXATTR,
        op::GETLK,
        op::SETLKW,
        op::IOCTL,
        op::COPY_FILE_RANGE,
        op::SETUPMAPPING,
        50,
        999,
        0x1a00_0000,
        u32::MAX,
    ];

    let errnos: Vec<i32> = opcodes
        .iter()
        .map(|o| guest.request(*o, 1, &[&[0u8; 64]], 4096).errno)
        .collect();

    assert!(errnos.iter().all(|e| *e == libc::ENOSYS), "{errnos:?}");
    assert!(still_serves(&mut guest));
}

#[test]
fn truncated_arguments_and_bad_strings_get_an_error() {
    let (_dir, mut guest) = serving_guest();

    let results = [
        guest.request(op::GETATTR, 1, &[], 4096).errno,
        guest.request(op::READ, 1, &[&[0u8; 8]], 4096).errno,
        guest.request(op::LOOKUP, 1, &[b"no-nul"], 4096).errno,
        guest
            .request(op::RENAME, 1, &[&[0u8; 8], b"only-one\0"], 4096)
            .errno,
        guest.request(op::SYMLINK, 1, &[b"a"], 4096).errno,
        guest.request(op::INIT, 0, &[&[0u8; 4]], 4096).errno,
    ];

    assert!(results.iter().all(|e| *e > 0), "{results:?}");
    assert!(still_serves(&mut guest));
}

#[test]
fn huge_sizes_never_become_huge_allocations() {
    let (_dir, mut guest) = serving_guest();
    let f = guest.lookup(1, "f").unwrap();
    let fh = guest.open(f.nodeid, libc::O_RDWR).unwrap();
    let dh = guest.opendir(1).unwrap();
    let read_all = fuse_backend_rs::abi::fuse_abi::ReadIn {
        fh,
        size: u32::MAX,
        ..Default::default()
    };
    let readdir_all = fuse_backend_rs::abi::fuse_abi::ReadIn {
        fh: dh,
        size: u32::MAX,
        ..Default::default()
    };
    let write_all = fuse_backend_rs::abi::fuse_abi::WriteIn {
        fh,
        size: u32::MAX,
        ..Default::default()
    };
    let forget_all = fuse_backend_rs::abi::fuse_abi::BatchForgetIn {
        count: u32::MAX,
        dummy: 0,
    };

    let read = guest.request(op::READ, f.nodeid, &[read_all.as_slice()], 4096);
    let readdir = guest.request(op::READDIR, 1, &[readdir_all.as_slice()], 4096);
    let write = guest.request(op::WRITE, f.nodeid, &[write_all.as_slice(), b"abc"], 4096);
    let forget = guest.request_on(HIPRIO, op::BATCH_FORGET, 0, &[forget_all.as_slice()], 0);
    let getxattr = guest.request(
        op::GETXATTR,
        1,
        &[&u32::MAX.to_le_bytes(), &[0; 4], b"user.x\0"],
        4096,
    );

    assert_ne!(read.errno, 0);
    assert_eq!(readdir.errno, libc::ENOMEM);
    // WRITE writes what the chain holds, never more.
    assert_eq!(write.errno, 0);
    assert_eq!(std::fs::read(_dir.path("f")).unwrap(), b"abca");
    assert_eq!(forget.used, 0);
    assert_eq!(getxattr.errno, libc::ENOSYS);
    assert!(still_serves(&mut guest));
}

#[test]
fn chains_longer_than_the_largest_message_are_refused() {
    let (_dir, mut guest) = serving_guest();
    // 64 descriptors of 64 KiB over the same 64 KiB claim 4 MiB of reply room.
    let mut hdr = Guest::header(56, op::GETATTR, 5, 1);
    hdr.extend_from_slice(&[0u8; 16]);
    let req = raw(&guest, 0, &hdr);
    let mut bufs = vec![(req, 56, false)];
    bufs.extend((0..64).map(|_| (REPLY_BASE, 64 * 1024, true)));
    let big_req_len = (MAX_MESSAGE_LEN + 4096) as u32;
    let big = Guest::header(big_req_len, op::WRITE, 6, 1);
    let big_at = raw(&guest, 0x1000, &big);

    let used = guest.send_chain(REQUEST, &bufs);
    let reply = guest.read_reply(used);
    let used_big = guest.send_chain(
        REQUEST,
        &[
            (big_at, 40, false),
            (REQ_BASE, big_req_len - 40, false),
            (REPLY_BASE, 64, true),
        ],
    );
    let reply_big = guest.read_reply(used_big);

    assert_eq!((reply.errno, reply.unique), (libc::EINVAL, 5));
    assert_eq!((reply_big.errno, reply_big.unique), (libc::EINVAL, 6));
    assert!(still_serves(&mut guest));
}

#[test]
fn broken_chains_are_returned_unanswered() {
    let (_dir, mut guest) = serving_guest();
    let mut hdr = Guest::header(56, op::GETATTR, 9, 1);
    hdr.extend_from_slice(&[0u8; 16]);
    let req = raw(&guest, 0, &hdr);
    let end = MEM_SIZE as u64;

    // Readable after writable.
    let misordered = guest.send_chain(
        REQUEST,
        &[
            (REPLY_BASE, 16, true),
            (req, 56, false),
            (REPLY_BASE + 64, 4096, true),
        ],
    );
    // A readable buffer outside guest memory.
    let outside = guest.send_chain(REQUEST, &[(end - 8, 56, false), (REPLY_BASE, 4096, true)]);
    // A reply buffer outside guest memory.
    let reply_outside = guest.send_chain(REQUEST, &[(req, 56, false), (end + 4096, 4096, true)]);
    // A reply buffer too small for the header.
    let tiny = guest.send_chain(REQUEST, &[(req, 56, false), (REPLY_BASE, 8, true)]);

    assert_eq!(misordered, 0);
    assert_eq!(outside, 0);
    assert_eq!(reply_outside, 0);
    assert_eq!(tiny, 0);
    assert!(still_serves(&mut guest));
}

#[test]
fn descriptor_loops_and_bad_heads_do_not_hang_the_worker() {
    let (_dir, mut guest) = serving_guest();
    let mut hdr = Guest::header(56, op::GETATTR, 3, 1);
    hdr.extend_from_slice(&[0u8; 16]);
    let req = raw(&guest, 0, &hdr);
    let q = &mut guest.queues[REQUEST];
    // Descriptor 200 chains to itself forever.
    q.write_desc(&guest.mem, 200, req, 56, VIRTQ_DESC_F_NEXT, 200);
    q.publish(&guest.mem, 200);
    // A head index past the ring.
    q.publish(&guest.mem, 999);

    guest.kick(REQUEST);
    let looped = guest.wait_used(REQUEST);
    let bad_head = guest.try_wait_used(REQUEST, Duration::from_millis(300));

    assert_eq!(looped, (200, 0));
    assert!(bad_head.is_none());
    assert!(still_serves(&mut guest));
}

#[test]
fn a_corrupted_ring_is_abandoned_and_the_other_queue_keeps_working() {
    let (_dir, mut guest) = serving_guest();
    let f = guest.lookup(1, "f").unwrap();
    let before = guest.usage().0;

    let avail = guest.queues[REQUEST].avail_idx;
    guest.queues[REQUEST].set_avail_idx(&guest.mem, avail.wrapping_add(1000));
    guest.kick(REQUEST);
    let answered = guest.try_wait_used(REQUEST, Duration::from_millis(300));
    guest.forget(f.nodeid, 1);

    assert!(answered.is_none());
    assert_eq!(before, 1);
    assert_eq!(guest.usage().0, 0);
    assert!(guest.worker_alive());
}

#[test]
fn random_requests_never_stop_the_worker() {
    let (dir, mut guest) = serving_guest();
    let served = [
        op::LOOKUP,
        op::FORGET,
        op::GETATTR,
        op::SETATTR,
        op::READLINK,
        op::SYMLINK,
        op::MKNOD,
        op::MKDIR,
        op::UNLINK,
        op::RMDIR,
        op::RENAME,
        op::LINK,
        op::OPEN,
        op::READ,
        op::WRITE,
        op::STATFS,
        op::RELEASE,
        op::FSYNC,
        op::FLUSH,
        op::INIT,
        op::OPENDIR,
        op::READDIR,
        op::RELEASEDIR,
        op::FSYNCDIR,
        op::ACCESS,
        op::CREATE,
        op::BATCH_FORGET,
        op::FALLOCATE,
        op::READDIRPLUS,
        op::RENAME2,
        op::LSEEK,
        op::INTERRUPT,
    ];
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };

    for i in 0..3000u64 {
        let opcode = served[(next() % served.len() as u64) as usize];
        let nodeid = [0, 1, 2, 3, next()][(next() % 5) as usize];
        let body_len = (next() % 200) as usize;
        let mut body: Vec<u8> = (0..body_len).map(|_| next() as u8).collect();
        // Some bodies are plausible: a small fh, a NUL-terminated name.
        if body.len() >= 8 && next() % 2 == 0 {
            body[..8].copy_from_slice(&(next() % 4).to_le_bytes());
        }
        if next() % 3 == 0 {
            body.extend_from_slice(b"f\0");
        }
        let mut req = Guest::header(0, opcode, i, nodeid);
        req.extend_from_slice(&body);
        let lie = next() % 8 == 0;
        let len = if lie { next() as u32 } else { req.len() as u32 };
        req[..4].copy_from_slice(&len.to_le_bytes());
        let at = raw(&guest, 0, &req);
        let room = [0u32, 8, 16, 100, 4096][(next() % 5) as usize];
        let mut bufs = vec![(at, req.len() as u32, false)];
        if room > 0 {
            bufs.push((REPLY_BASE, room, true));
        }
        guest.send_chain(if next() % 4 == 0 { HIPRIO } else { REQUEST }, &bufs);
    }

    assert!(guest.worker_alive());
    assert!(guest.statfs(1).is_ok());
    assert!(dir.root().exists());
}

/// A driver that rewrites its request while the device serves it: the opcode flips between
/// GETATTR (served) and IOCTL (refused with ENOSYS before the FUSE server sees it). The
/// device must serve the request it checked: a reply from the FUSE server's IOCTL path
/// (ENOTTY) means the server read the request again after the check.
#[test]
fn a_request_rewritten_while_served_is_served_as_checked() {
    use std::sync::atomic::AtomicBool;

    let (_dir, mut guest) = serving_guest();
    let mut request = Guest::header(72, op::GETATTR, 5, 1);
    request.extend_from_slice(&[0u8; 32]); // GetattrIn, or IoctlIn with in_size 0
    let at = raw(&guest, 0, &request);
    let opcode_at = GuestAddress(at + 4);
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let (mem, stop) = (guest.mem.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for opcode in [op::IOCTL, op::GETATTR] {
                    mem.write_obj(opcode, opcode_at).unwrap();
                }
                flips += 1;
            }
            flips
        })
    };

    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..3000 {
        let used = guest.send_chain(REQUEST, &[(at, 72, false), (REPLY_BASE, 4096, true)]);
        *seen.entry(guest.read_reply(used).errno).or_insert(0u32) += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().unwrap();

    assert!(flips > 0);
    assert_eq!(seen.get(&libc::ENOTTY), None, "replies by errno: {seen:?}");
    assert!(
        seen.keys().all(|e| [0, libc::ENOSYS].contains(e)),
        "replies by errno: {seen:?}"
    );
    assert!(still_serves(&mut guest));
}
