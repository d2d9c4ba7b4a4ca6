//! The device end to end: real queues in guest memory, the event loop, real Unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::{ActivateError, VIRTIO_MMIO_INT_VRING};
use crate::devices::vsock::packet::{
    OP_CREDIT_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_SEND,
};
use crate::devices::vsock::unix::{FIRST_LOCAL_PORT, MAX_RAW_PKTS};
use crate::devices::vsock::VsockError;

fn host_connect(uds: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    s
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

fn read_exact_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn describes_itself_as_a_vsock_device() {
    let dir = TempDir::new();
    let dev = Vsock::new(0x1_0203, &dir.path("v.sock")).unwrap();
    let mut cid = [0u8; 8];
    let mut high = [0u8; 4];
    let mut past_end = [0xffu8; 4];
    let mut far = [0xffu8; 2];

    dev.read_config(0, &mut cid);
    dev.read_config(4, &mut high);
    dev.read_config(6, &mut past_end);
    dev.read_config(u64::MAX, &mut far);

    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.avail_features(), 1 << 32);
    assert_eq!(u64::from_le_bytes(cid), 0x1_0203);
    assert_eq!(high, [0; 4]);
    assert_eq!(past_end, [0; 4]);
    assert_eq!(far, [0; 2]);
}

#[test]
fn config_writes_are_ignored() {
    let dir = TempDir::new();
    let mut dev = Vsock::new(7, &dir.path("v.sock")).unwrap();
    let mut cid = [0u8; 8];

    dev.write_config(0, &[9; 8]);
    dev.read_config(0, &mut cid);

    assert_eq!(u64::from_le_bytes(cid), 7);
}

#[test]
fn reserved_cids_are_refused() {
    let dir = TempDir::new();

    let results = [0u64, 1, 2, u64::from(u32::MAX), u64::MAX]
        .map(|cid| Vsock::new(cid, &dir.path("v.sock")).map(|_| ()));

    assert!(results
        .iter()
        .all(|r| matches!(r, Err(VsockError::InvalidCid(_)))));
}

#[test]
fn existing_socket_path_is_refused_and_ours_is_removed_on_drop() {
    let dir = TempDir::new();
    let path = dir.path("v.sock");
    let first = Vsock::new(CID, &path).unwrap();

    let second = Vsock::new(CID, &path);
    let existed = path.exists();
    drop(first);

    assert!(matches!(second, Err(VsockError::Bind { .. })));
    assert!(existed);
    assert!(!path.exists());
}

#[test]
fn activation_checks_queue_count_and_happens_once() {
    let dir = TempDir::new();
    let mut guest = Guest::unix(&dir.path("v.sock"), UnixBackendConfig::default());
    let mem = guest.mem.clone();
    let irq = Arc::new(Interrupt::new(
        Arc::new(AtomicU32::new(0)),
        Arc::new(EventFd::new(0).unwrap()),
    ));
    let mut fresh = Vsock::new(CID, &dir.path("w.sock")).unwrap();

    let twice = guest
        .dev
        .lock()
        .unwrap()
        .activate(mem.clone(), irq.clone(), Vec::new());
    let short = fresh.activate(mem, irq, Vec::new());

    assert!(matches!(twice, Err(ActivateError::AlreadyActive)));
    assert!(matches!(
        short,
        Err(ActivateError::QueueCount {
            expected: 3,
            got: 0
        })
    ));
    guest.pump();
}

#[test]
fn host_connect_full_session() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, UnixBackendConfig::default());
    guest.give_rx(4, 4096);
    let mut host = host_connect(&uds, 1024);

    // Handshake: REQUEST to guest port 1024, RESPONSE, then "OK <port>".
    let req = guest.accept_request();
    let ok = read_line(&mut host);
    // Data both ways.
    host.write_all(b"ping").unwrap();
    let pings = guest.recv_op(OP_RW);
    let mut rw = guest_hdr(OP_RW, 1024, req.src_port);
    rw.len = 4;
    guest.send(&rw, b"pong");
    let pong = read_exact_n(&mut host, 4);
    // The guest closes: the host sees EOF and the guest gets its RST.
    let mut shut = guest_hdr(OP_SHUTDOWN, 1024, req.src_port);
    shut.flags = SHUTDOWN_BOTH;
    guest.send(&shut, &[]);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    let rst = guest.recv_op(OP_RST);

    assert_eq!(
        (
            req.src_cid,
            req.dst_cid,
            req.src_port,
            req.dst_port,
            req.type_
        ),
        (HOST_CID, CID, FIRST_LOCAL_PORT, 1024, TYPE_STREAM)
    );
    assert_eq!(ok, format!("OK {FIRST_LOCAL_PORT}"));
    assert_eq!(pings.last().unwrap().1, b"ping");
    assert_eq!(pong, b"pong");
    assert!(rest.is_empty());
    assert_eq!(rst.last().unwrap().0.dst_port, 1024);
    assert_eq!(guest.backend_counts().0, 0);
    assert_ne!(
        guest.irq_status.load(Ordering::SeqCst) & VIRTIO_MMIO_INT_VRING,
        0
    );
    assert!(guest.irq_count() > 0);
}

#[test]
fn guest_connect_to_host_listener() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let listener = UnixListener::bind(dir.path("v.sock_1080")).unwrap();
    let mut guest = Guest::unix(&uds, UnixBackendConfig::default());
    guest.give_rx_split(4, 4096);

    guest.send(&guest_hdr(OP_REQUEST, 5000, 1080), &[]);
    let resp = guest.recv_op(OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut rw = guest_hdr(OP_RW, 5000, 1080);
    rw.len = 5;
    guest.send(&rw, b"hello");
    let hello = read_exact_n(&mut host, 5);
    host.write_all(b"world").unwrap();
    let world = guest.recv_op(OP_RW);
    drop(host);
    let shut = guest.recv_op(OP_SHUTDOWN);
    guest.send(&guest_hdr(OP_RST, 5000, 1080), &[]);

    let r = resp.last().unwrap().0;
    assert_eq!(
        (r.src_cid, r.dst_cid, r.src_port, r.dst_port),
        (HOST_CID, CID, 1080, 5000)
    );
    assert_eq!(hello, b"hello");
    assert_eq!(world.last().unwrap().1, b"world");
    assert_eq!(shut.last().unwrap().0.flags, SHUTDOWN_BOTH);
    assert_eq!(guest.backend_counts().0, 0);
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let dir = TempDir::new();
    let mut guest = Guest::unix(&dir.path("v.sock"), UnixBackendConfig::default());
    guest.give_rx(1, 4096);

    guest.send(&guest_hdr(OP_REQUEST, 5000, 9999), &[]);
    let (rst, _) = guest.recv().unwrap();

    assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 9999, 5000));
    assert_eq!(guest.backend_counts().0, 0);
}

#[test]
fn host_data_respects_guest_credit_and_asks_for_more() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, UnixBackendConfig::default());
    guest.give_rx(8, 4096);
    let mut host = host_connect(&uds, 1024);
    let req = guest.recv_op(OP_REQUEST).last().unwrap().0;
    let mut resp = guest_hdr(OP_RESPONSE, 1024, req.src_port);
    resp.buf_alloc = 100;
    guest.send(&resp, &[]);
    read_line(&mut host);

    host.write_all(&[1u8; 300]).unwrap();
    let first = guest.recv_op(OP_CREDIT_REQUEST);
    guest.credit_update(1024, req.src_port, 100, 100);
    let second = guest.recv_op(OP_CREDIT_REQUEST);

    let data: usize = first
        .iter()
        .chain(&second)
        .filter(|p| p.0.op == OP_RW)
        .map(|p| p.1.len())
        .sum();
    assert_eq!(data, 200);
    assert!(first.iter().chain(&second).all(|p| p.1.len() <= 100));
}

#[test]
fn guest_gets_credit_updates_as_host_consumes() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, UnixBackendConfig::default());
    guest.give_rx(8, 4096);
    let mut host = host_connect(&uds, 1024);
    let req = guest.accept_request();
    read_line(&mut host);
    let chunk = vec![7u8; 8192];

    for _ in 0..4 {
        let mut rw = guest_hdr(OP_RW, 1024, req.src_port);
        rw.len = chunk.len() as u32;
        guest.send(&rw, &chunk);
    }
    let got = read_exact_n(&mut host, 4 * chunk.len());
    let updates = guest.recv_op(OP_CREDIT_UPDATE);

    assert_eq!(got.len(), 32768);
    let last = updates.last().unwrap().0;
    assert_eq!(last.buf_alloc, 64 * 1024);
    assert!(last.fwd_cnt >= 16 * 1024);
}

#[test]
fn guest_ignoring_credit_is_reset_and_buffer_stays_bounded() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, UnixBackendConfig::default());
    guest.give_rx(8, 4096);
    let mut host = host_connect(&uds, 1024);
    let req = guest.accept_request();
    read_line(&mut host);
    let chunk = vec![0u8; 64 * 1024];

    // Never read by the host: the socket fills, then the device's buffer, then RST.
    let mut sent = 0;
    while guest.backend_counts().0 == 1 && sent < 200 {
        let mut rw = guest_hdr(OP_RW, 1024, req.src_port);
        rw.len = chunk.len() as u32;
        guest.send(&rw, &chunk);
        sent += 1;
    }
    let rst = guest.recv_op(OP_RST);

    assert!(sent < 200);
    assert_eq!(rst.last().unwrap().0.dst_port, 1024);
    assert_eq!(guest.backend_counts().0, 0);
}

#[test]
fn connection_limit_answers_rst() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let _listener = UnixListener::bind(dir.path("v.sock_80")).unwrap();
    let config = UnixBackendConfig {
        max_connections: 4,
        ..UnixBackendConfig::default()
    };
    let mut guest = Guest::unix(&uds, config);
    guest.give_rx(16, 4096);

    for port in 0..10 {
        guest.queue_tx(&guest_hdr(OP_REQUEST, 6000 + port, 80), &[]);
    }
    guest.kick_tx();
    let got = guest.recv_all();

    let responses = got.iter().filter(|p| p.0.op == OP_RESPONSE).count();
    let rsts = got.iter().filter(|p| p.0.op == OP_RST).count();
    assert_eq!((responses, rsts), (4, 6));
    assert_eq!(guest.backend_counts().0, 4);
}

#[test]
fn pending_control_packets_are_bounded_without_rx_buffers() {
    let dir = TempDir::new();
    let mut guest = Guest::unix(&dir.path("v.sock"), UnixBackendConfig::default());

    // Thousands of packets for unknown connections, each of which wants a RST back,
    // while the guest offers no rx buffers at all.
    for round in 0..12 {
        for i in 0..200u32 {
            guest.queue_tx(&guest_hdr(OP_RW, round * 1000 + i, 1), &[]);
        }
        guest.kick_tx();
    }

    let (conns, _, pending) = guest.backend_counts();
    assert_eq!(conns, 0);
    assert_eq!(pending, MAX_RAW_PKTS);
    assert_eq!(guest.txq.used_pending(&guest.mem), 2400);
}

#[test]
fn rx_work_waits_for_buffers_then_resumes() {
    let dir = TempDir::new();
    let mut guest = Guest::unix(&dir.path("v.sock"), UnixBackendConfig::default());

    guest.send(&guest_hdr(OP_REQUEST, 5000, 4242), &[]);
    let before = guest.recv();
    guest.give_rx(1, 4096);
    let after = guest.recv();

    assert!(before.is_none());
    assert_eq!(after.unwrap().0.op, OP_RST);
}

fn malformed_setup() -> (TempDir, Guest<UnixBackend>) {
    let dir = TempDir::new();
    let mut guest = Guest::unix(&dir.path("v.sock"), UnixBackendConfig::default());
    guest.give_rx(4, 4096);
    (dir, guest)
}

/// Send a chain of raw `(addr, len, flags)` descriptors at consecutive indexes.
fn send_raw_chain(guest: &mut Guest<UnixBackend>, descs: &[(u64, u32, u16)]) {
    let head = guest.txq.next_desc;
    for (i, (addr, len, flags)) in descs.iter().enumerate() {
        let index = (head + i as u16) % QSIZE;
        let last = i + 1 == descs.len();
        let flags = if last {
            *flags
        } else {
            flags | VIRTQ_DESC_F_NEXT
        };
        guest
            .txq
            .write_desc(&guest.mem, index, *addr, *len, flags, (index + 1) % QSIZE);
    }
    guest.txq.next_desc = (head + descs.len() as u16) % QSIZE;
    guest.txq.publish(&guest.mem, head);
    guest.kick_tx();
}

fn hdr_at(guest: &mut Guest<UnixBackend>, hdr: &PacketHeader) -> u64 {
    let at = guest.alloc(HDR_SIZE as u32);
    guest
        .mem
        .write_slice(&hdr.to_bytes(), GuestAddress(at))
        .unwrap();
    at
}

#[test]
fn malformed_short_header_is_dropped_silently() {
    let (_dir, mut guest) = malformed_setup();
    let h = hdr_at(&mut guest, &guest_hdr(OP_REQUEST, 1, 2));

    send_raw_chain(&mut guest, &[(h, 43, 0)]);

    assert_eq!(guest.txq.pop_used(&guest.mem).map(|u| u.1), Some(0));
    assert!(guest.recv().is_none());
}

#[test]
fn malformed_len_larger_than_buffer_gets_rst() {
    let (_dir, mut guest) = malformed_setup();
    let mut hdr = guest_hdr(OP_RW, 1, 2);
    hdr.len = 1000;
    let h = hdr_at(&mut guest, &hdr);
    let d = guest.alloc(10);

    send_raw_chain(&mut guest, &[(h, 44, 0), (d, 10, 0)]);

    assert!(guest.txq.pop_used(&guest.mem).is_some());
    assert_eq!(guest.recv().unwrap().0.op, OP_RST);
}

#[test]
fn malformed_huge_len_gets_rst() {
    let (_dir, mut guest) = malformed_setup();
    let mut hdr = guest_hdr(OP_RW, 1, 2);
    hdr.len = u32::MAX;
    let h = hdr_at(&mut guest, &hdr);

    send_raw_chain(&mut guest, &[(h, 44, 0), (0x20_0000, u32::MAX, 0)]);

    assert_eq!(guest.recv().unwrap().0.op, OP_RST);
}

#[test]
fn malformed_write_only_tx_descriptor_is_dropped() {
    let (_dir, mut guest) = malformed_setup();
    let h = hdr_at(&mut guest, &guest_hdr(OP_REQUEST, 1, 2));

    send_raw_chain(&mut guest, &[(h, 44, VIRTQ_DESC_F_WRITE)]);

    assert!(guest.txq.pop_used(&guest.mem).is_some());
    assert!(guest.recv().is_none());
}

#[test]
fn malformed_head_index_out_of_range_is_skipped() {
    let (_dir, mut guest) = malformed_setup();

    guest.txq.publish(&guest.mem, QSIZE + 7);
    guest.kick_tx();
    guest.send(&guest_hdr(OP_RW, 1, 2), &[]);

    // The bogus head cannot be returned; the next, valid packet still works.
    assert_eq!(guest.txq.used_pending(&guest.mem), 1);
    assert_eq!(guest.recv().unwrap().0.op, OP_RST);
}

#[test]
fn malformed_next_index_out_of_range_is_dropped() {
    let (_dir, mut guest) = malformed_setup();
    let h = hdr_at(&mut guest, &guest_hdr(OP_REQUEST, 1, 2));
    let head = guest.txq.next_desc;

    guest
        .txq
        .write_desc(&guest.mem, head, h, 20, VIRTQ_DESC_F_NEXT, 999);
    guest.txq.publish(&guest.mem, head);
    guest.kick_tx();

    assert!(guest.txq.pop_used(&guest.mem).is_some());
    assert!(guest.recv().is_none());
}

#[test]
fn malformed_descriptor_loop_terminates() {
    let (_dir, mut guest) = malformed_setup();
    let h = hdr_at(&mut guest, &guest_hdr(OP_REQUEST, 1, 2));

    // 10 -> 11 -> 10 -> ... with empty buffers.
    guest
        .txq
        .write_desc(&guest.mem, 10, h, 0, VIRTQ_DESC_F_NEXT, 11);
    guest
        .txq
        .write_desc(&guest.mem, 11, h, 0, VIRTQ_DESC_F_NEXT, 10);
    guest.txq.publish(&guest.mem, 10);
    guest.kick_tx();

    assert!(guest.txq.pop_used(&guest.mem).is_some());
    assert!(guest.recv().is_none());
}

#[test]
fn malformed_zero_length_chain_is_dropped() {
    let (_dir, mut guest) = malformed_setup();

    send_raw_chain(&mut guest, &[(0x20_0000, 0, 0)]);

    assert_eq!(guest.txq.pop_used(&guest.mem).map(|u| u.1), Some(0));
    assert!(guest.recv().is_none());
}

#[test]
fn malformed_buffer_outside_memory_is_dropped() {
    let (_dir, mut guest) = malformed_setup();

    send_raw_chain(&mut guest, &[(MEM_SIZE as u64 - 4, 44, 0)]);

    assert!(guest.txq.pop_used(&guest.mem).is_some());
    assert!(guest.recv().is_none());
}

#[test]
fn malformed_wrong_cids_are_dropped_silently() {
    let (_dir, mut guest) = malformed_setup();
    let mut wrong_src = guest_hdr(OP_REQUEST, 1, 2);
    wrong_src.src_cid = 99;
    let mut wrong_dst = guest_hdr(OP_REQUEST, 1, 2);
    wrong_dst.dst_cid = 1;

    guest.send(&wrong_src, &[]);
    guest.send(&wrong_dst, &[]);

    assert_eq!(guest.txq.used_pending(&guest.mem), 2);
    assert!(guest.recv().is_none());
}

#[test]
fn malformed_unknown_op_and_type_get_rst() {
    let (_dir, mut guest) = malformed_setup();
    let mut bad_op = guest_hdr(OP_RW, 1, 2);
    bad_op.op = 42;
    let mut bad_type = guest_hdr(OP_REQUEST, 3, 4);
    bad_type.type_ = 2;

    guest.send(&bad_op, &[]);
    guest.send(&bad_type, &[]);
    let got = guest.recv_all();

    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|p| p.0.op == OP_RST));
}

#[test]
fn malformed_rx_buffers_are_returned_empty_and_packet_kept() {
    let dir = TempDir::new();
    let mut guest = Guest::unix(&dir.path("v.sock"), UnixBackendConfig::default());
    guest.send(&guest_hdr(OP_REQUEST, 5000, 4242), &[]);
    let ro = guest.alloc(4096);
    let small = guest.alloc(16);

    guest.rxq.add_chain(&guest.mem, &[(ro, 4096, false)]);
    guest.rxq.add_chain(&guest.mem, &[(small, 16, true)]);
    guest
        .rxq
        .add_chain(&guest.mem, &[(MEM_SIZE as u64 - 8, 4096, true)]);
    guest.give_rx(1, 4096);
    let used: Vec<_> = std::iter::from_fn(|| guest.rxq.pop_used(&guest.mem)).collect();

    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        vec![0, 0, 0, 44]
    );
}

#[test]
fn corrupt_avail_index_disables_the_queue_without_panic() {
    let (_dir, mut guest) = malformed_setup();

    guest.txq.set_avail_idx(&guest.mem, 1000);
    guest.kick_tx();
    guest.send(&guest_hdr(OP_RW, 1, 2), &[]);

    assert_eq!(guest.txq.used_pending(&guest.mem), 0);
    assert!(guest.recv().is_none());
}

#[test]
fn recording_backend_sees_only_checked_packets() {
    let mut guest = Guest::activate(Vsock::with_backend(CID, RecordingBackend::new()).unwrap());
    let mut bad = guest_hdr(OP_RW, 1, 2);
    bad.src_cid = 4;
    let mut rw = guest_hdr(OP_RW, 1, 2);
    rw.len = 3;

    guest.send(&bad, &[]);
    guest.send(&rw, b"abc");
    guest.send(&guest_hdr(OP_CREDIT_UPDATE, 1, 2), &[]);

    let dev = guest.dev.lock().unwrap();
    let sent = &dev.backend().sent;
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0], (rw, b"abc".to_vec()));
    assert!(dev.backend().resets.is_empty());
}

#[test]
fn recording_backend_packets_reach_rx_buffers() {
    let mut backend = RecordingBackend::new();
    let mut hdr = guest_hdr(OP_RW, 1, 2).rst_reply();
    hdr.op = OP_RW;
    hdr.len = 6;
    backend.to_guest.push_back((hdr, b"abcdef".to_vec()));
    let mut guest = Guest::activate(Vsock::with_backend(CID, backend).unwrap());

    guest.give_rx(1, 4096);
    let (got, data) = guest.recv().unwrap();

    assert_eq!(got, hdr);
    assert_eq!(data, b"abcdef");
}

#[test]
fn host_payload_is_split_to_fit_small_rx_buffers() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, UnixBackendConfig::default());
    guest.give_rx(1, 4096);
    let mut host = host_connect(&uds, 1024);
    guest.pump_until(Duration::from_secs(2), |g| g.rxq.used_pending(&g.mem) > 0);
    let (req, _) = guest.recv().unwrap();
    guest.send(&guest_hdr(OP_RESPONSE, 1024, req.src_port), &[]);
    read_line(&mut host);
    let payload: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();

    host.write_all(&payload).unwrap();
    let mut got = Vec::new();
    let done = guest.pump_until(Duration::from_secs(2), |g| {
        while let Some((h, d)) = g.recv() {
            assert!(d.len() <= 100);
            assert_eq!((h.op, h.dst_port), (OP_RW, 1024));
            got.extend(d);
        }
        if g.rxq.bufs.is_empty() {
            for _ in 0..4 {
                let a = g.alloc(144);
                g.rxq.add_chain(&g.mem, &[(a, 144, true)]);
            }
            g.kick_rx();
        }
        got.len() >= payload.len()
    });

    assert!(done);
    assert_eq!(got, payload);
}

#[test]
fn half_close_from_host_is_forwarded_as_shutdown_send() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, UnixBackendConfig::default());
    guest.give_rx(4, 4096);
    let mut host = host_connect(&uds, 1024);
    let req = guest.accept_request();
    read_line(&mut host);

    host.shutdown(std::net::Shutdown::Write).unwrap();
    let shut = guest.recv_op(OP_SHUTDOWN);
    let mut rw = guest_hdr(OP_RW, 1024, req.src_port);
    rw.len = 5;
    guest.send(&rw, b"after");
    let after = read_exact_n(&mut host, 5);

    assert_eq!(shut.last().unwrap().0.flags, SHUTDOWN_SEND);
    assert_eq!(after, b"after");
}

/// A guest that behaves like Linux: consumes what it receives, announces credit when its
/// free space runs low, and echoes everything back within the credit it was given.
#[test]
fn bulk_echo_through_host_connection_is_intact() {
    const GUEST_BUF: u32 = 256 * 1024;
    const SIZE: usize = 1 << 20;
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, UnixBackendConfig::default());
    let mut host = host_connect(&uds, 1024);
    let req = guest.accept_request();
    assert!(read_line(&mut host).starts_with("OK "));
    let payload: Vec<u8> = (0..SIZE as u32).map(|i| (i * 7 + i / 4096) as u8).collect();
    let to_send = payload.clone();
    let mut writer = host.try_clone().unwrap();
    let host_thread = std::thread::spawn(move || {
        writer.write_all(&to_send).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        host.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        host.read_to_end(&mut back).unwrap();
        back
    });

    let (mut received, mut pending_echo) = (Vec::new(), std::collections::VecDeque::new());
    let (mut announced, mut echoed, mut peer_buf, mut peer_fwd) = (0u32, 0u32, 0u32, 0u32);
    let (mut host_done, mut closed) = (false, false);
    let ok = guest.pump_until(Duration::from_secs(20), |g| {
        while let Some((h, d)) = g.recv() {
            peer_buf = h.buf_alloc;
            peer_fwd = h.fwd_cnt;
            match h.op {
                OP_RW => {
                    received.extend_from_slice(&d);
                    pending_echo.extend(d);
                }
                OP_SHUTDOWN => host_done = true,
                OP_RST => closed = true,
                _ => {}
            }
        }
        let consumed = received.len() as u32;
        if GUEST_BUF - (consumed - announced) < 64 * 1024 {
            g.credit_update(1024, req.src_port, GUEST_BUF, consumed);
            announced = consumed;
        }
        let credit = peer_buf.saturating_sub(echoed - peer_fwd) as usize;
        let n = credit.min(pending_echo.len()).min(64 * 1024);
        if n > 0 {
            let chunk: Vec<u8> = pending_echo.drain(..n).collect();
            let mut rw = guest_hdr(OP_RW, 1024, req.src_port);
            rw.buf_alloc = GUEST_BUF;
            rw.fwd_cnt = consumed;
            rw.len = n as u32;
            g.send(&rw, &chunk);
            echoed += n as u32;
            announced = consumed;
        }
        if host_done && pending_echo.is_empty() && !closed {
            let mut shut = guest_hdr(OP_SHUTDOWN, 1024, req.src_port);
            shut.flags = SHUTDOWN_BOTH;
            shut.fwd_cnt = consumed;
            g.send(&shut, &[]);
        }
        if g.rxq.bufs.len() < 32 {
            g.give_rx(32, 4096);
        }
        closed
    });
    let back = host_thread.join().unwrap();

    assert!(ok);
    assert_eq!(received.len(), SIZE);
    assert!(received == payload);
    assert!(back == payload);
    assert_eq!(guest.backend_counts().0, 0);
}
