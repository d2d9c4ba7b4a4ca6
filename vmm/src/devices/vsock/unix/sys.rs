//! The socket calls std does not offer: a non-blocking `connect` on a Unix socket, a
//! `send` that cannot raise SIGPIPE, and switching an arbitrary fd to non-blocking mode.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connect to the Unix stream listener at `path` without ever blocking: a listener whose
/// backlog is full gives `WouldBlock` instead of stalling the caller. The returned stream
/// is non-blocking.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: plain FFI call with constant arguments; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket() and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };

    // SAFETY: sockaddr_un is plain old data; all-zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // Leave room for the terminating NUL that `zeroed` already put there.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or contains NUL",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;

    // SAFETY: `addr` is an initialised sockaddr_un that outlives the call, and `len` does
    // not exceed its size (checked above); `sock` is a valid socket.
    let ret = unsafe {
        libc::connect(
            fd,
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(sock))
}

/// `send(2)` with `MSG_NOSIGNAL`: a peer that went away gives `EPIPE`, not a SIGPIPE that
/// would kill the VMM if the process does not ignore it.
pub fn send_nosignal(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call,
    // and `fd` is an open socket borrowed for it.
    let ret = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast::<libc::c_void>(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as usize)
}

/// Set `O_NONBLOCK` on `fd`, which the caller owns and keeps open for the call.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL only reads the flags of an fd the caller keeps open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with the flags just read plus O_NONBLOCK; no memory is involved.
    let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn connects_to_a_listener() {
        let dir = std::env::temp_dir().join(format!("mxc-vsock-sys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();

        let stream = connect_nonblocking(&path);
        let accepted = listener.accept();

        assert!(stream.is_ok());
        assert!(accepted.is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn send_to_a_closed_peer_is_an_error() {
        let (ours, peer) = UnixStream::pair().unwrap();
        drop(peer);

        let err = send_nosignal(std::os::fd::AsFd::as_fd(&ours), b"x").unwrap_err();

        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn missing_listener_and_long_path_fail() {
        let missing = connect_nonblocking(Path::new("/nonexistent/mxc-vsock.sock"));
        let long = connect_nonblocking(Path::new(&"/x".repeat(100)));

        assert!(missing.is_err());
        assert_eq!(long.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
