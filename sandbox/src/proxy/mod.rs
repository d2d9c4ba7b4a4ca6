//! The network egress policy proxy: one per sandbox, on the host, the sandbox's only way
//! out.
//!
//! The sandbox reaches it as an HTTP proxy (`HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY`):
//! - `CONNECT host:port` opens a tunnel for any TCP protocol (TLS, git, ssh...);
//! - an absolute-form request (`GET http://host/path`) is forwarded as plain HTTP; its
//!   `Host` header must match, only its body passes (no second request can follow it),
//!   and the connection closes after the response.
//!
//! Each connection gets one decision: the policy's deny rules, then its allow rules
//! (domains exact or `*.` any depth, optional port; IP/CIDR with port ranges), then the
//! default. Only after an allow is the name resolved, on the host, and every address
//! checked again (see [`decide`](self) for special addresses: loopback, private,
//! link-local, CGNAT, metadata... are refused unless an IP rule names them). An allowed
//! tunnel to a name has its TLS ClientHello read (never changed, never decrypted) and is
//! refused when the SNI names another host. Refusals are HTTP 403/400/503 with an
//! `X-Mxc-Deny: <rule>` header, or 502/504 with `X-Mxc-Error` when the network failed.
//! Every decision is one JSON line in the audit log ([`AuditRecord`]).
//!
//! Limits are always bounded: concurrent connections ([`DEFAULT_MAX_CONNECTIONS`] unless
//! `limits.maxConnections`), the idle timeout ([`DEFAULT_IDLE_TIMEOUT`] unless
//! `limits.idleTimeout`), request heads (16 KiB), ClientHellos (32 KiB), and the
//! bandwidth when `limits.bandwidthBytesPerSec` is set (one token bucket per sandbox).
//!
//! Accepting is generic: [`Proxy::serve`] takes any [`Listener`] (a `UnixListener`, a
//! `TcpListener`), and [`Proxy::serve_connection`] / [`Proxy::spawn_connection`] take an
//! already-accepted stream as an `OwnedFd` (e.g. a vsock connection). The process tiers
//! use [`Proxy::serve_handoff`]: the sandbox's init binds 127.0.0.1:[`SANDBOX_PROXY_PORT`]
//! inside the sandbox's own network namespace and passes the listening socket to the
//! host, where this proxy accepts from it directly (see `handoff.rs`).

mod audit;
mod conn;
mod decide;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod handoff;
mod http;
mod relay;
mod resolve;
pub(crate) mod sys;
mod tls;
mod upstream;

use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use policy::{Egress, Limits, Network};

pub use audit::{now_rfc3339, rfc3339, AuditError, AuditLog, AuditRecord, MAX_AUDIT_BYTES};
pub use decide::{canonical, special_range, SpecialRange};
pub use handoff::{proxy_env, SANDBOX_PROXY_PORT};
pub use resolve::{HostsResolver, ResolveError, Resolver, SystemResolver, MAX_ADDRESSES};
pub use upstream::UpstreamError;

/// Concurrent connections per sandbox when the policy sets no `limits.maxConnections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// The most `limits.maxConnections` may raise it to (each connection is a thread).
pub const MAX_CONNECTIONS_CAP: usize = 4096;
/// Idle timeout of a proxied connection when the policy sets no `limits.idleTimeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long connecting to a destination may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Most denial notices shown per sandbox (the audit log has all of them).
pub const MAX_NOTICES: usize = 20;
/// Stack of a connection thread (buffers live on the heap).
const CONN_STACK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the proxy was shut down")]
    Stopped,
    #[error(
        "the listening socket passed from the sandbox is not a listening IPv4/IPv6 TCP socket"
    )]
    BadHandoff,
}

fn io_err(context: &str) -> impl FnOnce(std::io::Error) -> ProxyError + '_ {
    move |source| ProxyError::Io {
        context: context.to_string(),
        source,
    }
}

/// Receives the one-line notices of refused connections (e.g. to show them on stderr);
/// at most [`MAX_NOTICES`] per proxy, then one saying the rest are in the audit log.
#[derive(Clone)]
pub struct Notices(Arc<dyn Fn(&str) + Send + Sync>);

impl Notices {
    pub fn new(f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
}

impl std::fmt::Debug for Notices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notices(..)")
    }
}

/// Everything one sandbox's proxy needs.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Names the sandbox in audit lines.
    pub sandbox_id: String,
    pub egress: Egress,
    /// `http://host:port` to chain through.
    pub upstream: Option<String>,
    pub max_connections: usize,
    /// Bytes per second, both directions and every connection together.
    pub bandwidth_bps: Option<u64>,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub header_timeout: Duration,
    pub resolver: Arc<dyn Resolver>,
    pub audit: Option<Arc<AuditLog>>,
    pub notices: Option<Notices>,
}

impl ProxyConfig {
    /// The proxy a policy asks for: its egress rules, upstream proxy and limits, the
    /// system resolver, no audit log.
    pub fn from_policy(sandbox_id: &str, network: &Network, limits: &Limits) -> Self {
        Self {
            sandbox_id: sandbox_id.to_string(),
            egress: network.egress.clone(),
            upstream: network.upstream_proxy.clone(),
            max_connections: limits
                .max_connections
                .map_or(DEFAULT_MAX_CONNECTIONS, |n| n as usize)
                .clamp(1, MAX_CONNECTIONS_CAP),
            bandwidth_bps: limits.bandwidth_bps,
            idle_timeout: limits.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT),
            connect_timeout: CONNECT_TIMEOUT,
            header_timeout: HEADER_TIMEOUT,
            resolver: Arc::new(SystemResolver),
            audit: None,
            notices: None,
        }
    }
}

/// Host-side network options of one sandbox (not part of the policy).
#[derive(Debug, Clone, Default)]
pub struct NetOptions {
    /// Append one JSON line per egress decision to this file. On the process tiers it
    /// also puts the proxy in front of allow-all and deny-all policies, so that every
    /// connection attempt is decided and recorded.
    pub audit: Option<PathBuf>,
    /// Resolve names with this instead of the system resolver.
    pub resolver: Option<Arc<dyn Resolver>>,
    /// Where one-line notices of refused connections go (at most [`MAX_NOTICES`]).
    pub notices: Option<Notices>,
}

impl ProxyConfig {
    /// The proxy for a sandbox: the policy's rules and limits plus the host options
    /// (opens the audit log).
    pub fn for_sandbox(
        sandbox_id: &str,
        policy: &policy::Policy,
        options: &NetOptions,
    ) -> Result<Self, ProxyError> {
        let mut c = Self::from_policy(sandbox_id, &policy.network, &policy.limits);
        if let Some(path) = &options.audit {
            c.audit = Some(Arc::new(AuditLog::open(path)?));
        }
        if let Some(r) = &options.resolver {
            c.resolver = r.clone();
        }
        c.notices = options.notices.clone();
        Ok(c)
    }
}

/// Counters since the proxy started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    pub allowed: u64,
    pub denied: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Connections open now.
    pub active: usize,
}

/// A listening socket the proxy can accept streams from.
pub trait Listener: AsRawFd + Send + 'static {}
impl Listener for UnixListener {}
impl Listener for TcpListener {}

/// State shared by the accept loops and connection threads of one proxy.
#[derive(Debug)]
pub(crate) struct Shared {
    config: ProxyConfig,
    upstream: Option<upstream::Upstream>,
    bucket: Option<Mutex<relay::TokenBucket>>,
    active: AtomicUsize,
    stop: sys::StopPipe,
    workers: Mutex<Vec<JoinHandle<()>>>,
    allowed: AtomicU64,
    denied: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    notices_left: AtomicUsize,
}

impl Shared {
    /// Counts and logs a finished connection.
    fn record(&self, rec: &AuditRecord) {
        if rec.action == "allow" {
            self.allowed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.denied.fetch_add(1, Ordering::Relaxed);
            self.notice(rec);
        }
        self.bytes_up.fetch_add(rec.bytes_up, Ordering::Relaxed);
        self.bytes_down.fetch_add(rec.bytes_down, Ordering::Relaxed);
        if let Some(log) = &self.config.audit {
            log.write(rec);
        }
    }

    fn notice(&self, rec: &AuditRecord) {
        let Some(n) = &self.config.notices else {
            return;
        };
        let left = self
            .notices_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        let Ok(left) = left else {
            return;
        };
        let mut line = match &rec.reason {
            Some(reason) => format!("network: {reason}"),
            None => format!("network: denied {}:{} ({})", rec.host, rec.port, rec.rule),
        };
        if left == 1 {
            line.push_str(" (further refusals are not shown here)");
        }
        (n.0)(&line);
    }
}

/// Decrements the open-connection count when a connection ends.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A running policy proxy. Cheap to clone (all clones are the same proxy).
#[derive(Debug, Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Result<Self, ProxyError> {
        let upstream = config
            .upstream
            .as_deref()
            .map(upstream::Upstream::parse)
            .transpose()?;
        let bucket = config
            .bandwidth_bps
            .map(|r| Mutex::new(relay::TokenBucket::new(r)));
        Ok(Self {
            shared: Arc::new(Shared {
                upstream,
                bucket,
                active: AtomicUsize::new(0),
                stop: sys::StopPipe::new().map_err(io_err("creating the proxy stop pipe"))?,
                workers: Mutex::new(Vec::new()),
                allowed: AtomicU64::new(0),
                denied: AtomicU64::new(0),
                bytes_up: AtomicU64::new(0),
                bytes_down: AtomicU64::new(0),
                notices_left: AtomicUsize::new(MAX_NOTICES),
                config,
            }),
        })
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.shared.config
    }

    pub fn stats(&self) -> ProxyStats {
        let s = &self.shared;
        ProxyStats {
            allowed: s.allowed.load(Ordering::Relaxed),
            denied: s.denied.load(Ordering::Relaxed),
            bytes_up: s.bytes_up.load(Ordering::Relaxed),
            bytes_down: s.bytes_down.load(Ordering::Relaxed),
            active: s.active.load(Ordering::Relaxed),
        }
    }

    /// Accepts connections from `listener` on a new thread until the returned
    /// [`Server`] is stopped (or dropped) or the proxy shuts down.
    pub fn serve<L: Listener>(&self, listener: L) -> Result<Server, ProxyError> {
        sys::set_nonblocking(listener.as_raw_fd(), true)
            .map_err(io_err("configuring the proxy listener"))?;
        let stop = Arc::new(sys::StopPipe::new().map_err(io_err("creating a stop pipe"))?);
        let proxy = self.clone();
        let server_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("mxc-proxy-accept".into())
            .spawn(move || proxy.accept_loop(&listener, server_stop.fd()))
            .map_err(io_err("starting the proxy accept thread"))?;
        Ok(Server {
            stop,
            thread: Some(thread),
        })
    }

    /// Like [`Proxy::serve`] for a listening socket that another process will send over
    /// the Unix socket `sock` (see [`handoff`]): waits for it, checks it is a listening
    /// TCP socket, then accepts from it.
    pub fn serve_handoff(&self, sock: OwnedFd) -> Result<Server, ProxyError> {
        let stop = Arc::new(sys::StopPipe::new().map_err(io_err("creating a stop pipe"))?);
        let proxy = self.clone();
        let server_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("mxc-proxy-handoff".into())
            .spawn(move || {
                if let Ok(Some(listener)) = handoff::receive(&sock, server_stop.fd()) {
                    drop(sock);
                    if sys::set_nonblocking(listener.as_raw_fd(), true).is_ok() {
                        proxy.accept_loop(&listener, server_stop.fd());
                    }
                }
            })
            .map_err(io_err("starting the proxy handoff thread"))?;
        Ok(Server {
            stop,
            thread: Some(thread),
        })
    }

    fn accept_loop<L: Listener>(&self, listener: &L, stop: i32) {
        let lfd = listener.as_raw_fd();
        loop {
            let mut fds = [
                sys::pollfd(lfd, libc::POLLIN),
                sys::pollfd(stop, libc::POLLIN),
                sys::pollfd(self.shared.stop.fd(), libc::POLLIN),
            ];
            if sys::poll(&mut fds, None).is_err() || fds[1].revents != 0 || fds[2].revents != 0 {
                return;
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                return;
            }
            loop {
                match sys::accept(lfd) {
                    Ok(stream) => {
                        self.spawn_connection(stream);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    // Out of descriptors or the like: back off instead of spinning.
                    Err(e)
                        if e.raw_os_error().is_some_and(|c| {
                            c == libc::EMFILE
                                || c == libc::ENFILE
                                || c == libc::ENOBUFS
                                || c == libc::ENOMEM
                        }) =>
                    {
                        std::thread::sleep(Duration::from_millis(50));
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
    }

    /// Takes a slot for one more connection, or refuses the stream when none is free.
    fn admit(&self, stream: OwnedFd) -> Option<(OwnedFd, ActiveGuard)> {
        let s = &self.shared;
        if s.stop.is_triggered() {
            return None;
        }
        let limit = s.config.max_connections;
        let before = s.active.fetch_add(1, Ordering::AcqRel);
        let guard = ActiveGuard(s.clone());
        if before >= limit {
            drop(guard);
            conn::refuse_busy(s, stream, limit);
            return None;
        }
        Some((stream, guard))
    }

    /// Serves one already-accepted stream on a new thread. Returns false when it was
    /// refused (connection limit, proxy stopped, no thread).
    pub fn spawn_connection(&self, stream: OwnedFd) -> bool {
        let Some((stream, guard)) = self.admit(stream) else {
            return false;
        };
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("mxc-proxy-conn".into())
            .stack_size(CONN_STACK)
            .spawn(move || {
                conn::handle(&shared, stream);
                drop(guard);
            });
        match spawned {
            Ok(handle) => {
                if let Ok(mut w) = self.shared.workers.lock() {
                    w.retain(|h| !h.is_finished());
                    w.push(handle);
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Serves one already-accepted stream in the calling thread, until it closes.
    pub fn serve_connection(&self, stream: OwnedFd) {
        if let Some((stream, guard)) = self.admit(stream) {
            conn::handle(&self.shared, stream);
            drop(guard);
        }
    }

    /// Stops every accept loop and connection of this proxy and waits for their threads
    /// (so every audit line is written). The proxy accepts nothing afterwards.
    pub fn shutdown(&self) {
        self.shared.stop.trigger();
        let workers: Vec<JoinHandle<()>> = match self.shared.workers.lock() {
            Ok(mut w) => w.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        for w in workers {
            let _ = w.join();
        }
    }
}

/// An accept loop started by [`Proxy::serve`]; stopping it leaves open connections
/// running (they end with the proxy's [`Proxy::shutdown`]).
#[derive(Debug)]
pub struct Server {
    stop: Arc<sys::StopPipe>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.halt();
    }
}
