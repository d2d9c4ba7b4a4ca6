//! Thin, safe wrappers over the Linux system calls the agent needs. All raw FFI of the
//! agent lives here; the rest of the crate is safe code.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::c_char;
use std::path::Path;

/// Converts a `-1`-on-error return value into an `io::Result`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Like [`cvt`], retrying on `EINTR`.
fn cvt_retry(mut f: impl FnMut() -> libc::c_int) -> io::Result<libc::c_int> {
    loop {
        match cvt(f()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn path_cstring(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// `renameat2(from, to, RENAME_NOREPLACE)`: fails with `EEXIST` where `to` exists.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let from = path_cstring(from)?;
    let to = path_cstring(to)?;
    // SAFETY: both paths are NUL-terminated strings that live across the call.
    cvt(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    })?;
    Ok(())
}

/// Our process id.
pub fn getpid() -> libc::pid_t {
    // SAFETY: getpid has no preconditions and cannot fail.
    unsafe { libc::getpid() }
}

/// Whether we run with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A pipe whose ends are both close-on-exec: `(read, write)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both are fresh descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Puts a descriptor into non-blocking mode.
pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor we hold; no pointers involved.
    unsafe {
        let flags = cvt(libc::fcntl(raw, libc::F_GETFL))?;
        cvt(libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK))?;
    }
    Ok(())
}

/// `read(2)` into `buf`, retrying on `EINTR`.
pub fn read(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `write(2)` from `buf`, retrying on `EINTR`. (SIGPIPE is ignored by the agent, so a
/// closed peer is `EPIPE`.)
pub fn write(fd: &impl AsRawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Opens a file with `O_CLOEXEC` added to `flags`.
pub fn open(path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = path_cstring(path)?;
    // SAFETY: `c` is a valid NUL-terminated path; the mode argument is only read with
    // O_CREAT, which callers do not pass.
    let fd = cvt_retry(|| unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: open succeeded; the descriptor is ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether descriptor `fd` is open.
pub fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// Duplicates `src` onto descriptor number `target` (which is then not close-on-exec).
pub fn dup_to(src: &impl AsRawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: dup2 takes two descriptor numbers; `src` is open for the call.
    cvt(unsafe { libc::dup2(src.as_raw_fd(), target) })?;
    Ok(())
}

/// Makes `src` available as descriptor `target`: keeps it when it already is `target`
/// (open returns the lowest free number), otherwise duplicates it there.
pub fn install_at(src: OwnedFd, target: RawFd) {
    use std::os::fd::IntoRawFd;
    if src.as_raw_fd() == target {
        let _ = src.into_raw_fd();
    } else {
        let _ = dup_to(&src, target);
    }
}

/// Makes sure descriptors 0, 1 and 2 are open, so no pipe or socket we create lands on
/// them (a child's `dup2` onto 0..2 would otherwise clobber it).
pub fn ensure_std_fds() {
    for fd in (0..3).filter(|fd| !is_open(*fd)) {
        let filler = open(Path::new("/dev/null"), libc::O_RDWR)
            .or_else(|_| pipe().map(|(r, _w)| r))
            .ok();
        if let Some(f) = filler {
            install_at(f, fd);
        }
    }
}

/// Which signals the agent takes through its signalfd.
pub const HANDLED_SIGNALS: [libc::c_int; 6] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is a plain bit array; zeroed is a valid value before sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid constants.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Blocks [`HANDLED_SIGNALS`] and returns a non-blocking signalfd for them; SIGPIPE is
/// ignored so a dead peer is an `EPIPE` error rather than our death.
pub fn signalfd() -> io::Result<OwnedFd> {
    let set = sigset(&HANDLED_SIGNALS);
    // SAFETY: `set` is a valid sigset_t; the old mask is not wanted (null). SIG_IGN for
    // SIGPIPE installs no handler code.
    unsafe {
        cvt(libc::sigprocmask(
            libc::SIG_BLOCK,
            &set,
            std::ptr::null_mut(),
        ))?;
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    // SAFETY: `set` is valid; -1 asks for a new descriptor.
    let fd = cvt(unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) })?;
    // SAFETY: signalfd succeeded; the descriptor is ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The next pending signal number from a signalfd, or `None` when none is pending.
pub fn read_signal(fd: &impl AsRawFd) -> io::Result<Option<u32>> {
    // SAFETY: signalfd_siginfo is plain data; all-zero is a valid value.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: `info` is valid for reads and writes of `size` bytes and outlives `buf`.
    let buf = unsafe {
        std::slice::from_raw_parts_mut(
            (&mut info as *mut libc::signalfd_siginfo).cast::<u8>(),
            size,
        )
    };
    match read(fd, buf) {
        Ok(n) if n == size => Ok(Some(info.ssi_signo)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Readiness flags, as in `epoll_event.events`.
pub const EV_IN: u32 = libc::EPOLLIN as u32;
/// Writable.
pub const EV_OUT: u32 = libc::EPOLLOUT as u32;

/// A level-triggered epoll instance.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

impl std::os::fd::AsFd for Epoll {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }
}

impl Epoll {
    /// A new epoll instance.
    pub fn new() -> io::Result<Self> {
        // SAFETY: no pointers; returns a new descriptor or -1.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: epoll_create1 succeeded; the descriptor is ours alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) })?;
        Ok(())
    }

    /// Watches `fd` for `events`, reporting `token`.
    pub fn add(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, events)
    }

    /// Changes the events watched on `fd`.
    pub fn modify(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, events)
    }

    /// Stops watching `fd`.
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits up to `timeout_ms` (-1: forever) and returns `(token, events)` pairs.
    pub fn wait(&self, out: &mut Vec<(u64, u32)>, timeout_ms: i32) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        // SAFETY: `events` is valid for 64 entries, the count we pass.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                timeout_ms,
            )
        };
        out.clear();
        if n == -1 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(err)
            };
        }
        out.extend(events[..n as usize].iter().map(|e| (e.u64, e.events)));
        Ok(())
    }
}

/// A listening vsock stream socket on `port` for any CID, non-blocking.
pub fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation; returns a new descriptor or -1.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    // SAFETY: socket succeeded; the descriptor is ours alone.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is valid before we fill it.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: `addr` is a valid sockaddr_vm and we pass its exact size.
    cvt(unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    // SAFETY: listen on a socket we own.
    cvt(unsafe { libc::listen(sock.as_raw_fd(), 64) })?;
    Ok(sock)
}

/// Accepts one connection, non-blocking and close-on-exec; `None` when none is waiting.
pub fn accept(listener: &impl AsRawFd) -> io::Result<Option<OwnedFd>> {
    // SAFETY: we do not want the peer address (null pointers are allowed).
    let ret = cvt_retry(|| unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    });
    match ret {
        // SAFETY: accept4 returned a new descriptor that is ours alone.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) })),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        // A connection that died while queued is not our error.
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Where an outgoing stream connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamTarget {
    /// A vsock `(cid, port)`.
    Vsock { cid: u32, port: u32 },
    /// A Unix stream socket path.
    Unix(std::path::PathBuf),
}

/// Starts a non-blocking, close-on-exec stream connection to `target` (a vsock connect
/// gives up after `timeout`). Returns the socket and whether the connection is still in
/// progress (wait for it to become writable, then read [`take_socket_error`]).
pub fn connect_nonblocking(
    target: &StreamTarget,
    timeout: std::time::Duration,
) -> io::Result<(OwnedFd, bool)> {
    let domain = match target {
        StreamTarget::Vsock { .. } => libc::AF_VSOCK,
        StreamTarget::Unix(_) => libc::AF_UNIX,
    };
    // SAFETY: plain socket creation; returns a new descriptor or -1.
    let fd = cvt(unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    // SAFETY: socket succeeded; the descriptor is ours alone.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let ret = match target {
        StreamTarget::Vsock { cid, port } => {
            set_vsock_connect_timeout(&sock, timeout)?;
            // SAFETY: sockaddr_vm is plain data; all-zero is valid before we fill it.
            let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
            addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
            addr.svm_cid = *cid;
            addr.svm_port = *port;
            // SAFETY: `addr` is a valid sockaddr_vm and we pass its exact size.
            unsafe {
                libc::connect(
                    sock.as_raw_fd(),
                    (&addr as *const libc::sockaddr_vm).cast(),
                    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                )
            }
        }
        StreamTarget::Unix(path) => {
            use std::os::unix::ffi::OsStrExt;
            // SAFETY: sockaddr_un is plain data; all-zero is valid before we fill it.
            let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            let bytes = path.as_os_str().as_bytes();
            // Keep the terminating NUL inside sun_path.
            if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
                return Err(io::ErrorKind::InvalidInput.into());
            }
            for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
                *dst = *src as c_char;
            }
            // SAFETY: `addr` is a valid, NUL-terminated sockaddr_un of the size we pass.
            unsafe {
                libc::connect(
                    sock.as_raw_fd(),
                    (&addr as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                )
            }
        }
    };
    if ret == 0 {
        return Ok((sock, false));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINPROGRESS) | Some(libc::EINTR) => Ok((sock, true)),
        _ => Err(err),
    }
}

/// The pending error of a socket (`SO_ERROR`), which reading clears; `None` when there
/// is none (e.g. a non-blocking connect succeeded).
pub fn take_socket_error(fd: &impl AsRawFd) -> io::Result<Option<io::Error>> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes and `len` holds value's size.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok((value != 0).then(|| io::Error::from_raw_os_error(value)))
}

/// `shutdown(2)` of one or both directions of a socket (`libc::SHUT_WR`, …).
pub fn shutdown(fd: &impl AsRawFd, how: libc::c_int) -> io::Result<()> {
    // SAFETY: shutdown takes a descriptor and a flag; no pointers.
    cvt(unsafe { libc::shutdown(fd.as_raw_fd(), how) })?;
    Ok(())
}

/// Sets how long a vsock connect may take (`SO_VM_SOCKETS_CONNECT_TIMEOUT`; the
/// kernel's default is 2 s).
pub fn set_vsock_connect_timeout(
    fd: &impl AsRawFd,
    timeout: std::time::Duration,
) -> io::Result<()> {
    /// `SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD` from `<linux/vm_sockets.h>`: a `struct
    /// timeval`, which on 64-bit Linux is the same as the new 64-bit-time variant.
    const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    // SAFETY: `tv` is a valid timeval of the size we pass.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::AF_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Sends `signo` to a process (`pid > 0`) or a process group (`pid < 0`).
pub fn kill(pid: libc::pid_t, signo: libc::c_int) -> io::Result<()> {
    // SAFETY: kill takes no pointers.
    cvt(unsafe { libc::kill(pid, signo) })?;
    Ok(())
}

/// A child that has ended: `Some(pid)` without reaping it (`WNOWAIT`), so its pid and
/// process group id cannot be reused while we look at it.
pub fn peek_exited_child() -> Option<libc::pid_t> {
    // SAFETY: siginfo_t is plain data; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is valid for waitid to fill.
    let ret = cvt_retry(|| unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    });
    // SAFETY: after a successful waitid, si_pid is the valid field (0 when none ended).
    let pid = unsafe { info.si_pid() };
    match ret {
        Ok(_) if pid > 0 => Some(pid),
        _ => None,
    }
}

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    /// Exited with a code.
    Exited(i32),
    /// Killed by a signal.
    Signaled(i32),
}

/// Reaps `pid` if it has ended.
pub fn reap(pid: libc::pid_t) -> Option<WaitStatus> {
    let mut status = 0;
    // SAFETY: `status` is a valid int for waitpid to fill.
    let ret = cvt_retry(|| unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) });
    match ret {
        Ok(p) if p == pid => Some(decode_wait_status(status)),
        _ => None,
    }
}

/// Decodes a `waitpid` status word.
pub fn decode_wait_status(status: libc::c_int) -> WaitStatus {
    if libc::WIFSIGNALED(status) {
        WaitStatus::Signaled(libc::WTERMSIG(status))
    } else {
        WaitStatus::Exited(libc::WEXITSTATUS(status))
    }
}

/// Everything a child needs between `clone` and `execve`, prepared before the clone so the
/// child only makes async-signal-safe system calls and never allocates.
#[derive(Debug)]
pub struct ChildSpec {
    /// Programs to try in order (the `PATH` search, already expanded).
    pub programs: Vec<CString>,
    /// Owns the strings `argv` points into.
    pub argv_storage: Vec<CString>,
    /// Owns the strings `envp` points into.
    pub envp_storage: Vec<CString>,
    /// Working directory.
    pub cwd: CString,
    /// `(resource, limit)` pairs applied as soft and hard limit.
    pub rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    /// `cgroup.procs` of the exec's cgroup: the child writes "0" to join it.
    pub cgroup_procs: Option<RawFd>,
    /// Reset the OOM score (the agent, as PID 1, protects itself with -1000).
    pub reset_oom_score: bool,
    /// Switch to this uid and gid (supplementary groups: the gid alone) before `execve`.
    pub identity: Option<(libc::uid_t, libc::gid_t)>,
}

/// Steps of the child setup, reported with the errno when one fails.
pub const STEP_SETSID: u32 = 1;
/// Joining the cgroup failed.
pub const STEP_CGROUP: u32 = 2;
/// `dup2` of the standard streams failed.
pub const STEP_DUP: u32 = 3;
/// `chdir` failed.
pub const STEP_CHDIR: u32 = 4;
/// `setrlimit` failed.
pub const STEP_RLIMIT: u32 = 5;
/// `execve` failed for every candidate.
pub const STEP_EXEC: u32 = 6;
/// Switching to the unprivileged identity failed.
pub const STEP_IDENTITY: u32 = 7;

/// Bytes of stack the child of [`spawn`] runs on until `execve` (it calls a few libc
/// wrappers, nothing deep).
const CHILD_STACK_LEN: usize = 64 * 1024;

/// What the child of [`spawn`] reads, in the parent's memory (which it shares).
struct ChildArgs<'a> {
    spec: &'a ChildSpec,
    argv: *const *const c_char,
    envp: *const *const c_char,
    stdio: [RawFd; 3],
    report: RawFd,
}

/// Starts a child that joins a new session (and so its own process group), wires its
/// standard streams to `stdio`, and executes `spec`. A failure before `execve` succeeds
/// is written to `report` as 8 bytes (step, errno; native endian) and the child exits
/// with 127. `report` must be close-on-exec: end-of-file on its read end means success.
///
/// The child shares the agent's memory until it executes (`clone` with `CLONE_VM |
/// CLONE_VFORK`, as `posix_spawn` does), and the agent waits meanwhile: no page tables
/// are copied and neither side takes copy-on-write faults afterwards. Under `kvm_pvm`,
/// where the guest kernel's work is emulated, that is about a fifth of what starting a
/// small program costs (a fork-and-exec 330 ms against 265 ms there).
pub fn spawn(spec: &ChildSpec, stdio: [RawFd; 3], report: RawFd) -> io::Result<libc::pid_t> {
    // One stack for every child: a child is done with it (executed or exited) before
    // `clone` returns, and a stack already touched costs no page faults the next time.
    static STACK: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());
    let mut argv: Vec<*const c_char> = spec.argv_storage.iter().map(|s| s.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const c_char> = spec.envp_storage.iter().map(|s| s.as_ptr()).collect();
    envp.push(std::ptr::null());
    let args = ChildArgs {
        spec,
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        stdio,
        report,
    };
    let mut stack = STACK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if stack.len() < CHILD_STACK_LEN {
        stack.resize(CHILD_STACK_LEN, 0);
    }
    // The stack grows down from its 16-byte aligned top.
    let top = stack.as_mut_ptr().wrapping_add(CHILD_STACK_LEN);
    let top = top.wrapping_sub(top as usize % 16);
    // Every signal stays blocked until the child has put back the default handlers: a
    // handler of ours running in the child would run on the agent's memory.
    let all = {
        // SAFETY: sigset_t is a plain bit array; sigfillset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t.
        unsafe { libc::sigfillset(&mut set) };
        set
    };
    // SAFETY: a zeroed sigset_t is valid; sigprocmask fills it.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both sets are valid sigset_t values we own.
    cvt(unsafe { libc::sigprocmask(libc::SIG_SETMASK, &all, &mut old) })?;
    // SAFETY: `child_main` gets a pointer to `args`, which lives (with everything it
    // points to: `argv`, `envp`, `spec`) until `clone` returns, and with CLONE_VFORK that
    // is after the child has executed or exited; the child runs on `stack`, locked
    // until then, and makes only async-signal-safe system calls, allocating nothing.
    let pid = unsafe {
        libc::clone(
            child_main,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::addr_of!(args).cast_mut().cast(),
        )
    };
    let cloned = cvt(pid);
    // SAFETY: `old` is the mask read above.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    cloned
}

/// The child of [`spawn`], on its own stack in the agent's memory.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `spawn` passes a pointer to its `ChildArgs`, alive until this child has
    // executed or exited.
    let args = unsafe { &*arg.cast::<ChildArgs<'_>>() };
    // SAFETY: this is the child of `clone(CLONE_VM | CLONE_VFORK)`, as `child_setup`
    // requires.
    unsafe { child_setup(args) }
}

/// Between `clone` and `execve`: default signal handling, a new session, the cgroup, the
/// standard streams, limits, identity, working directory, then the program.
///
/// # Safety
/// Only for the child of [`spawn`]: it shares the agent's memory, so it calls only
/// async-signal-safe functions on memory prepared before the clone, and never returns.
unsafe fn child_setup(a: &ChildArgs<'_>) -> ! {
    let spec = a.spec;
    let empty = sigset(&[]);
    let oom_path: &CStr = c"/proc/self/oom_score_adj";
    // SAFETY: every pointer refers to memory the parent keeps alive until we execute or
    // exit; no allocation, no locks, only system calls (the identity changes as raw
    // system calls: glibc's wrappers would act for every thread of the agent).
    unsafe {
        // This process has its own copy of the handler table: back to the defaults (the
        // runtime's SIGSEGV and SIGBUS handlers would run on the agent's memory), then
        // nothing blocked.
        for signo in [libc::SIGPIPE, libc::SIGSEGV, libc::SIGBUS] {
            libc::signal(signo, libc::SIG_DFL);
        }
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        let report = a.report;
        if libc::setsid() == -1 {
            child_fail(report, STEP_SETSID);
        }
        if let Some(fd) = spec.cgroup_procs {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                child_fail(report, STEP_CGROUP);
            }
        }
        if spec.reset_oom_score {
            let fd = libc::open(oom_path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
        }
        for (target, &src) in a.stdio.iter().enumerate() {
            if libc::dup2(src, target as libc::c_int) == -1 {
                child_fail(report, STEP_DUP);
            }
        }
        // Limits first: raising a hard limit needs the privilege dropped next.
        for &(resource, value) in &spec.rlimits {
            let lim = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            if libc::setrlimit(resource, &lim) == -1 {
                child_fail(report, STEP_RLIMIT);
            }
        }
        if let Some((uid, gid)) = spec.identity {
            // The gid first: once the uid changes, the right to change gids is gone.
            let groups = [gid];
            if libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) == -1
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) == -1
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) == -1
            {
                child_fail(report, STEP_IDENTITY);
            }
        }
        // As the command's own user, so the directory is one it may enter.
        if libc::chdir(spec.cwd.as_ptr()) == -1 {
            child_fail(report, STEP_CHDIR);
        }
        let mut best = libc::ENOENT;
        for prog in &spec.programs {
            libc::execve(prog.as_ptr(), a.argv, a.envp);
            let errno = *libc::__errno_location();
            // Like execvp: remember a more telling error than "not found".
            if errno != libc::ENOENT && errno != libc::ENOTDIR {
                best = errno;
            }
        }
        *libc::__errno_location() = best;
        child_fail(report, STEP_EXEC)
    }
}

/// In the child: reports `step` and the current errno on `report`, then exits 127.
///
/// # Safety
/// Only for the child of [`spawn`] before `execve`: it exits the process.
unsafe fn child_fail(report: RawFd, step: u32) -> ! {
    // SAFETY: errno is thread-local and always readable; `msg` is a local buffer; write
    // and _exit are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(&step.to_ne_bytes());
        msg[4..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(report, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// `mount(2)`.
pub fn mount(source: &str, target: &Path, fstype: &str, flags: u64, data: &str) -> io::Result<()> {
    let source = CString::new(source).map_err(|_| io::ErrorKind::InvalidInput)?;
    let target = path_cstring(target)?;
    let fstype = CString::new(fstype).map_err(|_| io::ErrorKind::InvalidInput)?;
    let data = CString::new(data).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: all strings are valid and NUL-terminated for the duration of the call.
    cvt(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags as libc::c_ulong,
            data.as_ptr().cast(),
        )
    })?;
    Ok(())
}

/// `sethostname(2)`.
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    Ok(())
}

/// Brings the loopback interface up.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket creation.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket succeeded; the descriptor is ours alone.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the interface named in `req` and fills its flags.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the flags member is the active one after SIOCGIFFLAGS.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads `req`, which is fully initialised.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
    Ok(())
}

/// Marks us as child subreaper, so orphaned descendants are reparented to us and reaped.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer argument only.
    cvt(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) })?;
    Ok(())
}

/// Writes one byte to a physical address through `/dev/mem` (the boot-timer register).
pub fn write_phys_byte(addr: u64, value: u8) -> io::Result<()> {
    let fd = open(Path::new("/dev/mem"), libc::O_RDWR | libc::O_SYNC)?;
    // SAFETY: page size query; no pointers.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let base = addr & !(page - 1);
    // SAFETY: a fresh shared mapping of one page of /dev/mem; the kernel checks access.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            base as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `ptr` maps `page` bytes and `addr - base < page`; a volatile write to a
    // device register, then the mapping is removed.
    unsafe {
        std::ptr::write_volatile(ptr.cast::<u8>().add((addr - base) as usize), value);
        libc::munmap(ptr, page as usize);
    }
    Ok(())
}

/// Makes the kernel send SIGINT to PID 1 on Ctrl-Alt-Del instead of rebooting at once.
pub fn ctrl_alt_del_to_signal() -> io::Result<()> {
    // SAFETY: reboot with LINUX_REBOOT_CMD_CAD_OFF only changes a kernel flag.
    cvt(unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_CAD_OFF) })?;
    Ok(())
}

/// Kills every process but us, flushes file systems, and restarts the machine, which
/// our VMM (kernel `reboot=k`) treats as the end of the VM. Never returns.
pub fn power_off() -> ! {
    // SAFETY: kill/sync/reboot take no pointers; pause just waits.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
        // PID 1 must not exit (the kernel would panic); wait for the end instead.
        loop {
            libc::pause();
        }
    }
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// `struct rand_pool_info` with room for [`proto::MAX_EXEC_ENTROPY`] bytes.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; proto::MAX_EXEC_ENTROPY],
}

/// Mix `entropy` (credited in full) into the kernel's input pool and reseed the CRNG
/// from it now, so that the next random bytes and every new process's ASLR differ from
/// any other VM restored from the same snapshot. Needs CAP_SYS_ADMIN.
pub fn reseed_random(entropy: &[u8]) -> io::Result<()> {
    let mut info = RandPoolInfo {
        entropy_count: 0,
        buf_size: 0,
        buf: [0; proto::MAX_EXEC_ENTROPY],
    };
    let n = entropy.len().min(info.buf.len());
    info.buf
        .get_mut(..n)
        .unwrap_or_default()
        .copy_from_slice(entropy.get(..n).unwrap_or_default());
    info.buf_size = n as libc::c_int;
    info.entropy_count = (n * 8) as libc::c_int;
    let random = open(Path::new("/dev/urandom"), libc::O_WRONLY | libc::O_CLOEXEC)?;
    // SAFETY: `info` is a live rand_pool_info whose buf holds buf_size bytes; the kernel
    // reads it and nothing else.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, &info) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Set the wall clock to `ns` since the epoch, unless it is already within `slack_ns`.
/// Returns whether it was set.
pub fn set_wall_clock(ns: u64, slack_ns: u64) -> io::Result<bool> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
    let current = (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64);
    if current.abs_diff(ns) <= slack_ns {
        return Ok(false);
    }
    let target = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `target` is a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &target) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_status_decodes_exit_code() {
        let status = 3 << 8;

        assert_eq!(decode_wait_status(status), WaitStatus::Exited(3));
    }

    #[test]
    fn wait_status_decodes_signal() {
        let status = libc::SIGKILL;

        assert_eq!(decode_wait_status(status), WaitStatus::Signaled(9));
    }

    #[test]
    fn pipe_carries_bytes() {
        let (r, w) = pipe().unwrap();

        write(&w, b"abc").unwrap();
        let mut buf = [0u8; 8];
        let n = read(&r, &mut buf).unwrap();

        assert_eq!(&buf[..n], b"abc");
    }
}
