//! The hybrid-vsock protocol as a host tool sees it: a plain Unix-socket client.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::*;
use crate::devices::vsock::packet::{OP_RESPONSE, OP_RST};
use crate::devices::vsock::unix::FIRST_LOCAL_PORT;

fn client(uds: &Path) -> UnixStream {
    let s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

/// Everything the device sends the client until it closes the socket.
fn read_until_closed(guest: &mut Guest<UnixBackend>, s: &mut UnixStream) -> Vec<u8> {
    s.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut closed = false;
    guest.pump_until(Duration::from_secs(3), |_| {
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    return true;
                }
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => return false,
            }
        }
    });
    assert!(closed, "socket still open; received {out:?}");
    out
}

fn fast_config() -> UnixBackendConfig {
    UnixBackendConfig {
        handshake_timeout: Duration::from_millis(100),
        response_timeout: Duration::from_millis(100),
        timer_tick: Duration::from_millis(20),
        ..UnixBackendConfig::default()
    }
}

#[test]
fn connect_gets_ok_with_host_port() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, UnixBackendConfig::default());
    let mut s = client(&uds);

    s.write_all(b"CONNECT 1024\n").unwrap();
    let req = guest.accept_request();
    let mut line = [0u8; 14];
    s.read_exact(&mut line).unwrap();

    assert_eq!(req.dst_port, 1024);
    assert_eq!(&line, format!("OK {FIRST_LOCAL_PORT}\n").as_bytes());
}

#[test]
fn host_ports_are_distinct_per_connection() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, UnixBackendConfig::default());
    let mut a = client(&uds);
    let mut b = client(&uds);

    a.write_all(b"CONNECT 52\n").unwrap();
    let first = guest.accept_request();
    b.write_all(b"CONNECT 52\n").unwrap();
    let second = guest.accept_request();

    assert_ne!(first.src_port, second.src_port);
    assert_eq!(guest.backend_counts().0, 2);
}

#[test]
fn bytes_after_the_line_reach_the_guest_after_ok() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, UnixBackendConfig::default());
    let mut s = client(&uds);

    s.write_all(b"CONNECT 7\nearly").unwrap();
    guest.accept_request();
    let got = guest.recv_op(OP_RW);

    assert_eq!(got.last().unwrap().1, b"early");
}

#[test]
fn garbage_line_is_closed_without_bothering_the_guest() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, UnixBackendConfig::default());
    guest.give_rx(4, 4096);
    let mut s = client(&uds);

    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let reply = read_until_closed(&mut guest, &mut s);

    assert!(reply.is_empty());
    assert!(guest.recv().is_none());
    assert_eq!(guest.backend_counts(), (0, 0, 0));
}

#[test]
fn lowercase_and_bad_ports_are_closed() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, UnixBackendConfig::default());
    let lines: [&[u8]; 4] = [
        b"connect 52\n",
        b"CONNECT x\n",
        b"CONNECT 4294967296\n",
        b"CONNECT \n",
    ];

    for line in lines {
        let mut s = client(&uds);
        s.write_all(line).unwrap();
        assert!(read_until_closed(&mut guest, &mut s).is_empty());
    }

    assert_eq!(guest.backend_counts(), (0, 0, 0));
}

#[test]
fn over_long_line_is_closed() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, UnixBackendConfig::default());
    let mut s = client(&uds);

    s.write_all(&[b'C'; 4096]).unwrap();
    let reply = read_until_closed(&mut guest, &mut s);

    assert!(reply.is_empty());
    assert_eq!(guest.backend_counts(), (0, 0, 0));
}

#[test]
fn over_long_digits_are_closed() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, UnixBackendConfig::default());
    let mut s = client(&uds);

    s.write_all(b"CONNECT 0000000000000000000000000000000000052\n")
        .unwrap();

    assert!(read_until_closed(&mut guest, &mut s).is_empty());
}

#[test]
fn refused_port_closes_the_host_socket() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, UnixBackendConfig::default());
    let mut s = client(&uds);

    s.write_all(b"CONNECT 4444\n").unwrap();
    let req = guest.recv_op(OP_REQUEST).last().unwrap().0;
    guest.send(&guest_hdr(OP_RST, req.dst_port, req.src_port), &[]);
    let reply = read_until_closed(&mut guest, &mut s);

    assert!(reply.is_empty());
    assert_eq!(guest.backend_counts().0, 0);
}

#[test]
fn half_open_handshake_times_out() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, fast_config());
    let mut s = client(&uds);

    s.write_all(b"CONN").unwrap();
    let reply = read_until_closed(&mut guest, &mut s);

    assert!(reply.is_empty());
    assert_eq!(guest.backend_counts(), (0, 0, 0));
}

#[test]
fn silent_client_times_out() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, fast_config());
    let mut s = client(&uds);

    let reply = read_until_closed(&mut guest, &mut s);

    assert!(reply.is_empty());
}

#[test]
fn unanswered_request_times_out_and_resets_guest() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, fast_config());
    let mut s = client(&uds);

    s.write_all(b"CONNECT 52\n").unwrap();
    let req = guest.recv_op(OP_REQUEST).last().unwrap().0;
    let reply = read_until_closed(&mut guest, &mut s);
    let rst = guest.recv_op(OP_RST).last().unwrap().0;

    assert!(reply.is_empty());
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 52));
    assert_eq!(guest.backend_counts().0, 0);
}

#[test]
fn late_response_after_timeout_gets_rst() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, fast_config());
    let mut s = client(&uds);
    s.write_all(b"CONNECT 52\n").unwrap();
    let req = guest.recv_op(OP_REQUEST).last().unwrap().0;
    read_until_closed(&mut guest, &mut s);
    guest.recv_op(OP_RST);

    guest.send(&guest_hdr(OP_RESPONSE, 52, req.src_port), &[]);
    let rst = guest.recv_op(OP_RST);

    assert_eq!(rst.last().unwrap().0.dst_port, 52);
}

#[test]
fn handshake_limit_closes_extra_clients() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let config = UnixBackendConfig {
        max_handshakes: 3,
        ..UnixBackendConfig::default()
    };
    let mut guest = Guest::unix(&uds, config);
    let clients: Vec<UnixStream> = (0..3).map(|_| client(&uds)).collect();
    guest.pump();

    let mut extra = client(&uds);
    let reply = read_until_closed(&mut guest, &mut extra);

    assert!(reply.is_empty());
    assert_eq!(guest.backend_counts().1, 3);
    drop(clients);
}

#[test]
fn client_hanging_up_before_response_resets_guest() {
    let dir = TempDir::new();
    let uds = dir.path("v.sock");
    let mut guest = Guest::unix(&uds, UnixBackendConfig::default());
    let mut s = client(&uds);
    s.write_all(b"CONNECT 52\n").unwrap();
    let req = guest.recv_op(OP_REQUEST).last().unwrap().0;

    drop(s);
    let rst = guest.recv_op(OP_RST).last().unwrap().0;

    assert_eq!(rst.src_port, req.src_port);
    assert_eq!(guest.backend_counts().0, 0);
}
