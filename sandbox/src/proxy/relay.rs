//! Moving bytes between the sandbox's connection and the remote end: one thread per
//! connection, both directions multiplexed with poll(2) on non-blocking sockets (so a
//! peer that stops reading in one direction cannot stall the other), with the idle
//! timeout, the shared bandwidth bucket, the proxy's stop signal, and the two gates on
//! the client's bytes: the TLS ClientHello check of a tunnel and the body framing of a
//! forwarded request.

use std::io;
use std::os::fd::RawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::http::{self, BodyLimit, Host as HttpHost, HttpError, InTunnel};
use super::sys;
use super::tls::{self, Hello};

/// Bytes buffered per direction.
pub(crate) const BUF_SIZE: usize = 64 * 1024;
/// Size asked for the pipe of a spliced direction (the kernel may give less).
const PIPE_SIZE: usize = 256 * 1024;

/// A token bucket shared by every connection of a sandbox (both directions count).
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate` bytes per second, with a burst of a quarter second (at least 16 KiB).
    pub(crate) fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        let burst = (rate / 4.0).max(16.0 * 1024.0);
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes up to `want` tokens; `Err(wait)` when none are available yet.
    pub(crate) fn take(&mut self, want: usize, now: Instant) -> Result<usize, Duration> {
        self.refill(now);
        if self.tokens < 1.0 {
            let need = 1.0 - self.tokens;
            return Err(Duration::from_secs_f64(need / self.rate).max(Duration::from_millis(1)));
        }
        let n = (self.tokens.floor() as usize).min(want);
        self.tokens -= n as f64;
        Ok(n)
    }

    /// Returns tokens taken but not used.
    pub(crate) fn give_back(&mut self, n: usize) {
        self.tokens = (self.tokens + n as f64).min(self.burst);
    }
}

/// What the client's bytes must pass before they reach the remote end.
#[derive(Debug)]
pub(crate) enum Gate {
    /// Nothing: pass everything.
    Open,
    /// A CONNECT to a host name: the client's first bytes are held until they show the
    /// name they are for -- a TLS ClientHello's server name or a plain-HTTP request's
    /// Host -- and it is the CONNECT host. Anything else (TLS without a server name, other
    /// protocols) is refused: the tunnel's destination could not be checked.
    Sni { host: String },
    /// A forwarded request: only its body passes; the rest is dropped.
    Body(BodyLimit),
    /// A plain-HTTP request checked at the start of a tunnel: its body passes; a second
    /// request (whose Host was not checked) ends the tunnel.
    OneRequest(BodyLimit),
}

/// Why a relay ended.
#[derive(Debug)]
pub(crate) enum End {
    /// Both sides finished normally.
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
    /// The proxy was stopped.
    Stopped,
    /// A socket error.
    Error(io::Error),
    /// The tunnel's TLS server name is not the CONNECT host.
    SniMismatch { sni: String },
    /// The tunnel's first bytes were a malformed or oversized TLS handshake.
    BadHello(&'static str),
    /// The tunnel's bytes do not show a destination that is the CONNECT host: `rule` for
    /// the audit line, `why` for the person; `http`: the client speaks HTTP (it gets a 403).
    Unchecked {
        rule: &'static str,
        why: String,
        http: bool,
    },
    /// The forwarded request's body framing was broken.
    BadBody(HttpError),
}

#[derive(Debug)]
pub(crate) struct Outcome {
    pub up: u64,
    pub down: u64,
    /// The first bytes sent to the client (up to [`HEAD_CAPTURE`]).
    pub down_head: Vec<u8>,
    pub end: End,
}

/// How many of the first bytes towards the client an [`Outcome`] keeps.
pub(crate) const HEAD_CAPTURE: usize = 32;

/// One direction: bytes read from `src`, buffered, written to `dst`.
struct Flow {
    src: RawFd,
    dst: RawFd,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// `src` reached end of stream (or the gate closed it).
    eof: bool,
    /// The bandwidth bucket is empty: do not wait for `src` to be readable.
    throttled: bool,
    /// `dst`'s write side was shut after `eof` and the flush.
    shut: bool,
    /// Shut `dst`'s write side at the end (not for a forwarded request: some origins
    /// take a half-close for an abort).
    half_close: bool,
    bytes: u64,
    /// The first bytes written to `dst` (a response's status line), when captured.
    head: Vec<u8>,
    capture: usize,
    /// Once nothing needs to see this direction's bytes, they move through a pipe with
    /// splice(2) and never enter this process.
    pipe: Option<sys::SplicePipe>,
    /// Splicing failed to start (no pipes left): stay with the buffer.
    no_splice: bool,
}

impl Flow {
    fn new(src: RawFd, dst: RawFd, initial: Vec<u8>, half_close: bool) -> Self {
        let mut buf = initial;
        let end = buf.len();
        if buf.len() < BUF_SIZE {
            buf.resize(BUF_SIZE, 0);
        }
        Self {
            src,
            dst,
            buf,
            start: 0,
            end,
            eof: false,
            throttled: false,
            shut: false,
            half_close,
            bytes: 0,
            head: Vec::new(),
            capture: 0,
            pipe: None,
            no_splice: false,
        }
    }

    /// Switches to splicing when the buffer is empty, no gate needs the bytes, and the
    /// first bytes have been captured.
    fn maybe_splice(&mut self, gated: bool) {
        if self.pipe.is_some()
            || self.no_splice
            || gated
            || self.eof
            || self.start < self.end
            || (self.capture > 0 && self.bytes == 0)
        {
            return;
        }
        match sys::SplicePipe::new(PIPE_SIZE) {
            Ok(p) => {
                self.pipe = Some(p);
                self.buf = Vec::new();
                self.start = 0;
                self.end = 0;
            }
            Err(_) => self.no_splice = true,
        }
    }

    fn pending(&self) -> bool {
        self.start < self.end || self.pipe.as_ref().is_some_and(|p| p.held > 0)
    }

    fn wants_read(&self) -> bool {
        let room = match &self.pipe {
            // A pipe is refilled only once it is empty: splice can find it full with
            // fewer bytes than its size, and then poll would never stop waking us.
            Some(p) => p.held == 0,
            None => self.end < self.buf.len(),
        };
        !self.eof && !self.throttled && room
    }

    fn finished(&self) -> bool {
        self.eof && !self.pending() && (self.shut || !self.half_close)
    }
}

/// The parameters of one relay.
pub(crate) struct Relay<'a> {
    pub client: RawFd,
    pub server: RawFd,
    pub stop: RawFd,
    pub idle: Duration,
    pub bucket: Option<&'a Mutex<TokenBucket>>,
    /// Client bytes already read (after the request head) that go first.
    pub client_initial: Vec<u8>,
    /// Server bytes already read (after an upstream proxy's reply) that go first.
    pub server_initial: Vec<u8>,
    pub gate: Gate,
    /// A forwarded request: the relay ends when the server's side is done.
    pub request_mode: bool,
}

enum Step {
    Progress,
    Blocked,
    Wait(Duration),
}

impl Relay<'_> {
    pub(crate) fn run(self) -> Outcome {
        let client = self.client;
        let server = self.server;
        for fd in [client, server] {
            if let Err(e) = sys::set_nonblocking(fd, true) {
                return Outcome {
                    up: 0,
                    down: 0,
                    down_head: Vec::new(),
                    end: End::Error(e),
                };
            }
        }
        // The client's early bytes (after its request head) go first, through the gate.
        let early = !self.client_initial.is_empty();
        let mut up = Flow::new(client, server, self.client_initial, !self.request_mode);
        let mut down = Flow::new(server, client, self.server_initial, true);
        down.capture = HEAD_CAPTURE;
        let mut gate = self.gate;
        if matches!(&gate, Gate::Body(limit) if limit.done()) {
            up.eof = true;
        }
        let end = (|| {
            if early {
                if let Err(e) = apply_gate(&mut gate, &mut up, 0) {
                    return e;
                }
            }
            relay_loop(
                &mut up,
                &mut down,
                &mut gate,
                self.stop,
                self.idle,
                self.bucket,
                self.request_mode,
            )
        })();
        Outcome {
            up: up.bytes,
            down: down.bytes,
            down_head: down.head,
            end,
        }
    }
}

fn relay_loop(
    up: &mut Flow,
    down: &mut Flow,
    gate: &mut Gate,
    stop: RawFd,
    idle: Duration,
    bucket: Option<&Mutex<TokenBucket>>,
    request_mode: bool,
) -> End {
    let mut last_activity = Instant::now();
    loop {
        let mut wait: Option<Duration> = None;
        loop {
            let a = match pump(up, Some(&mut *gate), bucket) {
                Ok(s) => s,
                Err(e) => return e,
            };
            let b = match pump(down, None, bucket) {
                Ok(s) => s,
                Err(e) => return e,
            };
            let progressed = matches!(a, Step::Progress) || matches!(b, Step::Progress);
            for s in [a, b] {
                if let Step::Wait(d) = s {
                    wait = Some(wait.map_or(d, |w: Duration| w.min(d)));
                }
            }
            if progressed {
                last_activity = Instant::now();
                wait = None;
                continue;
            }
            break;
        }
        if request_mode && down.finished() {
            return End::Closed;
        }
        if up.finished() && down.finished() {
            return End::Closed;
        }
        let idle_left = idle.saturating_sub(last_activity.elapsed());
        if idle_left.is_zero() {
            return End::Idle;
        }
        let gate_holds = matches!(gate, Gate::Sni { .. });
        let client_events = interest(up.wants_read(), down.pending());
        let server_events = interest(down.wants_read(), up.pending() && !gate_holds);
        let mut fds = [
            sys::pollfd(if client_events != 0 { up.src } else { -1 }, client_events),
            sys::pollfd(
                if server_events != 0 { down.src } else { -1 },
                server_events,
            ),
            sys::pollfd(stop, libc::POLLIN),
        ];
        let timeout = wait.map_or(idle_left, |w| w.min(idle_left));
        if let Err(e) = sys::poll(&mut fds, Some(timeout)) {
            return End::Error(e);
        }
        if fds[2].revents != 0 {
            return End::Stopped;
        }
    }
}

fn interest(read: bool, write: bool) -> libc::c_short {
    let mut e = 0;
    if read {
        e |= libc::POLLIN;
    }
    if write {
        e |= libc::POLLOUT;
    }
    e
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Moves what one direction can move now without blocking.
fn pump(
    flow: &mut Flow,
    gate: Option<&mut Gate>,
    bucket: Option<&Mutex<TokenBucket>>,
) -> Result<Step, End> {
    let gated = !matches!(gate.as_deref(), None | Some(Gate::Open));
    flow.maybe_splice(gated);
    if flow.pipe.is_some() {
        return pump_spliced(flow, bucket);
    }
    let holds = matches!(gate.as_deref(), Some(Gate::Sni { .. }));
    let mut step = Step::Blocked;
    flow.throttled = false;
    // Write what is buffered first.
    if flow.pending() && !holds {
        match sys::send(flow.dst, &flow.buf[flow.start..flow.end]) {
            Ok(n) => {
                if flow.head.len() < flow.capture {
                    let take = n.min(flow.capture - flow.head.len());
                    let from = flow.start;
                    flow.head.extend_from_slice(&flow.buf[from..from + take]);
                }
                flow.start += n;
                flow.bytes += n as u64;
                if flow.start == flow.end {
                    flow.start = 0;
                    flow.end = 0;
                }
                step = Step::Progress;
            }
            Err(e) if would_block(&e) => {}
            Err(e) => return Err(End::Error(e)),
        }
    }
    // Then read more, if there is room.
    if !flow.eof && flow.end < flow.buf.len() && (!flow.pending() || holds) {
        let room = flow.buf.len() - flow.end;
        let allowed = match bucket {
            None => room,
            Some(b) => {
                let mut b = b
                    .lock()
                    .map_err(|_| End::Error(io::ErrorKind::Other.into()))?;
                match b.take(room, Instant::now()) {
                    Ok(n) => n,
                    Err(wait) => {
                        flow.throttled = true;
                        return Ok(merge(step, Step::Wait(wait)));
                    }
                }
            }
        };
        let before = flow.end;
        let got = sys::recv(flow.src, &mut flow.buf[before..before + allowed]);
        let used = match &got {
            Ok(n) => *n,
            Err(_) => 0,
        };
        if let Some(b) = bucket {
            if let Ok(mut b) = b.lock() {
                b.give_back(allowed - used);
            }
        }
        match got {
            Ok(0) => {
                flow.eof = true;
                if let Some(g) = gate {
                    if matches!(g, Gate::Sni { .. }) {
                        // The client gave up before finishing its first message.
                        *g = Gate::Open;
                    }
                }
                step = Step::Progress;
            }
            Ok(n) => {
                flow.end += n;
                if let Some(g) = gate {
                    apply_gate(g, flow, before)?;
                }
                step = Step::Progress;
            }
            Err(e) if would_block(&e) => {}
            Err(e) => return Err(End::Error(e)),
        }
    }
    if flow.eof && !flow.pending() && !flow.shut && flow.half_close {
        sys::shutdown_write(flow.dst);
        flow.shut = true;
        step = Step::Progress;
    }
    Ok(step)
}

/// [`pump`] for a direction that moves through a pipe.
fn pump_spliced(flow: &mut Flow, bucket: Option<&Mutex<TokenBucket>>) -> Result<Step, End> {
    let Some(pipe) = flow.pipe.as_mut() else {
        return Ok(Step::Blocked);
    };
    let mut step = Step::Blocked;
    flow.throttled = false;
    loop {
        if pipe.held > 0 {
            match pipe.drain_to(flow.dst) {
                Ok(n) => {
                    flow.bytes += n as u64;
                    step = Step::Progress;
                    if pipe.held > 0 {
                        continue;
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(End::Error(e)),
            }
        }
        if flow.eof || pipe.held > 0 {
            break;
        }
        let allowed = match bucket {
            None => pipe.capacity,
            Some(b) => {
                let mut b = b
                    .lock()
                    .map_err(|_| End::Error(io::ErrorKind::Other.into()))?;
                match b.take(pipe.capacity, Instant::now()) {
                    Ok(n) => n,
                    Err(wait) => {
                        flow.throttled = true;
                        return Ok(merge(step, Step::Wait(wait)));
                    }
                }
            }
        };
        let got = pipe.fill_from(flow.src, allowed);
        let used = match &got {
            Ok(n) => *n,
            Err(_) => 0,
        };
        if let Some(b) = bucket {
            if let Ok(mut b) = b.lock() {
                b.give_back(allowed - used);
            }
        }
        match got {
            Ok(0) => {
                flow.eof = true;
                step = Step::Progress;
            }
            Ok(_) => step = Step::Progress,
            Err(e) if would_block(&e) => break,
            Err(e) => return Err(End::Error(e)),
        }
    }
    if flow.eof && pipe.held == 0 && !flow.shut && flow.half_close {
        sys::shutdown_write(flow.dst);
        flow.shut = true;
        step = Step::Progress;
    }
    Ok(step)
}

fn merge(a: Step, b: Step) -> Step {
    match a {
        Step::Progress => Step::Progress,
        _ => b,
    }
}

/// Runs the gate over the bytes just read into `flow.buf[new_from..flow.end]`.
fn apply_gate(gate: &mut Gate, flow: &mut Flow, new_from: usize) -> Result<(), End> {
    match gate {
        Gate::Open => Ok(()),
        Gate::Sni { host } => match tls::inspect(&flow.buf[flow.start..flow.end]) {
            Hello::NeedMore if flow.end == flow.buf.len() => {
                Err(End::BadHello("the TLS ClientHello is too large"))
            }
            Hello::NeedMore => Ok(()),
            Hello::Sni(Some(sni)) if sni.trim_end_matches('.') == host.as_str() => {
                *gate = Gate::Open;
                Ok(())
            }
            Hello::Sni(Some(sni)) => Err(End::SniMismatch { sni }),
            Hello::Sni(None) => Err(End::Unchecked {
                rule: "tls-no-sni",
                why: format!(
                    "the TLS ClientHello through the tunnel to \"{host}\" names no server, \
                     so where it goes cannot be checked"
                ),
                http: false,
            }),
            Hello::Malformed(why) => Err(End::BadHello(why)),
            Hello::NotTls => plain_http_gate(gate, flow),
        },
        Gate::OneRequest(limit) => feed_one_request(limit, flow, new_from),
        Gate::Body(limit) => {
            if limit.done() {
                flow.end = new_from;
                flow.eof = true;
                return Ok(());
            }
            let body = limit
                .feed(&flow.buf[new_from..flow.end])
                .map_err(End::BadBody)?;
            flow.end = new_from + body;
            if limit.done() {
                // Whatever follows the body (a second request) is dropped.
                flow.eof = true;
            }
            Ok(())
        }
    }
}

/// Passes the body of a tunnel's checked plain-HTTP request (`flow.buf[from..flow.end]`
/// are new bytes); a byte after it starts a request whose Host is unchecked.
fn feed_one_request(limit: &mut BodyLimit, flow: &mut Flow, from: usize) -> Result<(), End> {
    let new = &flow.buf[from..flow.end];
    let n = if limit.done() {
        0
    } else {
        limit.feed(new).map_err(End::BadBody)?
    };
    if n < new.len() {
        return Err(End::Unchecked {
            rule: "tunnel-second-request",
            why: "a second plain-HTTP request in one tunnel: open a tunnel for each (each \
                  request's Host is checked)"
                .to_string(),
            http: true,
        });
    }
    Ok(())
}

/// The first bytes through a tunnel to a host name are not TLS: plain HTTP whose Host is
/// that name passes (one request), anything else is refused.
fn plain_http_gate(gate: &mut Gate, flow: &mut Flow) -> Result<(), End> {
    let Gate::Sni { host } = gate else {
        return Ok(());
    };
    let refuse = |rule, why: String, http| Err(End::Unchecked { rule, why, http });
    match http::request_in_tunnel(&flow.buf[flow.start..flow.end]) {
        Ok(InTunnel::NeedMore) if flow.end == flow.buf.len() => refuse(
            "tunnel-unchecked",
            "the request head through the tunnel is too large".to_string(),
            true,
        ),
        Ok(InTunnel::NeedMore) => Ok(()),
        Ok(InTunnel::NotHttp) => refuse(
            "tunnel-unchecked",
            format!(
                "the bytes through the tunnel to \"{host}\" are neither TLS nor HTTP, so \
                 where they go cannot be checked by name (an IP rule for the address allows \
                 other protocols)"
            ),
            false,
        ),
        Ok(InTunnel::Request {
            host: named,
            head_len,
            body,
        }) => {
            if !matches!(&named, HttpHost::Name(n) if n == host) {
                return refuse(
                    "tunnel-host-mismatch",
                    format!(
                        "the request through the tunnel to \"{host}\" is for \"{named}\" \
                         (domain fronting)"
                    ),
                    true,
                );
            }
            let mut limit = BodyLimit::new(&body);
            feed_one_request(&mut limit, flow, flow.start + head_len)?;
            *gate = Gate::OneRequest(limit);
            Ok(())
        }
        Err(e) => refuse(
            "tunnel-unchecked",
            format!("the request through the tunnel to \"{host}\": {e}"),
            true,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_grants_the_burst_then_paces() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1 << 20);

        let first = b.take(1 << 20, t0);
        let second = b.take(1 << 20, t0);
        let later = b.take(1 << 20, t0 + Duration::from_millis(100));

        assert_eq!(first, Ok(1 << 18));
        assert!(matches!(second, Err(d) if d <= Duration::from_millis(2)));
        assert_eq!(later, Ok(104_857));
    }

    #[test]
    fn bucket_takes_back_unused_tokens() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(64 * 1024);
        let n = b.take(usize::MAX, t0).unwrap();

        b.give_back(n);

        assert_eq!(b.take(usize::MAX, t0), Ok(n));
    }
}
