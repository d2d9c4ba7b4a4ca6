//! The guest's one way out: a relay from `127.0.0.1:PORT` to the host's network policy
//! proxy.
//!
//! The VM has no network device. When the host runs a policy proxy for the sandbox, it
//! passes `mxc.proxy_port=N` on the kernel command line, and the agent listens on
//! 127.0.0.1:N inside the guest. Each accepted connection is relayed, byte for byte and
//! in both directions, to vsock CID 2 port [`proto::PROXY_VSOCK_PORT`], where the VMM
//! hands it to the host proxy's Unix listener (`<vsock.sock>_1080`). Commands find it
//! through the proxy variables the host puts in their environment.
//!
//! The host proxy decides every connection; this relay never reads the bytes it carries.
//! It refuses early only when it cannot do its job: more than its connection limit at
//! once (HTTP 503), or a host proxy that does not answer (HTTP 502), each with an
//! `X-Mxc-Error` header.
//!
//! Everything is bounded: at most [`MAX_FORWARDS`] connections, each with one
//! [`FORWARD_BUF`]-byte buffer per direction. A direction reads only while its buffer has
//! room, so a slow reader slows its writer. Half-close is carried over: the end of one
//! side's data becomes `shutdown(SHUT_WR)` on the other once everything before it is
//! written, and a connection ends when both directions have ended (or at once when a
//! side fails while being read).
//!
//! It runs inside the agent's single-threaded event loop: the forwarder owns an epoll
//! instance, the server watches that one descriptor and calls [`Forwarder::run_ready`]
//! when it is readable.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use crate::sys::{self, Epoll, StreamTarget, EV_IN, EV_OUT};

/// Connections relayed at once; more are answered with HTTP 503 and closed.
pub const MAX_FORWARDS: usize = 192;
/// Bytes buffered per direction of one connection.
pub const FORWARD_BUF: usize = 32 << 10;
/// How long the host proxy may take to accept a vsock connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read/write rounds per connection per call, so one busy connection cannot hold up the
/// agent's event loop (epoll is level-triggered: the rest comes on the next turn).
const ROUNDS: usize = 8;
/// Accepts per listener event.
const ACCEPT_BATCH: usize = 16;

/// The epoll token of the listener; connection tokens are `id << 1 | side`, ids ≥ 1.
const LISTENER: u64 = 0;

const UNREACHABLE: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\n\
X-Mxc-Error: the host network proxy is unreachable from the guest\r\n\
Content-Length: 0\r\nConnection: close\r\n\r\n";

const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
X-Mxc-Error: too many connections through the guest's proxy forwarder\r\n\
Content-Length: 0\r\nConnection: close\r\n\r\n";

/// One socket of a relayed connection and what it is watched for.
struct Side {
    fd: OwnedFd,
    token: u64,
    interest: u32,
}

impl Side {
    fn set_interest(&mut self, epoll: &Epoll, interest: u32) {
        if self.interest == interest {
            return;
        }
        let fd = self.fd.as_raw_fd();
        let result = match (self.interest, interest) {
            (0, new) => epoll.add(fd, self.token, new),
            (_, 0) => epoll.delete(fd),
            (_, new) => epoll.modify(fd, self.token, new),
        };
        if result.is_ok() {
            self.interest = interest;
        }
    }
}

/// What reading one side gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    Nothing,
    Progress,
    /// The side failed (e.g. reset): the whole connection ends.
    Failed,
}

/// One direction of a connection: bytes read from its source, not yet written to its
/// destination.
struct Flow {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The source has no more data.
    eof: bool,
    /// The destination has been told (`SHUT_WR`), or cannot take more: nothing more
    /// will happen in this direction once `eof` is set too.
    shut: bool,
}

impl Flow {
    fn new() -> Self {
        Self {
            buf: vec![0u8; FORWARD_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            shut: false,
        }
    }

    fn pending(&self) -> usize {
        self.end - self.start
    }

    /// Wants to read from its source.
    fn wants_read(&self) -> bool {
        !self.eof && self.pending() < self.buf.len()
    }

    fn finished(&self) -> bool {
        self.eof && self.shut
    }

    /// Reads what the source has, as far as the buffer has room.
    fn fill(&mut self, src: &OwnedFd) -> Fill {
        if !self.wants_read() {
            return Fill::Nothing;
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        match sys::read(src, &mut self.buf[self.end..]) {
            Ok(0) => {
                self.eof = true;
                Fill::Progress
            }
            Ok(n) => {
                self.end += n;
                Fill::Progress
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Fill::Nothing,
            Err(_) => Fill::Failed,
        }
    }

    /// Writes what is buffered to the destination, then passes the source's EOF on.
    /// Returns whether anything changed.
    fn drain(&mut self, dst: &OwnedFd) -> bool {
        let mut progress = false;
        while self.start < self.end {
            match sys::write(dst, &self.buf[self.start..self.end]) {
                Ok(0) => return progress,
                Ok(n) => {
                    self.start += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return progress,
                Err(_) => {
                    // The destination is gone: nothing in this direction can arrive.
                    self.start = 0;
                    self.end = 0;
                    self.eof = true;
                    self.shut = true;
                    return true;
                }
            }
        }
        if self.eof && !self.shut {
            let _ = sys::shutdown(dst, libc::SHUT_WR);
            self.shut = true;
            progress = true;
        }
        progress
    }
}

/// One relayed connection: the guest program's TCP socket and the host proxy's stream.
struct Pair {
    client: Side,
    upstream: Side,
    /// The connection to the host proxy is not established yet.
    connecting: bool,
    /// Client → host proxy.
    up: Flow,
    /// Host proxy → client.
    down: Flow,
    /// Over: a side failed or the host proxy could not be reached.
    failed: bool,
}

impl Pair {
    fn done(&self) -> bool {
        self.failed || (self.up.finished() && self.down.finished())
    }

    /// Moves what can be moved without blocking.
    fn pump(&mut self) {
        if self.connecting {
            return;
        }
        for _ in 0..ROUNDS {
            let mut progress = false;
            for (flow, src, dst) in [
                (&mut self.up, &self.client.fd, &self.upstream.fd),
                (&mut self.down, &self.upstream.fd, &self.client.fd),
            ] {
                match flow.fill(src) {
                    Fill::Failed => {
                        self.failed = true;
                        return;
                    }
                    Fill::Progress => progress = true,
                    Fill::Nothing => {}
                }
                progress |= flow.drain(dst);
            }
            if !progress {
                return;
            }
        }
    }

    /// The connection to the host proxy finished (or failed).
    fn connected(&mut self) {
        match sys::take_socket_error(&self.upstream.fd) {
            Ok(None) => self.connecting = false,
            Ok(Some(_)) | Err(_) => {
                let _ = sys::write(&self.client.fd, UNREACHABLE);
                self.failed = true;
            }
        }
    }

    fn update_interests(&mut self, epoll: &Epoll) {
        let (client, upstream) = if self.connecting {
            (0, EV_OUT)
        } else {
            let mut client = 0;
            let mut upstream = 0;
            if self.up.wants_read() {
                client |= EV_IN;
            }
            if self.down.pending() > 0 {
                client |= EV_OUT;
            }
            if self.down.wants_read() {
                upstream |= EV_IN;
            }
            if self.up.pending() > 0 {
                upstream |= EV_OUT;
            }
            (client, upstream)
        };
        self.client.set_interest(epoll, client);
        self.upstream.set_interest(epoll, upstream);
    }

    /// Stops watching both sockets (before they close: a forked child may still hold a
    /// copy for a moment, which would keep them in the epoll set).
    fn unwatch(&mut self, epoll: &Epoll) {
        self.client.set_interest(epoll, 0);
        self.upstream.set_interest(epoll, 0);
    }
}

/// The relay: a listener on 127.0.0.1 and every connection it carries.
pub struct Forwarder {
    epoll: Epoll,
    listener: OwnedFd,
    port: u16,
    target: StreamTarget,
    max: usize,
    pairs: HashMap<u32, Pair>,
    next: u32,
    events: Vec<(u64, u32)>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("port", &self.port)
            .field("target", &self.target)
            .field("connections", &self.pairs.len())
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// Listens on 127.0.0.1:`port` (0: any free port) and relays to `target`.
    pub fn bind(port: u16, target: StreamTarget) -> io::Result<Self> {
        let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let listener = OwnedFd::from(listener);
        let epoll = Epoll::new()?;
        epoll.add(listener.as_raw_fd(), LISTENER, EV_IN)?;
        Ok(Self {
            epoll,
            listener,
            port,
            target,
            max: MAX_FORWARDS,
            pairs: HashMap::new(),
            next: 1,
            events: Vec::with_capacity(64),
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections being relayed now.
    #[cfg(test)]
    pub fn active(&self) -> usize {
        self.pairs.len()
    }

    /// A descriptor that is readable whenever [`Forwarder::run_ready`] has work (a
    /// duplicate of the forwarder's epoll instance, close-on-exec).
    pub fn ready_fd(&self) -> io::Result<OwnedFd> {
        self.epoll.as_fd().try_clone_to_owned()
    }

    /// Handles whatever is ready now, without waiting.
    pub fn run_ready(&mut self) -> io::Result<()> {
        self.turn(0)
    }

    /// Waits up to `timeout_ms` (-1: forever) for something to do, and does it.
    pub fn turn(&mut self, timeout_ms: i32) -> io::Result<()> {
        let mut events = std::mem::take(&mut self.events);
        let waited = self.epoll.wait(&mut events, timeout_ms);
        for &(token, ev) in &events {
            if token == LISTENER {
                self.accept();
            } else {
                self.on_event(token, ev);
            }
        }
        self.events = events;
        waited
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            let client = match sys::accept(&self.listener) {
                Ok(Some(fd)) => fd,
                Ok(None) | Err(_) => return,
            };
            if self.pairs.len() >= self.max {
                let _ = sys::write(&client, BUSY);
                continue;
            }
            // Small requests and replies should not wait for Nagle.
            let client = OwnedFd::from({
                let s = TcpStream::from(client);
                let _ = s.set_nodelay(true);
                s
            });
            let (upstream, connecting) =
                match sys::connect_nonblocking(&self.target, CONNECT_TIMEOUT) {
                    Ok(c) => c,
                    Err(_) => {
                        let _ = sys::write(&client, UNREACHABLE);
                        continue;
                    }
                };
            let id = self.next_id();
            let mut pair = Pair {
                client: Side {
                    fd: client,
                    token: u64::from(id) << 1,
                    interest: 0,
                },
                upstream: Side {
                    fd: upstream,
                    token: u64::from(id) << 1 | 1,
                    interest: 0,
                },
                connecting,
                up: Flow::new(),
                down: Flow::new(),
                failed: false,
            };
            pair.pump();
            pair.update_interests(&self.epoll);
            self.pairs.insert(id, pair);
        }
    }

    /// A connection id not in use (there are far fewer connections than ids).
    fn next_id(&mut self) -> u32 {
        loop {
            let id = self.next;
            self.next = self.next.checked_add(1).unwrap_or(1);
            if !self.pairs.contains_key(&id) {
                return id;
            }
        }
    }

    fn on_event(&mut self, token: u64, ev: u32) {
        let Ok(id) = u32::try_from(token >> 1) else {
            return;
        };
        let Some(pair) = self.pairs.get_mut(&id) else {
            return;
        };
        let upstream_side = token & 1 == 1;
        if pair.connecting && upstream_side && ev != 0 {
            pair.connected();
        }
        if !pair.failed {
            pair.pump();
        }
        if pair.done() {
            pair.unwatch(&self.epoll);
            self.pairs.remove(&id);
        } else {
            pair.update_interests(&self.epoll);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::thread::JoinHandle;
    use std::time::Instant;

    static NEXT: AtomicU32 = AtomicU32::new(0);

    /// A fresh path for a Unix socket (the "host proxy" of a test).
    fn socket_path() -> PathBuf {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("mxc-fwd-test-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    /// A Unix listener that serves one connection with `serve` on its own thread.
    fn upstream(serve: impl FnOnce(UnixStream) + Send + 'static) -> (StreamTarget, JoinHandle<()>) {
        let path = socket_path();
        let listener = UnixListener::bind(&path).unwrap();
        let target = StreamTarget::Unix(path.clone());
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            serve(stream);
            let _ = std::fs::remove_file(&path);
        });
        (target, handle)
    }

    /// Turns the forwarder until `done` holds (a readiness wait: 30 s is "never").
    fn turn_until(fwd: &mut Forwarder, mut done: impl FnMut(&Forwarder) -> bool) {
        let give_up = Instant::now() + Duration::from_secs(30);
        while !done(fwd) {
            assert!(Instant::now() < give_up, "the forwarder made no progress");
            fwd.turn(20).unwrap();
        }
    }

    fn client(fwd: &Forwarder) -> TcpStream {
        let s = TcpStream::connect((Ipv4Addr::LOCALHOST, fwd.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    /// Runs the client half on a thread while the test thread drives the forwarder.
    fn with_client<T: Send + 'static>(
        fwd: &mut Forwarder,
        f: impl FnOnce(TcpStream) -> T + Send + 'static,
    ) -> T {
        let stream = client(fwd);
        let handle = std::thread::spawn(move || f(stream));
        turn_until(fwd, |_| handle.is_finished());
        handle.join().unwrap()
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn bytes_flow_both_ways_and_a_client_half_close_is_carried() {
        let (target, server) = upstream(|mut s| {
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(&got).unwrap();
        });
        let mut fwd = Forwarder::bind(0, target).unwrap();
        let sent = pattern(3 << 20);
        let expected = sent.clone();

        let echoed = with_client(&mut fwd, move |mut c| {
            c.write_all(&sent).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let mut back = Vec::new();
            c.read_to_end(&mut back).unwrap();
            back
        });
        turn_until(&mut fwd, |f| f.active() == 0);

        server.join().unwrap();
        assert_eq!(echoed.len(), expected.len());
        assert!(echoed == expected);
    }

    /// Reads what `s` (non-blocking) has until it reports end of stream, turning the
    /// forwarder between reads.
    fn read_to_eof(fwd: &mut Forwarder, s: &mut impl Read) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        let mut eof = false;
        turn_until(fwd, |_| {
            loop {
                match s.read(&mut buf) {
                    Ok(0) => eof = true,
                    Ok(n) => {
                        got.extend_from_slice(&buf[..n]);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
                break;
            }
            eof
        });
        got
    }

    /// One thread, each step waited for: nothing here depends on how threads are
    /// scheduled (a thread-per-side version failed once on a loaded machine).
    #[test]
    fn a_half_close_from_the_host_side_leaves_the_other_direction_open() {
        let path = socket_path();
        let listener = UnixListener::bind(&path).unwrap();
        let mut fwd = Forwarder::bind(0, StreamTarget::Unix(path.clone())).unwrap();
        let mut c = client(&fwd);
        c.set_nonblocking(true).unwrap();
        turn_until(&mut fwd, |f| f.active() == 1);
        let (mut up, _) = listener.accept().unwrap();
        up.set_nonblocking(true).unwrap();

        up.write_all(b"hello").unwrap();
        up.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_eof(&mut fwd, &mut c), b"hello");

        c.write_all(b"after eof").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_eof(&mut fwd, &mut up), b"after eof");
        turn_until(&mut fwd, |f| f.active() == 0);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_slow_reader_holds_its_writer_back_within_the_buffers() {
        let (target, server) = upstream(|mut s| {
            let _ = s.write_all(&pattern(16 << 20));
        });
        let mut fwd = Forwarder::bind(0, target).unwrap();
        let mut c = client(&fwd);
        turn_until(&mut fwd, |f| {
            f.pairs
                .values()
                .any(|p| !p.connecting && p.down.pending() == FORWARD_BUF)
        });
        for _ in 0..50 {
            fwd.turn(5).unwrap();
        }

        let buffered: usize = fwd
            .pairs
            .values()
            .map(|p| p.up.pending() + p.down.pending())
            .sum();
        let reader = std::thread::spawn(move || {
            let mut n = 0usize;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match c.read(&mut buf).unwrap() {
                    0 => return n,
                    k => n += k,
                }
            }
        });
        turn_until(&mut fwd, |_| reader.is_finished());
        server.join().unwrap();
        assert!(buffered <= 2 * FORWARD_BUF, "{buffered}");
        assert_eq!(reader.join().unwrap(), 16 << 20);
    }

    #[test]
    fn an_unreachable_host_proxy_gets_a_502_with_the_reason() {
        let target = StreamTarget::Unix(socket_path());
        let mut fwd = Forwarder::bind(0, target).unwrap();

        let reply = with_client(&mut fwd, |mut c| {
            let _ = c.write_all(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n");
            let mut text = String::new();
            let _ = c.read_to_string(&mut text);
            text
        });

        assert!(reply.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{reply}");
        assert!(reply.contains("X-Mxc-Error: the host network proxy is unreachable"));
        assert_eq!(fwd.active(), 0);
    }

    #[test]
    fn connections_beyond_the_limit_get_a_503() {
        let (target, server) = upstream(|mut s| {
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
        });
        let mut fwd = Forwarder::bind(0, target).unwrap();
        fwd.max = 1;
        let first = client(&fwd);
        turn_until(&mut fwd, |f| f.active() == 1);

        let reply = with_client(&mut fwd, |mut c| {
            let mut text = String::new();
            let _ = c.read_to_string(&mut text);
            text
        });
        drop(first);
        turn_until(&mut fwd, |f| f.active() == 0);

        server.join().unwrap();
        assert!(reply.starts_with("HTTP/1.1 503 "), "{reply}");
        assert!(reply.contains("X-Mxc-Error: too many connections"));
    }

    #[test]
    fn a_reset_client_ends_the_connection() {
        let (target, server) = upstream(|mut s| {
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
        });
        let mut fwd = Forwarder::bind(0, target).unwrap();
        let c = client(&fwd);
        turn_until(&mut fwd, |f| f.pairs.values().any(|p| !p.connecting));

        // SO_LINGER 0: close sends a reset.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid linger struct of the size we pass, on a socket we own.
        let ret = unsafe {
            libc::setsockopt(
                c.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(ret, 0);
        drop(c);
        turn_until(&mut fwd, |f| f.active() == 0);

        server.join().unwrap();
    }

    #[test]
    fn the_listener_is_on_loopback_only() {
        let fwd = Forwarder::bind(0, StreamTarget::Unix(socket_path())).unwrap();

        let addr = TcpListener::from(fwd.listener.try_clone().unwrap())
            .local_addr()
            .unwrap();

        assert_eq!(
            addr,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, fwd.port()).into()
        );
    }
}
