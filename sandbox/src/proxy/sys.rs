//! The few raw socket operations the proxy needs on plain descriptors (so the same code
//! serves TCP, Unix and vsock streams): non-blocking I/O, poll, connect with a deadline,
//! and passing a listening socket between processes.

use std::io;
use std::net::IpAddr;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sets or clears O_NONBLOCK.
pub(crate) fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns; no memory arguments.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        if libc::fcntl(fd, libc::F_SETFL, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// TCP_NODELAY, ignoring sockets that are not TCP.
pub(crate) fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one int we own; failure (not TCP) is ignored.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// recv(2) into `buf`. `Ok(0)` is end of stream.
pub(crate) fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: recv writes at most buf.len() bytes into the buffer we own.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// send(2) without SIGPIPE.
pub(crate) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: send reads at most buf.len() bytes from the buffer we own.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Sends all of `buf` on a (possibly non-blocking) socket before `deadline`, waking early
/// when `stop` becomes readable.
pub(crate) fn send_all(
    fd: RawFd,
    mut buf: &[u8],
    deadline: Instant,
    stop: RawFd,
) -> io::Result<()> {
    while !buf.is_empty() {
        match send(fd, buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(fd, libc::POLLOUT, deadline, stop)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// shutdown(2) of the write side; errors (already closed) are ignored.
pub(crate) fn shutdown_write(fd: RawFd) {
    // SAFETY: shutdown has no memory arguments.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// poll(2) over `fds` for at most `timeout` (None: forever). Returns how many are ready.
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = match timeout {
        None => -1,
        Some(t) => t.as_millis().clamp(0, i32::MAX as u128) as i32,
    };
    loop {
        // SAFETY: poll reads and writes exactly fds.len() pollfd entries we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub(crate) fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Waits until `fd` is ready for `events`; `TimedOut` at the deadline, `Interrupted` when
/// `stop` fires first.
pub(crate) fn wait(
    fd: RawFd,
    events: libc::c_short,
    deadline: Instant,
    stop: RawFd,
) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let mut fds = [pollfd(fd, events), pollfd(stop, libc::POLLIN)];
        poll(&mut fds, Some(left))?;
        if fds[1].revents != 0 {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "proxy stopping"));
        }
        if fds[0].revents != 0 {
            return Ok(());
        }
    }
}

/// A non-blocking TCP connection to `addr`, established before `deadline`.
pub(crate) fn connect(addr: SocketAddr, deadline: Instant, stop: RawFd) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket has no memory arguments.
    let raw = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let (storage, len) = sockaddr(addr);
    // SAFETY: connect reads `len` bytes of the sockaddr we built.
    let r = unsafe { libc::connect(raw, (&storage as *const libc::sockaddr_storage).cast(), len) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        wait(raw, libc::POLLOUT, deadline, stop)?;
        let mut err: libc::c_int = 0;
        let mut elen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes one int into our variable.
        let r = unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut elen,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
    }
    set_nodelay(raw);
    Ok(fd)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// A pipe whose write end, when dropped, wakes everyone polling the read end: the
/// proxy's stop signal.
#[derive(Debug)]
pub(crate) struct StopPipe {
    read: OwnedFd,
    write: std::sync::Mutex<Option<OwnedFd>>,
}

impl StopPipe {
    pub(crate) fn new() -> io::Result<Self> {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two descriptors into our array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Self {
            read: r,
            write: std::sync::Mutex::new(Some(w)),
        })
    }

    /// The descriptor to poll for POLLIN (it reports POLLHUP once stopped).
    pub(crate) fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    pub(crate) fn trigger(&self) {
        if let Ok(mut w) = self.write.lock() {
            w.take();
        }
    }

    pub(crate) fn is_triggered(&self) -> bool {
        self.write.lock().map_or(true, |w| w.is_none())
    }
}

/// A connected pair of Unix sequenced-packet sockets, both close-on-exec.
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two descriptors into our array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Most descriptors one message carries.
pub(crate) const MAX_FDS: usize = 8;

/// Sends `data` (at least one byte) and the descriptors `fds` as one message over the
/// Unix socket `sock` (SCM_RIGHTS).
pub(crate) fn send_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if data.is_empty() || fds.len() > MAX_FDS {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // Room for MAX_FDS descriptors, aligned for cmsghdr.
    let mut space = [0u64; 16];
    // SAFETY: an all-zero msghdr is a valid value; we fill the fields below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds) as u32;
        msg.msg_control = space.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes) } as _;
        // SAFETY: msg_control points at `space` (128 bytes, enough for MAX_FDS
        // descriptors); CMSG_FIRSTHDR/CMSG_DATA stay inside it. sendmsg only reads
        // `data` (the iovec's mutable pointer is never written through).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null() {
                return Err(io::ErrorKind::InvalidInput.into());
            }
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(bytes) as _;
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>().add(i), *fd);
            }
        }
    }
    // SAFETY: msg points at our iovec and control buffer, valid for the call.
    let sent = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != data.len() {
        return Err(io::ErrorKind::WriteZero.into());
    }
    Ok(())
}

/// Receives one message sent with [`send_fds`] into `buf`: its length (0 when the peer
/// closed) and its descriptors (close-on-exec; at most [`MAX_FDS`], extra ones closed).
pub(crate) fn recv_fds(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut space = [0u64; 16];
    // SAFETY: an all-zero msghdr is a valid value; we fill the fields below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&space) as _;
    // SAFETY: recvmsg writes into the buffers msg points at (`buf`, 128 bytes of
    // control space); MSG_CMSG_CLOEXEC marks any received descriptor close-on-exec.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut received: Vec<OwnedFd> = Vec::new();
    // SAFETY: the CMSG_* walk stays inside the control buffer recvmsg filled (its
    // length is msg_controllen); every descriptor found is taken into an OwnedFd so
    // extra ones are closed.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    received.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "truncated message or control data",
        ));
    }
    received.truncate(MAX_FDS);
    Ok((n as usize, received))
}

/// Sends the descriptor `fd` over the Unix socket `sock` (SCM_RIGHTS).
pub(crate) fn send_fd(sock: RawFd, fd: RawFd) -> io::Result<()> {
    send_fds(sock, b"L", &[fd])
}

/// Receives one descriptor sent with [`send_fd`]. `Ok(None)` when the peer closed
/// without sending one.
pub(crate) fn recv_fd(sock: RawFd) -> io::Result<Option<OwnedFd>> {
    let mut byte = [0u8; 1];
    let (n, fds) = recv_fds(sock, &mut byte)?;
    if n == 0 {
        return Ok(None);
    }
    Ok(fds.into_iter().next())
}

/// The socket's `SO_DOMAIN` and whether it is listening (`SO_ACCEPTCONN`).
pub(crate) fn socket_kind(fd: RawFd) -> io::Result<(libc::c_int, bool)> {
    let get = |opt: libc::c_int| -> io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes one int into our variable.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(v)
    };
    Ok((get(libc::SO_DOMAIN)?, get(libc::SO_ACCEPTCONN)? != 0))
}

/// A TCP listener on 127.0.0.1:`port` with a deep accept queue.
pub(crate) fn listen_loopback(port: u16) -> io::Result<TcpListener> {
    let l = TcpListener::bind(("127.0.0.1", port))?;
    // SAFETY: listen has no memory arguments; raising the backlog of a listening socket.
    if unsafe { libc::listen(l.as_raw_fd(), 1024) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(l)
}

/// Accepts one pending connection on a non-blocking listener, close-on-exec.
pub(crate) fn accept(fd: RawFd) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: accept4 with null address pointers writes nothing to our memory.
        let r = unsafe {
            libc::accept4(
                fd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if r >= 0 {
            // SAFETY: r is a new descriptor owned by nobody else.
            return Ok(unsafe { OwnedFd::from_raw_fd(r) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A pipe that bytes move through between two sockets with splice(2), without being
/// copied into this process.
#[derive(Debug)]
pub(crate) struct SplicePipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes in the pipe now.
    pub held: usize,
    /// Most bytes asked of the source at once.
    pub capacity: usize,
}

impl SplicePipe {
    /// A non-blocking pipe, enlarged towards `size` bytes where the system allows.
    pub(crate) fn new(size: usize) -> io::Result<Self> {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two descriptors into our array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl without memory arguments; a refusal leaves the default size.
        let got =
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
        // SAFETY: as above, only reading the size.
        let actual = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let capacity = if got > 0 { got } else { actual.max(4096) } as usize;
        Ok(Self {
            read,
            write,
            held: 0,
            capacity,
        })
    }

    fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        loop {
            // SAFETY: splice between two descriptors we hold, with null offsets (both
            // are a pipe or a socket); no memory of ours is touched.
            let n = unsafe {
                libc::splice(
                    from,
                    std::ptr::null_mut(),
                    to,
                    std::ptr::null_mut(),
                    len,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Moves up to `len` bytes from the socket `src` into the pipe. `Ok(0)`: end of stream.
    pub(crate) fn fill_from(&mut self, src: RawFd, len: usize) -> io::Result<usize> {
        let n = Self::splice(src, self.write.as_raw_fd(), len)?;
        self.held += n;
        Ok(n)
    }

    /// Moves what the pipe holds to the socket `dst`.
    pub(crate) fn drain_to(&mut self, dst: RawFd) -> io::Result<usize> {
        let n = Self::splice(self.read.as_raw_fd(), dst, self.held)?;
        self.held = self.held.saturating_sub(n);
        Ok(n)
    }
}

/// How long the list of the host's addresses is trusted before it is read again.
const HOST_ADDRESSES_TTL: Duration = Duration::from_secs(2);

/// The host's interface addresses (of this thread's network namespace: the proxy's runs in
/// the host's), read with getifaddrs(3) at most every [`HOST_ADDRESSES_TTL`].
static HOST_ADDRESSES: Mutex<Option<(Instant, Vec<IpAddr>)>> = Mutex::new(None);

/// Whether `addr` is an address of one of the host's network interfaces.
pub(crate) fn host_address(addr: IpAddr) -> bool {
    let mut cache = HOST_ADDRESSES.lock().unwrap_or_else(|e| e.into_inner());
    let fresh = cache
        .as_ref()
        .is_some_and(|(at, _)| at.elapsed() < HOST_ADDRESSES_TTL);
    if !fresh {
        *cache = Some((Instant::now(), interface_addresses()));
    }
    cache.as_ref().is_some_and(|(_, list)| list.contains(&addr))
}

/// Every IPv4 and IPv6 address of this namespace's interfaces (empty if they cannot be
/// read).
pub(crate) fn interface_addresses() -> Vec<IpAddr> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr whose family says its real type.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                out.push(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ));
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}
