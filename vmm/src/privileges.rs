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
/// them). With `network_joined` the VMM was started in an empty network namespace
/// already ([`empty_network_namespace`], made once by its parent for all its VMMs:
/// making one costs the kernel far more than joining it), and only the IPC and UTS
/// namespaces are left here. Needs CAP_SYS_ADMIN: as an ordinary user nothing changes
/// (`Ok(false)`).
pub fn leave_host_namespaces(network_joined: bool) -> io::Result<bool> {
    // SAFETY: geteuid() has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(false);
    }
    let mut flags = libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if !(network_joined && in_other_network_namespace_than_parent()) {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare() takes flags and touches no memory.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// Whether this process's network namespace differs from its parent's: what a parent
/// that says it started the VMM in a namespace of its own is taken at (when it cannot be
/// read, the VMM makes its own).
fn in_other_network_namespace_than_parent() -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getppid() has no preconditions.
    let parent = unsafe { libc::getppid() };
    let ours = std::fs::metadata("/proc/self/ns/net");
    let theirs = std::fs::metadata(format!("/proc/{parent}/ns/net"));
    match (ours, theirs) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) != (b.dev(), b.ino()),
        _ => false,
    }
}

/// A new network namespace with nothing in it (its loopback interface is down), for VMM
/// processes to start in (`setns` between fork and exec): made by a short-lived thread
/// of the caller, which leaves the caller's own namespaces as they are. Needs
/// CAP_SYS_ADMIN. The VMMs that share it share nothing through it: none of them binds,
/// listens or connects to anything but Unix sockets bound to paths.
pub fn empty_network_namespace() -> io::Result<std::os::fd::OwnedFd> {
    std::thread::Builder::new()
        .name("mxc-netns".into())
        .spawn(|| {
            // SAFETY: unshare() takes flags and touches no memory; it changes only this
            // thread, which ends below.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            std::fs::File::open("/proc/thread-self/ns/net").map(std::os::fd::OwnedFd::from)
        })?
        .join()
        .map_err(|_| io::Error::other("the network namespace thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn netns_of(path: &str) -> std::path::PathBuf {
        std::fs::read_link(path).unwrap()
    }

    /// As root: the namespace is new and empty, and the caller's own is unchanged.
    #[test]
    fn the_empty_network_namespace_is_new_and_leaves_the_caller_where_it_was() {
        // SAFETY: geteuid() has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let before = netns_of("/proc/thread-self/ns/net");
        let fd = empty_network_namespace().unwrap();
        use std::os::fd::AsRawFd;
        let made = netns_of(&format!("/proc/self/fd/{}", fd.as_raw_fd()));
        assert_ne!(made, before);
        assert_eq!(netns_of("/proc/thread-self/ns/net"), before);
        // A thread that joins it sees only a loopback interface.
        let raw = fd.as_raw_fd();
        let dev = std::thread::spawn(move || {
            // SAFETY: setns() on a descriptor we hold, for this thread only (it ends here).
            assert_eq!(unsafe { libc::setns(raw, libc::CLONE_NEWNET) }, 0);
            std::fs::read_to_string("/proc/thread-self/net/dev").unwrap()
        })
        .join()
        .unwrap();
        let interfaces: Vec<&str> = dev
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(interfaces, ["lo"]);
    }
}
