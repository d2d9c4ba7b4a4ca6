//! The connection state machine: one guest stream connection and its host-side stream.
//!
//! A connection is created either by the host (`CONNECT <port>`: we send REQUEST and wait
//! for the guest's RESPONSE) or by the guest (REQUEST: we answer RESPONSE). Once
//! established it moves bytes both ways under virtio-vsock's credit-based flow control:
//!
//! - guest → host: we advertise `buf_alloc` (the most guest bytes we will hold) and
//!   `fwd_cnt` (guest bytes written to the host stream so far). A guest that sends more
//!   than that credit is reset. While the host stream is not writable the bytes wait in a
//!   buffer that can never exceed `buf_alloc`, and `fwd_cnt` stops advancing, so the guest
//!   gets no new credit.
//! - host → guest: we read the host stream lazily, only when the guest has an rx buffer
//!   for us, and never more than the guest's credit (`peer_buf_alloc - (tx_cnt -
//!   peer_fwd_cnt)`); at zero credit we ask once with CREDIT_REQUEST and stop reading.
//!
//! Control packets for the guest are kept as flags and produced by [`Connection::recv_pkt`]
//! in a fixed order, so nothing here grows with guest input. A connection that must die
//! drops its host stream at once, keeps only a pending RST, and reports
//! [`Connection::is_finished`] once the RST went out.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::packet::{
    PacketHeader, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST,
    OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// A host stream as the state machine needs it (`UnixStream`, implemented by the Unix
/// backend). Reads and writes never block.
pub trait HostStream: Read + AsRawFd + Send {
    /// Write some of `buf`; a closed peer is an error, never a signal.
    fn send(&mut self, buf: &[u8]) -> std::io::Result<usize>;
    /// Shut down the host stream's write half (the guest will send no more).
    fn shutdown_write(&self) -> std::io::Result<()>;
}

/// A connection's address: our (host) port and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

impl ConnKey {
    /// The key a guest packet addresses.
    pub fn of_guest_pkt(hdr: &PacketHeader) -> Self {
        Self {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        }
    }
}

/// Timeouts a connection enforces (see [`Connection::deadline`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnTimeouts {
    /// How long the guest has to answer our REQUEST.
    pub response: Duration,
    /// How long a connection may linger once either side shut down fully (flushing to the
    /// host, or waiting for the guest's RST).
    pub shutdown: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent (or pending), waiting for the guest's RESPONSE.
    LocalInit,
    Established,
}

/// Control packets waiting to go to the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Pending {
    rst: bool,
    request: bool,
    response: bool,
    shutdown: u32,
    credit_update: bool,
    credit_request: bool,
}

/// One vsock stream connection.
#[derive(Debug)]
pub struct Connection<S> {
    key: ConnKey,
    guest_cid: u64,
    stream: Option<S>,
    state: State,
    timeouts: ConnTimeouts,
    deadline: Option<Instant>,
    pending: Pending,
    finished: bool,

    // guest -> host
    buf_alloc: u32,
    to_host: VecDeque<u8>,
    /// Leading bytes of `to_host` that are ours (`OK <port>\n`), not guest data.
    ctl_prefix: usize,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    peer_shut: u32,
    host_write_shut: bool,

    // host -> guest
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    want_read: bool,
    credit_requested: bool,
    local_eof: bool,
    shutdown_sent: u32,
    hup: bool,
}

impl<S: HostStream> Connection<S> {
    fn new(
        stream: S,
        key: ConnKey,
        guest_cid: u64,
        buf_alloc: u32,
        timeouts: ConnTimeouts,
    ) -> Self {
        Self {
            key,
            guest_cid,
            stream: Some(stream),
            state: State::Established,
            timeouts,
            deadline: None,
            pending: Pending::default(),
            finished: false,
            buf_alloc,
            to_host: VecDeque::new(),
            ctl_prefix: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            peer_shut: 0,
            host_write_shut: false,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            want_read: false,
            credit_requested: false,
            local_eof: false,
            shutdown_sent: 0,
            hup: false,
        }
    }

    /// A host-initiated connection: a REQUEST for the guest is pending.
    pub fn new_local(
        stream: S,
        key: ConnKey,
        guest_cid: u64,
        buf_alloc: u32,
        timeouts: ConnTimeouts,
        now: Instant,
    ) -> Self {
        let mut conn = Self::new(stream, key, guest_cid, buf_alloc, timeouts);
        conn.state = State::LocalInit;
        conn.pending.request = true;
        conn.deadline = now.checked_add(timeouts.response);
        conn
    }

    /// A guest-initiated connection (its REQUEST is `req`): a RESPONSE is pending.
    pub fn new_peer(stream: S, req: &PacketHeader, buf_alloc: u32, timeouts: ConnTimeouts) -> Self {
        let key = ConnKey::of_guest_pkt(req);
        let mut conn = Self::new(stream, key, req.src_cid, buf_alloc, timeouts);
        conn.peer_buf_alloc = req.buf_alloc;
        conn.peer_fwd_cnt = req.fwd_cnt;
        conn.pending.response = true;
        conn
    }

    pub fn key(&self) -> ConnKey {
        self.key
    }

    /// The host stream's fd, while the stream is open.
    pub fn stream_fd(&self) -> Option<RawFd> {
        self.stream.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// The readiness the host stream should be watched for; `None`: do not watch it at all
    /// (closed, or hung up). An empty set still reports hang-ups and errors.
    pub fn interest(&self) -> Option<EventSet> {
        if self.stream.is_none() || self.hup {
            return None;
        }
        let mut set = EventSet::empty();
        if self.can_read() && !self.want_read && self.peer_credit() > 0 {
            set |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            set |= EventSet::OUT;
        }
        Some(set)
    }

    /// Whether [`Connection::recv_pkt`] has something to produce.
    pub fn has_pending_rx(&self) -> bool {
        let p = &self.pending;
        p.rst
            || p.request
            || p.response
            || p.shutdown != 0
            || p.credit_update
            || p.credit_request
            || (self.want_read
                && self.can_read()
                && (self.peer_credit() > 0 || !self.credit_requested))
    }

    /// The RST went out (or the guest reset us): the owner may drop this connection.
    pub fn is_finished(&self) -> bool {
        self.finished && !self.pending.rst
    }

    /// When [`Connection::on_deadline`] must be called.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Guest bytes we hold for the host.
    pub fn buffered(&self) -> usize {
        self.to_host.len() - self.ctl_prefix
    }

    /// Reset the connection: close the host stream, forget buffered bytes, and send the
    /// guest a RST.
    pub fn kill(&mut self) {
        if self.finished {
            return;
        }
        self.stream = None;
        self.to_host = VecDeque::new();
        self.ctl_prefix = 0;
        self.deadline = None;
        self.want_read = false;
        self.pending = Pending {
            rst: true,
            ..Pending::default()
        };
        self.finished = true;
    }

    /// The guest reset us: drop everything, send nothing.
    fn close_silently(&mut self) {
        self.kill();
        self.pending.rst = false;
    }

    /// A validated packet from the guest for this connection.
    pub fn on_guest_pkt(&mut self, hdr: &PacketHeader, data: &[u8], now: Instant) {
        if self.finished {
            return;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
        match (self.state, hdr.op) {
            (_, OP_RST) => self.close_silently(),
            (State::LocalInit, OP_RESPONSE) => {
                self.state = State::Established;
                self.deadline = None;
                let ok = format!("OK {}\n", self.key.local_port);
                self.ctl_prefix = ok.len();
                self.to_host.extend(ok.as_bytes());
                self.flush();
            }
            (State::LocalInit, _) => self.kill(),
            (State::Established, OP_RW) => self.on_guest_data(data),
            (State::Established, OP_CREDIT_UPDATE) => {}
            (State::Established, OP_CREDIT_REQUEST) => self.pending.credit_update = true,
            (State::Established, OP_SHUTDOWN) => self.on_guest_shutdown(hdr.flags, now),
            (State::Established, _) => self.kill(),
        }
    }

    fn on_guest_data(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.peer_shut & SHUTDOWN_SEND != 0 || self.host_write_shut || self.hup {
            self.kill();
            return;
        }
        if self.buffered().saturating_add(data.len()) > self.buf_alloc as usize {
            // The guest ignored the credit we gave it.
            self.kill();
            return;
        }
        let mut rest = data;
        if self.to_host.is_empty() {
            match self.stream.as_mut().map(|s| s.send(data)) {
                Some(Ok(n)) => {
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                    rest = data.get(n..).unwrap_or_default();
                }
                Some(Err(e)) if is_transient(&e) => {}
                Some(Err(_)) | None => {
                    self.kill();
                    return;
                }
            }
        }
        self.to_host.extend(rest);
        self.after_forward();
    }

    fn on_guest_shutdown(&mut self, flags: u32, now: Instant) {
        self.peer_shut |= flags & SHUTDOWN_BOTH;
        if self.peer_shut == SHUTDOWN_BOTH && self.deadline.is_none() {
            self.deadline = now.checked_add(self.timeouts.shutdown);
        }
        self.after_forward();
    }

    /// Bookkeeping after guest bytes reached the host stream (or a shutdown came in).
    fn after_forward(&mut self) {
        if self.finished || !self.to_host.is_empty() {
            return;
        }
        if self.peer_shut == SHUTDOWN_BOTH {
            // Everything the guest sent is with the host: confirm the close.
            self.kill();
            return;
        }
        if self.peer_shut & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            if let Some(stream) = &self.stream {
                // The host may already be gone; its hang-up is handled on its own.
                let _ = stream.shutdown_write();
            }
        }
        let unannounced = self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        if unannounced >= self.credit_update_threshold() {
            self.pending.credit_update = true;
        }
    }

    /// Forwarded bytes after which the guest is told about its new credit.
    fn credit_update_threshold(&self) -> u32 {
        (self.buf_alloc / 4).max(1)
    }

    /// Write buffered bytes to the host stream, as many as it takes.
    fn flush(&mut self) {
        while !self.to_host.is_empty() {
            let Some(stream) = self.stream.as_mut() else {
                return;
            };
            let (front, _) = self.to_host.as_slices();
            match stream.send(front) {
                Ok(0) => {
                    self.kill();
                    return;
                }
                Ok(n) => {
                    self.to_host.drain(..n.min(self.to_host.len()));
                    let ours = n.min(self.ctl_prefix);
                    self.ctl_prefix -= ours;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - ours) as u32);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_transient(&e) => break,
                Err(_) => {
                    self.kill();
                    return;
                }
            }
        }
        if self.to_host.is_empty() && self.to_host.capacity() > 4096 {
            self.to_host = VecDeque::new();
        }
        self.after_forward();
    }

    /// The host stream became ready (`events` from epoll).
    pub fn on_stream_events(&mut self, events: EventSet) {
        if self.finished {
            return;
        }
        if events.contains(EventSet::ERROR) {
            self.kill();
            return;
        }
        if events.contains(EventSet::OUT) {
            self.flush();
        }
        if events.contains(EventSet::IN) && self.can_read() {
            self.want_read = true;
        }
        if events.contains(EventSet::HANG_UP) {
            self.on_hang_up();
        }
    }

    /// The host closed its end completely.
    fn on_hang_up(&mut self) {
        if self.finished {
            return;
        }
        self.hup = true;
        if self.state == State::LocalInit || !self.to_host.is_empty() {
            // Nobody left to receive what the guest sent, or to talk to.
            self.kill();
            return;
        }
        if self.can_read() {
            // Deliver what is still in the socket, then the EOF.
            self.want_read = true;
        } else if self.shutdown_sent != SHUTDOWN_BOTH {
            self.queue_shutdown(SHUTDOWN_BOTH);
        }
    }

    fn queue_shutdown(&mut self, flags: u32) {
        self.pending.shutdown |= flags;
        self.shutdown_sent |= flags;
        if self.shutdown_sent == SHUTDOWN_BOTH && self.deadline.is_none() {
            self.deadline = Instant::now().checked_add(self.timeouts.shutdown);
        }
    }

    /// The deadline passed: an unanswered REQUEST, or a close that did not complete.
    pub fn on_deadline(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| d <= now) {
            self.kill();
        }
    }

    /// Whether host bytes may be read for the guest at all (credit aside).
    fn can_read(&self) -> bool {
        self.state == State::Established
            && self.stream.is_some()
            && !self.local_eof
            && self.peer_shut & SHUTDOWN_RCV == 0
            && !self.finished
    }

    /// Bytes the guest can still take from us.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn header(&mut self, op: u16) -> PacketHeader {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending.credit_update = false;
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The next packet for the guest, its payload (if RW) written to the front of `buf`
    /// (`hdr.len` bytes). `None`: nothing to send right now.
    pub fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<PacketHeader> {
        if self.pending.rst {
            self.pending.rst = false;
            let mut hdr = self.header(OP_RST);
            hdr.buf_alloc = 0;
            hdr.fwd_cnt = 0;
            return Some(hdr);
        }
        if self.finished {
            return None;
        }
        if self.pending.request {
            self.pending.request = false;
            return Some(self.header(OP_REQUEST));
        }
        if self.pending.response {
            self.pending.response = false;
            return Some(self.header(OP_RESPONSE));
        }
        if self.pending.shutdown != 0 {
            let mut hdr = self.header(OP_SHUTDOWN);
            hdr.flags = std::mem::take(&mut self.pending.shutdown);
            return Some(hdr);
        }
        if self.want_read && self.can_read() {
            if let Some(hdr) = self.read_for_guest(buf) {
                return Some(hdr);
            }
        }
        if self.pending.credit_request {
            self.pending.credit_request = false;
            return Some(self.header(OP_CREDIT_REQUEST));
        }
        if self.pending.credit_update {
            return Some(self.header(OP_CREDIT_UPDATE));
        }
        None
    }

    fn read_for_guest(&mut self, buf: &mut [u8]) -> Option<PacketHeader> {
        let credit = self.peer_credit() as usize;
        if credit == 0 {
            if !self.credit_requested {
                self.credit_requested = true;
                self.pending.credit_request = true;
            }
            return None;
        }
        let want = credit.min(buf.len());
        let dst = buf.get_mut(..want)?;
        let stream = self.stream.as_mut()?;
        match stream.read(dst) {
            Ok(0) => {
                self.local_eof = true;
                self.want_read = false;
                let flags = if self.hup {
                    SHUTDOWN_BOTH
                } else {
                    SHUTDOWN_SEND
                };
                self.queue_shutdown(flags);
                let mut hdr = self.header(OP_SHUTDOWN);
                hdr.flags = std::mem::take(&mut self.pending.shutdown);
                Some(hdr)
            }
            Ok(n) => {
                self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
                // A short read means the socket is drained; poll for more.
                self.want_read = n == want || self.hup;
                let mut hdr = self.header(OP_RW);
                hdr.len = n as u32;
                Some(hdr)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => None,
            Err(e) if is_transient(&e) => {
                self.want_read = false;
                None
            }
            Err(_) => {
                self.kill();
                self.recv_pkt(buf)
            }
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::Shutdown;
    use std::os::unix::net::UnixStream;

    const CID: u64 = 3;
    const BUF: u32 = 1024;
    const TIMEOUTS: ConnTimeouts = ConnTimeouts {
        response: Duration::from_secs(5),
        shutdown: Duration::from_secs(5),
    };

    fn guest_pkt(op: u16, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 52,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    /// A guest-initiated connection whose RESPONSE already went out, and the host end.
    fn established() -> (Connection<UnixStream>, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        let mut conn = Connection::new_peer(ours, &guest_pkt(OP_REQUEST, 0), BUF, TIMEOUTS);
        let mut buf = [0u8; 64];
        assert_eq!(conn.recv_pkt(&mut buf).unwrap().op, OP_RESPONSE);
        (conn, host)
    }

    fn read_all(host: &mut UnixStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = host.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    #[test]
    fn guest_request_is_answered_with_response_from_host() {
        let (ours, _host) = UnixStream::pair().unwrap();
        let mut conn = Connection::new_peer(ours, &guest_pkt(OP_REQUEST, 0), BUF, TIMEOUTS);
        let mut buf = [0u8; 64];

        let hdr = conn.recv_pkt(&mut buf).unwrap();

        assert_eq!(
            (hdr.op, hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port),
            (OP_RESPONSE, HOST_CID, CID, 52, 5000)
        );
        assert_eq!(hdr.buf_alloc, BUF);
        assert!(!conn.has_pending_rx());
    }

    #[test]
    fn guest_data_reaches_host_and_counts_forwarded() {
        let (mut conn, mut host) = established();

        conn.on_guest_pkt(&guest_pkt(OP_RW, 5), b"hello", Instant::now());

        assert_eq!(read_all(&mut host), b"hello");
        assert_eq!(conn.fwd_cnt, 5);
        assert_eq!(conn.buffered(), 0);
    }

    #[test]
    fn host_data_goes_to_guest_within_credit() {
        let (mut conn, mut host) = established();
        conn.on_guest_pkt(&guest_pkt(OP_CREDIT_UPDATE, 0), &[], Instant::now());
        host.write_all(&[7u8; 100]).unwrap();
        conn.peer_buf_alloc = 60;
        conn.on_stream_events(EventSet::IN);
        let mut buf = [0u8; 4096];

        let first = conn.recv_pkt(&mut buf).unwrap();
        let second = conn.recv_pkt(&mut buf).unwrap();

        assert_eq!((first.op, first.len), (OP_RW, 60));
        assert_eq!(second.op, OP_CREDIT_REQUEST);
        assert!(!conn.has_pending_rx());
        assert_eq!(conn.interest(), Some(EventSet::empty()));
    }

    #[test]
    fn credit_update_from_guest_resumes_reading() {
        let (mut conn, mut host) = established();
        host.write_all(&[7u8; 100]).unwrap();
        conn.peer_buf_alloc = 60;
        conn.on_stream_events(EventSet::IN);
        let mut buf = [0u8; 4096];
        conn.recv_pkt(&mut buf).unwrap();
        conn.recv_pkt(&mut buf).unwrap();
        let mut update = guest_pkt(OP_CREDIT_UPDATE, 0);
        update.buf_alloc = 60;
        update.fwd_cnt = 60;

        conn.on_guest_pkt(&update, &[], Instant::now());
        let next = conn.recv_pkt(&mut buf).unwrap();

        assert_eq!((next.op, next.len), (OP_RW, 40));
    }

    #[test]
    fn guest_exceeding_credit_is_reset() {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut conn = Connection::new_peer(ours, &guest_pkt(OP_REQUEST, 0), BUF, TIMEOUTS);
        let mut buf = [0u8; 64];
        conn.recv_pkt(&mut buf).unwrap();
        // Fill the host socket so nothing more can be written to it.
        let big = vec![0u8; 64 * 1024];
        while conn.buffered() == 0 && !conn.finished {
            conn.on_guest_pkt(&guest_pkt(OP_RW, BUF), &big[..BUF as usize], Instant::now());
        }

        conn.on_guest_pkt(&guest_pkt(OP_RW, BUF), &big[..BUF as usize], Instant::now());
        let rst = conn.recv_pkt(&mut buf).unwrap();

        assert_eq!(rst.op, OP_RST);
        assert!(conn.is_finished());
        assert_eq!(conn.stream_fd(), None);
        drop(host);
    }

    #[test]
    fn blocked_host_stops_credit_and_bounds_buffer() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        let mut conn = Connection::new_peer(ours, &guest_pkt(OP_REQUEST, 0), BUF, TIMEOUTS);
        let mut buf = [0u8; 64];
        conn.recv_pkt(&mut buf).unwrap();
        let chunk = [1u8; 256];
        // A well-behaved guest: stays within buf_alloc - (sent - fwd_cnt announced).
        let mut sent: u32 = 0;
        let mut announced: u32 = 0;
        for _ in 0..10_000 {
            let credit = BUF - (sent - announced);
            if credit < 256 {
                break;
            }
            conn.on_guest_pkt(&guest_pkt(OP_RW, 256), &chunk, Instant::now());
            sent += 256;
            if let Some(h) = conn.recv_pkt(&mut buf) {
                announced = h.fwd_cnt;
            }
        }

        assert!(!conn.is_finished());
        assert!(conn.buffered() <= BUF as usize);
        assert!(conn.buffered() > 0);
        assert!(conn.interest().unwrap().contains(EventSet::OUT));
        let mut total = read_all(&mut host).len() as u32;
        conn.on_stream_events(EventSet::OUT);
        total += read_all(&mut host).len() as u32;
        let update = conn.recv_pkt(&mut buf).unwrap();
        assert_eq!(total, sent);
        assert_eq!(conn.buffered(), 0);
        assert_eq!(update.op, OP_CREDIT_UPDATE);
        assert_eq!(update.fwd_cnt, conn.fwd_cnt);
    }

    #[test]
    fn credit_request_is_answered_with_update() {
        let (mut conn, _host) = established();
        let mut buf = [0u8; 64];

        conn.on_guest_pkt(&guest_pkt(OP_CREDIT_REQUEST, 0), &[], Instant::now());
        let hdr = conn.recv_pkt(&mut buf).unwrap();

        assert_eq!(
            (hdr.op, hdr.buf_alloc, hdr.fwd_cnt),
            (OP_CREDIT_UPDATE, BUF, 0)
        );
    }

    #[test]
    fn host_eof_sends_shutdown_send() {
        let (mut conn, host) = established();
        host.shutdown(Shutdown::Write).unwrap();
        conn.on_stream_events(EventSet::IN);
        let mut buf = [0u8; 64];

        let hdr = conn.recv_pkt(&mut buf).unwrap();

        assert_eq!((hdr.op, hdr.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        assert!(!conn.has_pending_rx());
    }

    #[test]
    fn host_close_delivers_data_then_full_shutdown() {
        let (mut conn, mut host) = established();
        host.write_all(b"bye").unwrap();
        drop(host);
        conn.on_stream_events(EventSet::IN | EventSet::HANG_UP);
        let mut buf = [0u8; 64];

        let data = conn.recv_pkt(&mut buf).unwrap();
        let shut = conn.recv_pkt(&mut buf).unwrap();

        assert_eq!((data.op, data.len), (OP_RW, 3));
        assert_eq!(&buf[..3], b"bye");
        assert_eq!((shut.op, shut.flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
        assert!(conn.deadline().is_some());
        assert_eq!(conn.interest(), None);
    }

    #[test]
    fn guest_full_shutdown_is_confirmed_with_rst() {
        let (mut conn, mut host) = established();
        let mut shut = guest_pkt(OP_SHUTDOWN, 0);
        shut.flags = SHUTDOWN_BOTH;
        let mut buf = [0u8; 64];

        conn.on_guest_pkt(&guest_pkt(OP_RW, 2), b"hi", Instant::now());
        conn.on_guest_pkt(&shut, &[], Instant::now());
        let rst = conn.recv_pkt(&mut buf).unwrap();

        assert_eq!(rst.op, OP_RST);
        assert!(conn.is_finished());
        assert_eq!(read_all(&mut host), b"hi");
    }

    #[test]
    fn guest_send_shutdown_half_closes_host_write() {
        let (mut conn, mut host) = established();
        let mut shut = guest_pkt(OP_SHUTDOWN, 0);
        shut.flags = SHUTDOWN_SEND;

        conn.on_guest_pkt(&shut, &[], Instant::now());
        host.set_nonblocking(false).unwrap();
        let mut buf = [0u8; 8];
        let n = host.read(&mut buf).unwrap();
        host.write_all(b"still").unwrap();
        conn.on_stream_events(EventSet::IN);
        let mut rx = [0u8; 64];
        let data = conn.recv_pkt(&mut rx).unwrap();

        assert_eq!(n, 0);
        assert_eq!((data.op, data.len), (OP_RW, 5));
        assert!(!conn.is_finished());
    }

    #[test]
    fn data_after_guest_send_shutdown_resets() {
        let (mut conn, _host) = established();
        let mut shut = guest_pkt(OP_SHUTDOWN, 0);
        shut.flags = SHUTDOWN_SEND;
        conn.on_guest_pkt(&shut, &[], Instant::now());
        let mut buf = [0u8; 64];

        conn.on_guest_pkt(&guest_pkt(OP_RW, 1), b"x", Instant::now());

        assert_eq!(conn.recv_pkt(&mut buf).unwrap().op, OP_RST);
    }

    #[test]
    fn guest_rst_closes_without_reply() {
        let (mut conn, mut host) = established();
        let mut buf = [0u8; 64];

        conn.on_guest_pkt(&guest_pkt(OP_RST, 0), &[], Instant::now());

        assert!(conn.is_finished());
        assert_eq!(conn.recv_pkt(&mut buf), None);
        host.set_nonblocking(false).unwrap();
        assert_eq!(host.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn local_connection_requests_then_greets_host_on_response() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        let key = ConnKey {
            local_port: 1 << 30,
            peer_port: 1024,
        };
        let mut conn = Connection::new_local(ours, key, CID, BUF, TIMEOUTS, Instant::now());
        let mut buf = [0u8; 64];
        let req = conn.recv_pkt(&mut buf).unwrap();
        let mut resp = guest_pkt(OP_RESPONSE, 0);
        resp.src_port = 1024;
        resp.dst_port = 1 << 30;

        conn.on_guest_pkt(&resp, &[], Instant::now());
        conn.on_guest_pkt(
            &PacketHeader {
                op: OP_RW,
                len: 3,
                ..resp
            },
            b"abc",
            Instant::now(),
        );

        assert_eq!(
            (req.op, req.src_port, req.dst_port),
            (OP_REQUEST, 1 << 30, 1024)
        );
        assert_eq!(
            read_all(&mut host),
            format!("OK {}\nabc", 1u32 << 30).as_bytes()
        );
        assert_eq!(conn.fwd_cnt, 3);
        assert_eq!(conn.deadline(), None);
    }

    #[test]
    fn local_connection_refused_by_guest_closes_host() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        let key = ConnKey {
            local_port: 1 << 30,
            peer_port: 1024,
        };
        let mut conn = Connection::new_local(ours, key, CID, BUF, TIMEOUTS, Instant::now());
        let mut buf = [0u8; 64];
        conn.recv_pkt(&mut buf).unwrap();

        conn.on_guest_pkt(&guest_pkt(OP_RST, 0), &[], Instant::now());

        assert!(conn.is_finished());
        assert_eq!(host.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn unanswered_request_times_out_with_rst() {
        let (ours, _host) = UnixStream::pair().unwrap();
        let key = ConnKey {
            local_port: 1 << 30,
            peer_port: 1024,
        };
        let t0 = Instant::now();
        let mut conn = Connection::new_local(ours, key, CID, BUF, TIMEOUTS, t0);
        let mut buf = [0u8; 64];
        conn.recv_pkt(&mut buf).unwrap();

        conn.on_deadline(t0 + TIMEOUTS.response);

        assert_eq!(conn.recv_pkt(&mut buf).unwrap().op, OP_RST);
        assert!(conn.is_finished());
    }

    #[test]
    fn unexpected_op_in_local_init_resets() {
        let (ours, _host) = UnixStream::pair().unwrap();
        let key = ConnKey {
            local_port: 1 << 30,
            peer_port: 1024,
        };
        let mut conn = Connection::new_local(ours, key, CID, BUF, TIMEOUTS, Instant::now());
        let mut buf = [0u8; 64];
        conn.recv_pkt(&mut buf).unwrap();

        conn.on_guest_pkt(&guest_pkt(OP_RW, 1), b"x", Instant::now());

        assert_eq!(conn.recv_pkt(&mut buf).unwrap().op, OP_RST);
    }

    #[test]
    fn bogus_guest_fwd_cnt_gives_no_extra_credit() {
        let (mut conn, _host) = established();
        let mut hdr = guest_pkt(OP_CREDIT_UPDATE, 0);
        hdr.buf_alloc = 100;
        hdr.fwd_cnt = 1_000_000;

        conn.on_guest_pkt(&hdr, &[], Instant::now());

        assert!(conn.peer_credit() <= 100);
    }
}
