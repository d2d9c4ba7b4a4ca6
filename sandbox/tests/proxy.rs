//! The policy proxy as a library, over real sockets on this machine's loopback: clients
//! and servers are threads of this test, names come from a hosts file, and loopback
//! destinations are opened with an explicit IP rule (`127.0.0.1`) where a test needs
//! them (see the special-address rule in the proxy's docs).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use policy::{Action, Egress, NetRule, Origin, Protocol};
use sandbox::proxy::{AuditLog, AuditRecord, HostsResolver, Proxy, ProxyConfig, Server};

const HOSTS: &str = "127.0.0.1 loop.test allowed.test a.wild.test a.b.c.wild.test wild.test \
                     bad.mix.test ok.mix.test\n\
                     169.254.169.254 meta.test\n\
                     10.255.255.1 private.test\n";

fn rules(list: &[&str], field: &str) -> Vec<NetRule> {
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            let spec = policy::parse_rule(s).unwrap();
            NetRule {
                target: spec.target,
                ports: spec.ports,
                protocol: Protocol::Tcp,
                origin: Origin::Field(format!("{field}[{i}]")),
            }
        })
        .collect()
}

fn egress(allow: &[&str], deny: &[&str]) -> Egress {
    Egress {
        default: Action::Deny,
        allow: rules(allow, "network.egress.allow"),
        deny: rules(deny, "network.egress.deny"),
    }
}

/// A temp file path removed on drop.
struct TempPath(std::path::PathBuf);

impl TempPath {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        Self(std::env::temp_dir().join(format!("mxc-proxy-test-{tag}-{}-{n}", std::process::id())))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A proxy on 127.0.0.1 with an audit log.
struct Harness {
    proxy: Proxy,
    server: Option<Server>,
    addr: std::net::SocketAddr,
    audit: TempPath,
}

impl Harness {
    fn new(egress: Egress, tweak: impl FnOnce(&mut ProxyConfig)) -> Self {
        let audit = TempPath::new("audit");
        let mut config = ProxyConfig::from_policy(
            "test-sandbox",
            &policy::Network {
                egress,
                ..policy::Network::default()
            },
            &policy::Limits::default(),
        );
        config.resolver = Arc::new(HostsResolver::parse(HOSTS, "hosts").unwrap());
        config.audit = Some(Arc::new(AuditLog::open(&audit.0).unwrap()));
        tweak(&mut config);
        let proxy = Proxy::new(config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = proxy.serve(listener).unwrap();
        Self {
            proxy,
            server: Some(server),
            addr,
            audit,
        }
    }

    fn client(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// Shuts the proxy down and returns its audit lines.
    fn finish(mut self) -> Vec<AuditRecord> {
        if let Some(s) = self.server.take() {
            s.stop();
        }
        self.proxy.shutdown();
        std::fs::read_to_string(&self.audit.0)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Reads a response head (through the blank line) byte by byte.
fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn connect_via(h: &Harness, target: &str) -> (TcpStream, String) {
    let mut s = h.client();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let head = read_head(&mut s);
    (s, head)
}

/// Opens a tunnel to `allowed.test:port` and passes its gate (a ClientHello naming the
/// host, echoed back), so any bytes follow.
fn open_tunnel(h: &Harness, port: u16) -> (TcpStream, String) {
    let (mut s, head) = connect_via(h, &format!("allowed.test:{port}"));
    if head.starts_with("HTTP/1.1 200") {
        let hello = client_hello("allowed.test");
        s.write_all(&hello).unwrap();
        let mut back = vec![0u8; hello.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, hello);
    }
    (s, head)
}

/// An echo server on 127.0.0.1; counts connections and bytes it received.
struct Echo {
    port: u16,
    connections: Arc<AtomicUsize>,
    received: Arc<AtomicUsize>,
}

fn echo_server() -> Echo {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let (c, r) = (connections.clone(), received.clone());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            c.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            r.fetch_add(n, Ordering::SeqCst);
                            if s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    Echo {
        port,
        connections,
        received,
    }
}

/// An HTTP server on 127.0.0.1 that records each raw request and answers with its
/// length, then closes.
fn http_server() -> (u16, Arc<Mutex<Vec<Vec<u8>>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let seen = s2.clone();
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                let mut all = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    all.extend_from_slice(&buf[..n]);
                }
                let body = format!("got {} bytes", all.len());
                seen.lock().unwrap().push(all);
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    (port, seen)
}

/// A minimal TLS ClientHello record naming `sni`.
fn client_hello(sni: &str) -> Vec<u8> {
    let n = sni.as_bytes();
    let mut ext = vec![0x00, 0x00];
    ext.extend_from_slice(&((n.len() + 5) as u16).to_be_bytes());
    ext.extend_from_slice(&((n.len() + 3) as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(n.len() as u16).to_be_bytes());
    ext.extend_from_slice(n);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[1u8; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn an_allowed_name_tunnels_to_its_server() {
    let echo = echo_server();
    let h = Harness::new(egress(&["allowed.test", "127.0.0.1"], &[]), |_| {});

    let (mut s, head) = open_tunnel(&h, echo.port);
    s.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).unwrap();
    drop(s);
    let audit = h.finish();

    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(&back, b"ping");
    assert_eq!(audit.len(), 1);
    let a = &audit[0];
    assert_eq!(
        (a.kind.as_str(), a.host.as_str(), a.action.as_str()),
        ("connect", "allowed.test", "allow")
    );
    assert_eq!(a.rule, "network.egress.allow[0] allowed.test");
    assert_eq!(
        a.address_rule.as_deref(),
        Some("network.egress.allow[1] 127.0.0.1")
    );
    assert_eq!(a.resolved, Some(format!("127.0.0.1:{}", echo.port)));
    let hello = client_hello("allowed.test").len() as u64;
    assert_eq!((a.bytes_up, a.bytes_down), (hello + 4, hello + 4));
    assert_eq!(a.sandbox, "test-sandbox");
}

#[test]
fn denied_hosts_get_403_with_the_rule() {
    let h = Harness::new(egress(&["*.mix.test"], &["bad.mix.test"]), |_| {});

    let (_s1, by_rule) = connect_via(&h, "bad.mix.test:443");
    let (_s2, by_default) = connect_via(&h, "elsewhere.test:443");
    let audit = h.finish();

    assert!(by_rule.starts_with("HTTP/1.1 403 Forbidden"), "{by_rule}");
    assert_eq!(
        header(&by_rule, "X-Mxc-Deny"),
        Some("network.egress.deny[0] bad.mix.test")
    );
    assert_eq!(header(&by_default, "X-Mxc-Deny"), Some("default deny"));
    assert_eq!(audit.len(), 2);
    assert!(audit.iter().all(|a| a.action == "deny" && a.status == 403));
}

#[test]
fn wildcards_match_any_depth_but_not_the_apex() {
    let echo = echo_server();
    let h = Harness::new(egress(&["*.wild.test", "127.0.0.1"], &[]), |_| {});

    let one = connect_via(&h, &format!("a.wild.test:{}", echo.port)).1;
    let three = connect_via(&h, &format!("a.b.c.wild.test:{}", echo.port)).1;
    let apex = connect_via(&h, &format!("wild.test:{}", echo.port)).1;
    h.finish();

    assert!(one.starts_with("HTTP/1.1 200"), "{one}");
    assert!(three.starts_with("HTTP/1.1 200"), "{three}");
    assert!(apex.starts_with("HTTP/1.1 403"), "{apex}");
}

#[test]
fn port_scoped_rules_allow_only_their_port() {
    let echo = echo_server();
    let other = echo_server();
    let rule = format!("allowed.test:{}", echo.port);
    let h = Harness::new(egress(&[&rule, "127.0.0.1"], &[]), |_| {});

    let yes = connect_via(&h, &format!("allowed.test:{}", echo.port)).1;
    let no = connect_via(&h, &format!("allowed.test:{}", other.port)).1;
    h.finish();

    assert!(yes.starts_with("HTTP/1.1 200"), "{yes}");
    assert!(no.starts_with("HTTP/1.1 403"), "{no}");
    assert_eq!(other.connections.load(Ordering::SeqCst), 0);
}

#[test]
fn names_resolving_to_special_addresses_are_refused() {
    let echo = echo_server();
    let h = Harness::new(
        egress(&["loop.test", "meta.test", "private.test"], &[]),
        |_| {},
    );

    let lo = connect_via(&h, &format!("loop.test:{}", echo.port)).1;
    let meta = connect_via(&h, "meta.test:80").1;
    let private = connect_via(&h, "private.test:80").1;
    let literal = connect_via(&h, &format!("[::1]:{}", echo.port)).1;
    h.finish();

    assert_eq!(
        header(&lo, "X-Mxc-Deny"),
        Some("loopback-address 127.0.0.1")
    );
    assert_eq!(
        header(&meta, "X-Mxc-Deny"),
        Some("metadata-address 169.254.169.254")
    );
    assert_eq!(
        header(&private, "X-Mxc-Deny"),
        Some("private-address 10.255.255.1")
    );
    assert_eq!(header(&literal, "X-Mxc-Deny"), Some("default deny"));
    assert_eq!(echo.connections.load(Ordering::SeqCst), 0);
}

#[test]
fn tls_with_another_server_name_is_refused() {
    let echo = echo_server();
    let h = Harness::new(egress(&["allowed.test", "127.0.0.1"], &[]), |_| {});

    let (mut bad, head) = connect_via(&h, &format!("allowed.test:{}", echo.port));
    bad.write_all(&client_hello("evil.test")).unwrap();
    let mut alert = Vec::new();
    let _ = bad.read_to_end(&mut alert);
    let (mut good, _) = connect_via(&h, &format!("allowed.test:{}", echo.port));
    let hello = client_hello("Allowed.Test");
    good.write_all(&hello).unwrap();
    let mut echoed = vec![0u8; hello.len()];
    good.read_exact(&mut echoed).unwrap();
    drop(good);
    std::thread::sleep(Duration::from_millis(100));
    let audit = h.finish();

    assert!(head.starts_with("HTTP/1.1 200"));
    assert_eq!(
        alert,
        vec![0x15, 3, 1, 0, 2, 2, 49],
        "a TLS access_denied alert"
    );
    assert_eq!(echoed, hello);
    assert_eq!(echo.received.load(Ordering::SeqCst), hello.len());
    let bad_line = audit.iter().find(|a| a.action == "deny").unwrap();
    assert_eq!(bad_line.rule, "sni-mismatch evil.test");
}

#[test]
fn plain_http_is_forwarded_in_origin_form_and_nothing_follows_it() {
    let (port, seen) = http_server();
    let h = Harness::new(egress(&["allowed.test", "127.0.0.1"], &[]), |_| {});
    let mut s = h.client();

    write!(
        s,
        "POST http://allowed.test:{port}/up?x=1 HTTP/1.1\r\nHost: allowed.test:{port}\r\n\
         Proxy-Connection: keep-alive\r\nContent-Length: 5\r\n\r\nhello\
         GET http://evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let audit = h.finish();

    let got = String::from_utf8(seen.lock().unwrap()[0].clone()).unwrap();
    assert_eq!(
        got,
        format!(
            "POST /up?x=1 HTTP/1.1\r\nHost: allowed.test:{port}\r\nContent-Length: 5\r\n\
             Connection: close\r\n\r\nhello"
        )
    );
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].kind, "http");
}

#[test]
fn chunked_request_bodies_pass_whole() {
    let (port, seen) = http_server();
    let h = Harness::new(egress(&["allowed.test", "127.0.0.1"], &[]), |_| {});
    let mut s = h.client();
    let body = "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";

    write!(
        s,
        "PUT http://allowed.test:{port}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{body}junk"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    h.finish();

    let got = String::from_utf8(seen.lock().unwrap()[0].clone()).unwrap();
    assert!(got.ends_with(&format!("\r\n\r\n{body}")), "{got}");
    assert!(reply.starts_with("HTTP/1.1 200"));
}

#[test]
fn a_host_header_for_another_host_is_refused() {
    let (port, seen) = http_server();
    let h = Harness::new(egress(&["allowed.test", "127.0.0.1"], &[]), |_| {});
    let mut s = h.client();

    write!(
        s,
        "GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: evil.test\r\n\r\n"
    )
    .unwrap();
    let reply = read_head(&mut s);
    h.finish();

    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert_eq!(header(&reply, "X-Mxc-Deny"), Some("host-mismatch"));
    assert!(seen.lock().unwrap().is_empty());
}

#[test]
fn malformed_and_oversized_requests_are_refused() {
    let h = Harness::new(egress(&["allowed.test"], &[]), |c| {
        c.header_timeout = Duration::from_millis(300);
    });

    let mut garbage = h.client();
    garbage.write_all(b"\x16\x03\x01garbage\r\n\r\n").unwrap();
    let garbage_reply = read_head(&mut garbage);
    let mut big = h.client();
    let _ = big.write_all(&vec![b'A'; 20_000]);
    let big_reply = read_head(&mut big);
    let mut slow = h.client();
    slow.write_all(b"CONNECT allowed.test:443 HTTP/1.1\r\n")
        .unwrap();
    let slow_reply = read_head(&mut slow);
    let audit = h.finish();

    assert!(garbage_reply.starts_with("HTTP/1.1 400"), "{garbage_reply}");
    assert!(big_reply.starts_with("HTTP/1.1 400"), "{big_reply}");
    assert!(slow_reply.starts_with("HTTP/1.1 400"), "{slow_reply}");
    assert_eq!(audit.len(), 3);
}

#[test]
fn the_connection_limit_refuses_with_503() {
    let echo = echo_server();
    let h = Harness::new(egress(&["allowed.test", "127.0.0.1"], &[]), |c| {
        c.max_connections = 2;
    });

    let a = connect_via(&h, &format!("allowed.test:{}", echo.port));
    let b = connect_via(&h, &format!("allowed.test:{}", echo.port));
    let c = connect_via(&h, &format!("allowed.test:{}", echo.port));
    drop((a, b));
    let audit = h.finish();

    assert!(c.1.starts_with("HTTP/1.1 503"), "{}", c.1);
    assert_eq!(header(&c.1, "X-Mxc-Deny"), Some("limits.maxConnections"));
    assert_eq!(audit.len(), 3);
}

#[test]
fn idle_tunnels_are_closed() {
    let echo = echo_server();
    let h = Harness::new(egress(&["allowed.test", "127.0.0.1"], &[]), |c| {
        c.idle_timeout = Duration::from_millis(300);
    });

    let (mut s, _) = connect_via(&h, &format!("allowed.test:{}", echo.port));
    let start = Instant::now();
    let mut buf = [0u8; 1];
    let n = s.read(&mut buf).unwrap();
    let waited = start.elapsed();
    let audit = h.finish();

    assert_eq!(n, 0, "the proxy closed the tunnel");
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert!(audit[0].reason.as_deref().unwrap().contains("idle"));
}

#[test]
fn bandwidth_is_capped_by_the_token_bucket() {
    let echo = echo_server();
    let h = Harness::new(egress(&["allowed.test", "127.0.0.1"], &[]), |c| {
        c.bandwidth_bps = Some(1 << 20);
    });
    let (s, _) = open_tunnel(&h, echo.port);
    let mut reader = s.try_clone().unwrap();
    let total = 1usize << 20;

    let start = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut s = s;
        s.write_all(&vec![7u8; total]).unwrap();
    });
    let mut got = 0;
    let mut buf = vec![0u8; 65536];
    while got < total {
        got += reader.read(&mut buf).unwrap();
    }
    let took = start.elapsed();
    writer.join().unwrap();
    h.finish();

    // 1 MiB up and 1 MiB back at 1 MiB/s in all, less a 256 KiB burst: at least 1.5 s.
    assert!(took >= Duration::from_millis(1500), "{took:?}");
}

#[test]
fn many_concurrent_tunnels_stay_separate() {
    let echo = echo_server();
    let h = Harness::new(egress(&["allowed.test", "127.0.0.1"], &[]), |_| {});
    let n = 250;

    let mut open: Vec<TcpStream> = (0..n)
        .map(|_| {
            let (s, head) = open_tunnel(&h, echo.port);
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            s
        })
        .collect();
    let active = h.proxy.stats().active;
    for (i, s) in open.iter_mut().enumerate() {
        write!(s, "message {i:05}").unwrap();
    }
    let mut ok = 0;
    for (i, s) in open.iter_mut().enumerate() {
        let mut back = [0u8; 13];
        s.read_exact(&mut back).unwrap();
        if back == *format!("message {i:05}").as_bytes() {
            ok += 1;
        }
    }
    drop(open);
    let audit = h.finish();

    assert_eq!(active, n);
    assert_eq!(ok, n);
    assert_eq!(audit.len(), n);
}

#[test]
fn tunnels_chain_through_an_upstream_proxy() {
    let echo = echo_server();
    let upstream = Harness::new(egress(&["allowed.test", "127.0.0.1"], &[]), |_| {});
    let up_url = format!("http://{}", upstream.addr);
    // allowed.test resolves to loopback here: our proxy checks the addresses before it
    // hands the name on, so loopback needs its IP rule, as without an upstream.
    let h = Harness::new(egress(&["allowed.test", "127.0.0.1"], &[]), |c| {
        c.upstream = Some(up_url.clone());
    });

    let (mut s, head) = open_tunnel(&h, echo.port);
    s.write_all(b"chained").unwrap();
    let mut back = [0u8; 7];
    s.read_exact(&mut back).unwrap();
    drop(s);
    let (_d, denied) = connect_via(&h, "evil.test:443");
    let ours = h.finish();
    let theirs = upstream.finish();

    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(&back, b"chained");
    assert!(denied.starts_with("HTTP/1.1 403"));
    let allowed = ours.iter().find(|a| a.action == "allow").unwrap();
    assert_eq!(allowed.resolved, Some(format!("via {up_url}")));
    assert_eq!(
        theirs.len(),
        1,
        "the denied host never reached the upstream"
    );
    assert_eq!(theirs[0].host, "allowed.test");
}

#[test]
fn an_upstream_that_refuses_gives_502() {
    let upstream = Harness::new(egress(&[], &[]), |_| {});
    let up_url = format!("http://{}", upstream.addr);
    let h = Harness::new(egress(&["allowed.test", "127.0.0.1"], &[]), |c| {
        c.upstream = Some(up_url);
    });

    let (_s, head) = connect_via(&h, "allowed.test:443");
    h.finish();
    upstream.finish();

    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert_eq!(header(&head, "X-Mxc-Error"), Some("upstream-refused"));
}

#[test]
fn shutdown_ends_open_tunnels_and_logs_them() {
    let echo = echo_server();
    let h = Harness::new(egress(&["allowed.test", "127.0.0.1"], &[]), |_| {});
    let (mut s, _) = connect_via(&h, &format!("allowed.test:{}", echo.port));

    let audit = h.finish();
    let mut buf = [0u8; 1];
    let after = s.read(&mut buf);

    assert!(matches!(after, Ok(0) | Err(_)));
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].reason.as_deref(), Some("the sandbox stopped"));
}

#[test]
fn an_accepted_stream_of_any_kind_can_be_served() {
    let echo = echo_server();
    let audit = TempPath::new("stream");
    let mut config = ProxyConfig::from_policy(
        "s",
        &policy::Network {
            egress: egress(&["allowed.test", "127.0.0.1"], &[]),
            ..policy::Network::default()
        },
        &policy::Limits::default(),
    );
    config.resolver = Arc::new(HostsResolver::parse(HOSTS, "hosts").unwrap());
    config.audit = Some(Arc::new(AuditLog::open(&audit.0).unwrap()));
    let proxy = Proxy::new(config).unwrap();
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();

    let p = proxy.clone();
    let t = std::thread::spawn(move || p.serve_connection(OwnedFd::from(theirs)));
    write!(
        ours,
        "CONNECT allowed.test:{} HTTP/1.1\r\n\r\nGET /unix HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        echo.port
    )
    .unwrap();
    ours.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    ours.read_to_string(&mut reply).unwrap();
    t.join().unwrap();
    proxy.shutdown();

    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.ends_with("\r\n\r\nGET /unix HTTP/1.1\r\nHost: allowed.test\r\n\r\n"),
        "{reply}"
    );
    assert_eq!(
        std::fs::read_to_string(&audit.0).unwrap().lines().count(),
        1
    );
}

#[test]
fn a_client_hello_sent_with_the_connect_is_checked_too() {
    let echo = echo_server();
    let h = Harness::new(egress(&["allowed.test", "127.0.0.1"], &[]), |_| {});
    let mut s = h.client();

    let mut bytes = format!("CONNECT allowed.test:{} HTTP/1.1\r\n\r\n", echo.port).into_bytes();
    bytes.extend_from_slice(&client_hello("evil.test"));
    s.write_all(&bytes).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let audit = h.finish();

    assert!(reply.ends_with(&[0x15, 3, 1, 0, 2, 2, 49]), "{reply:?}");
    assert_eq!(echo.received.load(Ordering::SeqCst), 0);
    assert_eq!(audit[0].rule, "sni-mismatch evil.test");
}

#[test]
fn hostile_request_bytes_never_take_the_proxy_down() {
    let echo = echo_server();
    let h = Harness::new(egress(&["allowed.test", "127.0.0.1"], &[]), |c| {
        c.header_timeout = Duration::from_millis(200);
    });
    let pieces: [&[u8]; 12] = [
        b"CONNECT ",
        b"GET ",
        b"http://allowed.test/",
        b" HTTP/1.1",
        b"\r\n",
        b"Host: allowed.test\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Content-Length: 99999999999999999999\r\n",
        b"\x00\xff\x16\x03",
        b"[::1]:0",
        b"\r\n\r\n",
        b":",
    ];
    let mut seed = 0x2545_f491_4f6c_dd1du64;

    for _ in 0..200 {
        let mut s = h.client();
        let mut req = Vec::new();
        for _ in 0..(seed % 9) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            req.extend_from_slice(pieces[(seed % pieces.len() as u64) as usize]);
        }
        let _ = s.write_all(&req);
        let _ = s.shutdown(Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    let (mut ok, head) = open_tunnel(&h, echo.port);
    ok.write_all(b"still here").unwrap();
    let mut back = [0u8; 10];
    ok.read_exact(&mut back).unwrap();
    drop(ok);
    let audit = h.finish();

    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(&back, b"still here");
    assert_eq!(audit.len(), 201);
}

/// Sends `bytes` through a tunnel to `allowed.test` and reads what comes back until the
/// proxy closes it.
fn through_tunnel(h: &Harness, port: u16, bytes: &[u8]) -> Vec<u8> {
    let (mut s, head) = connect_via(h, &format!("allowed.test:{port}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    back
}

#[test]
fn a_tunnel_to_a_name_carries_only_what_shows_that_name() {
    let echo = echo_server();
    let h = Harness::new(egress(&["allowed.test", "127.0.0.1"], &[]), |_| {});

    // TLS without a server name: where it goes cannot be checked.
    let mut no_sni = client_hello("x");
    {
        // Drop the server_name extension: the extensions block becomes empty.
        let ext_len = 2 + 10;
        let cut = no_sni.len() - ext_len;
        no_sni.truncate(cut);
        no_sni.extend_from_slice(&[0, 0]);
        let hs_len = no_sni.len() - 9;
        no_sni[6..9].copy_from_slice(&(hs_len as u32).to_be_bytes()[1..]);
        let rec_len = (no_sni.len() - 5) as u16;
        no_sni[3..5].copy_from_slice(&rec_len.to_be_bytes());
    }
    let alert = through_tunnel(&h, echo.port, &no_sni);
    // Another protocol (here SSH's greeting): nothing names a host.
    let ssh = through_tunnel(&h, echo.port, b"SSH-2.0-OpenSSH_9.2\r\n");
    // Plain HTTP for another host through a tunnel to an allowed one (domain fronting).
    let fronted = through_tunnel(
        &h,
        echo.port,
        b"GET / HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n",
    );
    // An absolute target naming another host than the Host header.
    let split = through_tunnel(
        &h,
        echo.port,
        b"GET http://evil.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
    );
    let before = echo.received.load(Ordering::SeqCst);
    // Plain HTTP whose Host is the tunnel's host passes, its body with it ...
    let good = b"POST /ok HTTP/1.1\r\nHost: Allowed.Test:80\r\nContent-Length: 3\r\n\r\nabc";
    let passed = {
        let (mut s, _) = connect_via(&h, &format!("allowed.test:{}", echo.port));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(good).unwrap();
        let mut back = vec![0u8; good.len()];
        s.read_exact(&mut back).unwrap();
        // ... and a second request on the same tunnel (its Host unchecked) ends it.
        s.write_all(b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
            .unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        (back, String::from_utf8_lossy(&rest).into_owned())
    };
    std::thread::sleep(Duration::from_millis(100));
    let audit = h.finish();

    assert_eq!(
        alert,
        vec![0x15, 3, 1, 0, 2, 2, 49],
        "a TLS access_denied alert"
    );
    assert!(ssh.is_empty(), "{ssh:?}");
    let fronted = String::from_utf8_lossy(&fronted);
    assert!(
        fronted.starts_with("HTTP/1.1 403 Forbidden\r\n"),
        "{fronted}"
    );
    assert!(
        fronted.contains("X-Mxc-Deny: tunnel-host-mismatch"),
        "{fronted}"
    );
    assert!(fronted.contains("is for \"evil.test\""), "{fronted}");
    let split = String::from_utf8_lossy(&split);
    assert!(split.contains("X-Mxc-Deny: tunnel-unchecked"), "{split}");
    assert_eq!(before, 0, "nothing refused reached the server");
    assert_eq!(passed.0, good);
    assert!(
        passed.1.contains("X-Mxc-Deny: tunnel-second-request"),
        "{}",
        passed.1
    );
    assert_eq!(echo.received.load(Ordering::SeqCst), good.len());
    let rules: Vec<&str> = audit.iter().map(|a| a.rule.as_str()).collect();
    for rule in [
        "tls-no-sni",
        "tunnel-unchecked",
        "tunnel-host-mismatch",
        "tunnel-second-request",
    ] {
        assert!(rules.contains(&rule), "{rule} in {rules:?}");
    }
}

#[test]
fn a_tunnel_to_an_address_rule_carries_any_protocol() {
    let echo = echo_server();
    let h = Harness::new(egress(&["127.0.0.1"], &[]), |_| {});
    let (mut s, head) = connect_via(&h, &format!("127.0.0.1:{}", echo.port));
    s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
    let mut back = [0u8; 21];
    s.read_exact(&mut back).unwrap();
    drop(s);
    h.finish();

    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(&back, b"SSH-2.0-OpenSSH_9.2\r\n");
}
