//! Descriptors never cross into a sandbox by accident. Whatever started `mxc-vm` (a
//! shell, a service, an SDK's host program) may have left descriptors open without
//! close-on-exec: a file outside every grant, a directory (from which `openat(fd,
//! "..")` walks out of any mount namespace), a socket. The command of a process or
//! bubblewrap sandbox starts with standard input, output and error only
//! ([`cloexec_from_3`] just before its exec), and a VMM closes every inherited one
//! before it does anything else ([`close_from_3`]).

use std::io;

/// `close_range(2)`'s flag: mark close-on-exec instead of closing.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// Mark every descriptor from 3 up close-on-exec. Async-signal-safe (for a child
/// between fork and exec).
pub(crate) fn cloexec_from_3() -> io::Result<()> {
    range_from_3(CLOSE_RANGE_CLOEXEC)
}

/// Close every descriptor from 3 up. Async-signal-safe.
pub(crate) fn close_from_3() -> io::Result<()> {
    range_from_3(0)
}

fn range_from_3(flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: close_range() takes numbers and flags; no memory.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, flags) } == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if !matches!(error.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) {
        return Err(error);
    }
    // A kernel before 5.11: every descriptor number the limit allows, one by one.
    // SAFETY: an all-zero rlimit is a valid value for getrlimit() to overwrite.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit() writes into the rlimit we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let last = libc::c_int::try_from(limit.rlim_cur).unwrap_or(libc::c_int::MAX);
    for fd in 3..last {
        // SAFETY: fcntl()/close() on a number; one that is not open fails harmlessly.
        unsafe {
            if flags == 0 {
                libc::close(fd);
            } else {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
    Ok(())
}
