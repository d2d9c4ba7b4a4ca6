//! Capabilities, which Linux keeps per thread: a VMM thread that handles what the guest
//! sends keeps none (run as root, the VMM would otherwise hold every one of them in the
//! threads a hostile guest talks to).

use std::io;

/// Clear every capability set of the calling thread: ambient, inheritable, effective,
/// permitted. It cannot get them back (the VMM never calls `execve`). Nothing to do for
/// a VMM run as an ordinary user.
pub fn drop_all_capabilities() -> io::Result<()> {
    use caps::CapSet;
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(io::Error::other)?;
    }
    let left = caps::read(None, CapSet::Permitted).map_err(io::Error::other)?;
    if !left.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(())
}

/// Whether the calling thread has any effective capability.
pub fn has_effective_capabilities() -> io::Result<bool> {
    caps::read(None, caps::CapSet::Effective)
        .map(|set| !set.is_empty())
        .map_err(io::Error::other)
}

/// Leave the host's network, IPC and UTS namespaces for new, empty ones: a VMM taken over
/// by its guest then has no network at all (not even the host's loopback services or
/// abstract Unix sockets), no System V IPC and no host name to change. The VMM itself
/// uses only Unix sockets bound to paths, which work across network namespaces. Call
/// before the VMM starts any thread (namespaces are per thread; new threads inherit
/// them). Needs CAP_SYS_ADMIN: as an ordinary user nothing changes (`Ok(false)`).
pub fn leave_host_namespaces() -> io::Result<bool> {
    // SAFETY: geteuid() has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(false);
    }
    // SAFETY: unshare() takes flags and touches no memory.
    if unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}
