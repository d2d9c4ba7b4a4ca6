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

/// The namespaces a VMM leaves, with their names under `/proc/PID/ns/`: network, IPC,
/// UTS.
pub const VMM_NAMESPACES: [(libc::c_int, &str); 3] = [
    (libc::CLONE_NEWNET, "net"),
    (libc::CLONE_NEWIPC, "ipc"),
    (libc::CLONE_NEWUTS, "uts"),
];

/// Leave the host's network, IPC and UTS namespaces for new, empty ones: a VMM taken over
/// by its guest then has no network at all (not even the host's loopback services or
/// abstract Unix sockets), no System V IPC and no host name to change. The VMM itself
/// uses only Unix sockets bound to paths, which work across network namespaces. Call
/// before the VMM starts any thread (namespaces are per thread; new threads inherit
/// them). With `joined` the VMM was started in empty ones already
/// ([`EmptyNamespaces`], made once by its parent for all its VMMs: making a network
/// or IPC namespace costs the kernel far more than joining one); each that is indeed
/// not its parent's is kept. Needs CAP_SYS_ADMIN: as an ordinary user nothing changes
/// (`Ok(false)`).
pub fn leave_host_namespaces(joined: bool) -> io::Result<bool> {
    // SAFETY: geteuid() has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(false);
    }
    let flags = VMM_NAMESPACES
        .iter()
        .filter(|(_, name)| !(joined && not_the_parents(name)))
        .fold(0, |flags, (flag, _)| flags | flag);
    // SAFETY: unshare() takes flags and touches no memory.
    if flags != 0 && unsafe { libc::unshare(flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// Whether this process's namespace `name` differs from its parent's: what a parent
/// that says it started the VMM in namespaces of its own is taken at (when it cannot be
/// read, the VMM makes its own).
fn not_the_parents(name: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getppid() has no preconditions.
    let parent = unsafe { libc::getppid() };
    let ours = std::fs::metadata(format!("/proc/self/ns/{name}"));
    let theirs = std::fs::metadata(format!("/proc/{parent}/ns/{name}"));
    match (ours, theirs) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) != (b.dev(), b.ino()),
        _ => false,
    }
}

/// New network, IPC and UTS namespaces with nothing in them (the loopback interface is
/// down), for VMM processes to start in ([`EmptyNamespaces::join`] between fork and
/// exec). The VMMs that share them share nothing through them: none of them binds,
/// listens or connects to anything but Unix sockets bound to paths, or uses System V IPC
/// or the host name.
#[derive(Debug)]
pub struct EmptyNamespaces {
    fds: Vec<(libc::c_int, std::os::fd::OwnedFd)>,
}

impl EmptyNamespaces {
    /// Make them on a short-lived thread of the caller, whose own namespaces stay as they
    /// are. Needs CAP_SYS_ADMIN.
    pub fn new() -> io::Result<Self> {
        std::thread::Builder::new()
            .name("mxc-vmm-ns".into())
            .spawn(|| {
                let all = VMM_NAMESPACES
                    .iter()
                    .fold(0, |flags, (flag, _)| flags | flag);
                // SAFETY: unshare() takes flags and touches no memory; it changes only
                // this thread, which ends below.
                if unsafe { libc::unshare(all) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                let fds = VMM_NAMESPACES
                    .iter()
                    .map(|(flag, name)| {
                        std::fs::File::open(format!("/proc/thread-self/ns/{name}"))
                            .map(|f| (*flag, std::os::fd::OwnedFd::from(f)))
                    })
                    .collect::<io::Result<Vec<_>>>()?;
                Ok(Self { fds })
            })?
            .join()
            .map_err(|_| io::Error::other("the namespace thread panicked"))?
    }

    /// Move the calling thread into these namespaces: only system calls on descriptors
    /// this set holds, so it may run in a child between fork and exec.
    pub fn join(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        for (flag, fd) in &self.fds {
            // SAFETY: setns() on a descriptor we hold open; no memory is touched.
            if unsafe { libc::setns(fd.as_raw_fd(), *flag) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn ns_of(path: &str) -> std::path::PathBuf {
        std::fs::read_link(path).unwrap()
    }

    /// As root: the namespaces are new and empty, the caller's own are unchanged, and a
    /// thread that joins them is in all three.
    #[test]
    fn the_empty_namespaces_are_new_and_leave_the_caller_where_it_was() {
        // SAFETY: geteuid() has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let before: Vec<_> = VMM_NAMESPACES
            .iter()
            .map(|(_, name)| ns_of(&format!("/proc/thread-self/ns/{name}")))
            .collect();
        let empty = EmptyNamespaces::new().unwrap();
        let made: Vec<_> = empty
            .fds
            .iter()
            .map(|(_, fd)| ns_of(&format!("/proc/self/fd/{}", fd.as_raw_fd())))
            .collect();
        for (made, before) in made.iter().zip(&before) {
            assert_ne!(made, before);
        }
        let now: Vec<_> = VMM_NAMESPACES
            .iter()
            .map(|(_, name)| ns_of(&format!("/proc/thread-self/ns/{name}")))
            .collect();
        assert_eq!(now, before);
        let (inside, dev) = std::thread::spawn(move || {
            empty.join().unwrap();
            let inside: Vec<_> = VMM_NAMESPACES
                .iter()
                .map(|(_, name)| ns_of(&format!("/proc/thread-self/ns/{name}")))
                .collect();
            let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
            (inside, dev)
        })
        .join()
        .unwrap();
        assert_eq!(inside, made);
        let interfaces: Vec<&str> = dev
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(interfaces, ["lo"]);
    }
}
