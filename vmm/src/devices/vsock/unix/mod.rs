//! The hybrid-vsock backend: guest connections carried over Unix sockets.
//!
//! One [`UnixBackend`] owns the listener at `uds_path`, the host connections still sending
//! their `CONNECT` line ([`handshake`]), every established [`Connection`], and a timer for
//! the deadlines (unfinished handshakes, unanswered REQUESTs, closes that do not
//! complete). All of their fds sit in one private epoll instance; the VMM's event loop
//! watches only that epoll fd and calls [`VsockBackend::process_events`] when it is ready.
//!
//! Bounds: at most `max_connections` connections and `max_handshakes` unfinished host
//! handshakes (more are closed at once, or answered with RST), at most
//! `conn_buf_size` buffered bytes per connection (the credit the guest gets), at most one
//! rx-queue entry per connection plus [`MAX_RAW_PKTS`] loose control packets (more are
//! dropped), and a fixed amount of work per event.

pub mod handshake;
mod sys;

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::csm::{ConnKey, ConnTimeouts, Connection, HostStream};
use super::packet::{PacketHeader, OP_REQUEST, OP_RST};
use super::{VsockBackend, VsockError};
use crate::logging::guest_warn;
use handshake::Handshake;

/// Loose control packets (RSTs for unknown connections) kept for the guest; more are
/// dropped.
pub const MAX_RAW_PKTS: usize = 1024;
/// The first port handed out as `<host_port>` to host-initiated connections.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const FIRST_TOKEN: u64 = 2;
const MAX_EVENTS: usize = 64;
const MAX_ACCEPTS_PER_EVENT: usize = 32;

/// Limits and timeouts of a [`UnixBackend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixBackendConfig {
    /// Most open connections, both directions together. Each holds one fd, so this plus
    /// `max_handshakes` is how many fds the guest can make the VMM hold.
    pub max_connections: usize,
    /// Most host connections still sending their `CONNECT` line.
    pub max_handshakes: usize,
    /// Guest bytes buffered per connection (advertised to the guest as `buf_alloc`).
    pub conn_buf_size: u32,
    /// How long a host has to send its `CONNECT` line.
    pub handshake_timeout: Duration,
    /// How long the guest has to accept a host connection (RESPONSE).
    pub response_timeout: Duration,
    /// How long a fully shut-down connection may take to finish closing.
    pub shutdown_timeout: Duration,
    /// How often deadlines are checked.
    pub timer_tick: Duration,
}

impl Default for UnixBackendConfig {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_handshakes: 64,
            conn_buf_size: 64 * 1024,
            handshake_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            timer_tick: Duration::from_millis(250),
        }
    }
}

#[derive(Debug)]
struct ConnEntry {
    conn: Connection<UnixStream>,
    token: u64,
    registered: Option<EventSet>,
    in_rxq: bool,
}

/// The hybrid-vsock backend. See the module documentation.
#[derive(Debug)]
pub struct UnixBackend {
    guest_cid: u64,
    config: UnixBackendConfig,
    uds_path: PathBuf,
    /// (device, inode) of the socket file we bound, so drop removes only ours.
    uds_id: Option<(u64, u64)>,
    listener: UnixListener,
    listener_paused: bool,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    handshakes: HashMap<u64, Handshake>,
    conns: HashMap<ConnKey, ConnEntry>,
    conn_tokens: HashMap<u64, ConnKey>,
    next_token: u64,
    /// Connections with something for the guest; each at most once (`in_rxq`).
    rxq: VecDeque<ConnKey>,
    /// Control packets not tied to a connection.
    raw: VecDeque<PacketHeader>,
    next_local_port: u32,
}

impl UnixBackend {
    /// Listen at `uds_path` (which must not exist) for a guest with CID `guest_cid`.
    pub fn new(
        guest_cid: u64,
        uds_path: &Path,
        config: UnixBackendConfig,
    ) -> Result<Self, VsockError> {
        let listener = UnixListener::bind(uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.to_path_buf(),
            source,
        })?;
        let uds_id = std::fs::symlink_metadata(uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let backend = Self {
            guest_cid,
            config,
            uds_path: uds_path.to_path_buf(),
            uds_id,
            listener,
            listener_paused: false,
            epoll: Epoll::new().map_err(VsockError::Epoll)?,
            timer: TimerFd::new().map_err(|e| VsockError::Timer(e.into()))?,
            timer_armed: false,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            conn_tokens: HashMap::new(),
            next_token: FIRST_TOKEN,
            rxq: VecDeque::new(),
            raw: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        };
        backend
            .listener
            .set_nonblocking(true)
            .map_err(VsockError::Listener)?;
        sys::set_nonblocking(backend.timer.as_raw_fd()).map_err(VsockError::Timer)?;
        backend
            .epoll_add(backend.listener.as_raw_fd(), EventSet::IN, TOKEN_LISTENER)
            .map_err(VsockError::Epoll)?;
        backend
            .epoll_add(backend.timer.as_raw_fd(), EventSet::IN, TOKEN_TIMER)
            .map_err(VsockError::Epoll)?;
        Ok(backend)
    }

    /// The socket path host processes connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Open connections (either direction).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Host connections still sending their `CONNECT` line.
    pub fn handshake_count(&self) -> usize {
        self.handshakes.len()
    }

    /// Packets and connections queued for the guest.
    pub fn pending_rx_count(&self) -> usize {
        self.raw.len() + self.rxq.len()
    }

    /// The listener path for guest connections to host port `port`: `<uds_path>_<port>`.
    pub fn peer_listener_path(&self, port: u32) -> PathBuf {
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{port}"));
        PathBuf::from(path)
    }

    fn timeouts(&self) -> ConnTimeouts {
        ConnTimeouts {
            response: self.config.response_timeout,
            shutdown: self.config.shutdown_timeout,
        }
    }

    fn epoll_add(&self, fd: RawFd, set: EventSet, token: u64) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))
    }

    fn epoll_del(&self, fd: RawFd) {
        // Failure means the fd is not registered any more: nothing to undo.
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    fn take_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(FIRST_TOKEN);
        token
    }

    fn arm_timer(&mut self) {
        if self.timer_armed {
            return;
        }
        let tick = self.config.timer_tick.max(Duration::from_millis(1));
        match self.timer.reset(tick, Some(tick)) {
            Ok(()) => self.timer_armed = true,
            Err(e) => guest_warn!(error = %e, "vsock: cannot arm timer"),
        }
    }

    fn push_raw(&mut self, hdr: PacketHeader) {
        if self.raw.len() < MAX_RAW_PKTS {
            self.raw.push_back(hdr);
        } else {
            guest_warn!("vsock: control queue full, dropping packet for the guest");
        }
    }

    /// Put `conn` in the table and start watching it.
    fn insert_conn(&mut self, conn: Connection<UnixStream>) {
        let key = conn.key();
        let token = self.take_token();
        self.conn_tokens.insert(token, key);
        self.conns.insert(
            key,
            ConnEntry {
                conn,
                token,
                registered: None,
                in_rxq: false,
            },
        );
        self.refresh(key);
    }

    /// Bring the epoll registration, rx queue and timer in line with a connection's state
    /// after anything happened to it, and drop it once finished.
    fn refresh(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        if entry.conn.is_finished() {
            if let (Some(_), Some(fd)) = (entry.registered, entry.conn.stream_fd()) {
                self.epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                    .ok();
            }
            let (token, in_rxq) = (entry.token, entry.in_rxq);
            self.conns.remove(&key);
            self.conn_tokens.remove(&token);
            if in_rxq {
                self.rxq.retain(|k| *k != key);
            }
            return;
        }

        let fd = entry.conn.stream_fd();
        let want = entry.conn.interest();
        let op = match (entry.registered, want, fd) {
            (None, Some(set), Some(fd)) => Some((ControlOperation::Add, fd, set)),
            (Some(old), Some(set), Some(fd)) if old != set => {
                Some((ControlOperation::Modify, fd, set))
            }
            (Some(_), None, Some(fd)) => Some((ControlOperation::Delete, fd, EventSet::empty())),
            // The stream is closed, so the kernel dropped the registration with it.
            (Some(_), _, None) => {
                entry.registered = None;
                None
            }
            _ => None,
        };
        if let Some((op, fd, set)) = op {
            let deleting = matches!(op, ControlOperation::Delete);
            let result = self.epoll.ctl(op, fd, EpollEvent::new(set, entry.token));
            match result {
                _ if deleting => entry.registered = None,
                Ok(()) => entry.registered = Some(set),
                Err(_) => {
                    entry.conn.kill();
                    entry.registered = None;
                }
            }
        }

        if entry.conn.has_pending_rx() && !entry.in_rxq {
            entry.in_rxq = true;
            self.rxq.push_back(key);
        }
        if entry.conn.deadline().is_some() {
            self.arm_timer();
        }
    }

    fn accept_all(&mut self, now: Instant) {
        for _ in 0..MAX_ACCEPTS_PER_EVENT {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream, now),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. out of fds: stop watching the listener for a tick rather than
                    // spin on it.
                    guest_warn!(error = %e, "vsock: accept failed, pausing listener");
                    self.epoll_del(self.listener.as_raw_fd());
                    self.listener_paused = true;
                    self.arm_timer();
                    return;
                }
            }
        }
    }

    /// A new host connection: start reading its `CONNECT` line.
    fn admit(&mut self, stream: UnixStream, now: Instant) {
        let full = self.handshakes.len() >= self.config.max_handshakes
            || self.conns.len() + self.handshakes.len() >= self.config.max_connections;
        if full || stream.set_nonblocking(true).is_err() {
            guest_warn!("vsock: too many host connections, closing a new one");
            return;
        }
        let token = self.take_token();
        if self
            .epoll_add(stream.as_raw_fd(), EventSet::IN, token)
            .is_err()
        {
            return;
        }
        let deadline = now
            .checked_add(self.config.handshake_timeout)
            .unwrap_or(now);
        self.handshakes
            .insert(token, Handshake::new(stream, deadline));
        self.arm_timer();
        self.on_handshake(token, now);
    }

    fn on_handshake(&mut self, token: u64, now: Instant) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let result = hs.step();
        if matches!(result, Ok(None)) {
            return;
        }
        let Some(hs) = self.handshakes.remove(&token) else {
            return;
        };
        self.epoll_del(hs.stream().as_raw_fd());
        match result {
            Ok(Some(port)) => self.host_connect(hs.into_stream(), port, now),
            Ok(None) => {}
            Err(e) => {
                guest_warn!(error = %e, "vsock: refused host connection");
            }
        }
    }

    /// A host asked for guest port `port`: send the guest a REQUEST.
    fn host_connect(&mut self, stream: UnixStream, port: u32, now: Instant) {
        if self.conns.len() >= self.config.max_connections {
            guest_warn!("vsock: too many connections, refusing host connect");
            return;
        }
        let Some(local_port) = self.alloc_local_port(port) else {
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let conn = Connection::new_local(
            stream,
            key,
            self.guest_cid,
            self.config.conn_buf_size,
            self.timeouts(),
            now,
        );
        self.insert_conn(conn);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=self.config.max_connections {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    /// The guest asked for host port `req.dst_port`: connect to `<uds_path>_<port>`.
    fn guest_connect(&mut self, req: &PacketHeader) {
        if self.conns.len() >= self.config.max_connections {
            guest_warn!("vsock: too many connections, refusing guest connect");
            self.push_raw(req.rst_reply());
            return;
        }
        let path = self.peer_listener_path(req.dst_port);
        match sys::connect_nonblocking(&path) {
            Ok(stream) => {
                let conn =
                    Connection::new_peer(stream, req, self.config.conn_buf_size, self.timeouts());
                self.insert_conn(conn);
            }
            Err(e) => {
                guest_warn!(port = req.dst_port, error = %e,
                    "vsock: guest connect to host port refused");
                self.push_raw(req.rst_reply());
            }
        }
    }

    fn on_tick(&mut self, now: Instant) {
        // Non-blocking: an error only means no expiry is pending.
        let _ = self.timer.wait();

        let expired: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, hs)| hs.deadline() <= now)
            .map(|(token, _)| *token)
            .collect();
        for token in expired {
            if let Some(hs) = self.handshakes.remove(&token) {
                self.epoll_del(hs.stream().as_raw_fd());
            }
        }

        let due: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.deadline().is_some_and(|d| d <= now))
            .map(|(key, _)| *key)
            .collect();
        for key in due {
            if let Some(entry) = self.conns.get_mut(&key) {
                entry.conn.on_deadline(now);
            }
            self.refresh(key);
        }

        if self.listener_paused
            && self
                .epoll_add(self.listener.as_raw_fd(), EventSet::IN, TOKEN_LISTENER)
                .is_ok()
        {
            self.listener_paused = false;
        }

        let waiting = !self.handshakes.is_empty()
            || self.listener_paused
            || self.conns.values().any(|e| e.conn.deadline().is_some());
        if !waiting && self.timer_armed && self.timer.clear().is_ok() {
            self.timer_armed = false;
        }
    }
}

impl HostStream for UnixStream {
    fn send(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        sys::send_nosignal(self.as_fd(), buf)
    }

    fn shutdown_write(&self) -> std::io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

impl AsRawFd for UnixBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl VsockBackend for UnixBackend {
    fn send_pkt(&mut self, hdr: &PacketHeader, data: &[u8]) {
        let key = ConnKey::of_guest_pkt(hdr);
        if let Some(entry) = self.conns.get_mut(&key) {
            entry.conn.on_guest_pkt(hdr, data, Instant::now());
            self.refresh(key);
            return;
        }
        match hdr.op {
            OP_REQUEST => self.guest_connect(hdr),
            OP_RST => {}
            _ => self.push_raw(hdr.rst_reply()),
        }
    }

    fn reset_peer(&mut self, hdr: &PacketHeader) {
        let key = ConnKey::of_guest_pkt(hdr);
        if let Some(entry) = self.conns.get_mut(&key) {
            entry.conn.kill();
            self.refresh(key);
        } else if hdr.op != OP_RST {
            self.push_raw(hdr.rst_reply());
        }
    }

    fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<PacketHeader> {
        if let Some(hdr) = self.raw.pop_front() {
            return Some(hdr);
        }
        for _ in 0..self.rxq.len() {
            let key = self.rxq.pop_front()?;
            let Some(entry) = self.conns.get_mut(&key) else {
                continue;
            };
            entry.in_rxq = false;
            let pkt = entry.conn.recv_pkt(buf);
            self.refresh(key);
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }

    fn has_pending_rx(&self) -> bool {
        !self.raw.is_empty() || !self.rxq.is_empty()
    }

    fn is_idle(&self) -> bool {
        self.conns.is_empty() && self.handshakes.is_empty() && !self.has_pending_rx()
    }

    fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); MAX_EVENTS];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                guest_warn!(error = %e, "vsock: epoll_wait failed");
                return;
            }
        };
        let now = Instant::now();
        for ev in events.iter().take(n) {
            let set = EventSet::from_bits_truncate(ev.events());
            match ev.data() {
                TOKEN_LISTENER => self.accept_all(now),
                TOKEN_TIMER => self.on_tick(now),
                token if self.handshakes.contains_key(&token) => self.on_handshake(token, now),
                token => {
                    if let Some(key) = self.conn_tokens.get(&token).copied() {
                        if let Some(entry) = self.conns.get_mut(&key) {
                            entry.conn.on_stream_events(set);
                        }
                        self.refresh(key);
                    }
                }
            }
        }
    }
}

impl Drop for UnixBackend {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.uds_id {
            // Best effort: the path may have been removed by someone else meanwhile.
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}
