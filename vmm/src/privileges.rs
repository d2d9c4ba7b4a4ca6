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
/// down), for VMM processes to join first thing ([`EmptyNamespaces::send`],
/// [`join_passed`]). The VMMs that share them share nothing through them: none of them binds,
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

    /// Send them over `socket` for [`join_passed`] at its other end: one message, the
    /// namespace types as native-endian `i32`s and a descriptor for each. A VMM gets them
    /// this way on its standard input, so that its parent need not run code of its own
    /// between fork and exec, which would keep it from starting the VMM the cheap way
    /// (`posix_spawn`: no copy of the parent's page tables).
    pub fn send(&self, socket: &std::os::unix::net::UnixStream) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let kinds: Vec<u8> = self
            .fds
            .iter()
            .flat_map(|(flag, _)| flag.to_ne_bytes())
            .collect();
        let fds: Vec<std::os::fd::RawFd> = self.fds.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        let sent = socket
            .send_with_fds(&[kinds.as_slice()], &fds)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        if sent != kinds.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "namespaces sent in part",
            ));
        }
        Ok(())
    }
}

/// Join the namespaces [`EmptyNamespaces::send`] sent over `socket`: exactly one of each
/// of [`VMM_NAMESPACES`], each descriptor checked by the kernel to be a namespace of the
/// type it is said to be (`setns`). The descriptors are closed afterwards.
pub fn join_passed(socket: &std::os::unix::net::UnixStream) -> io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let bad = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("namespaces passed: {why}"),
        )
    };
    let mut kinds = [0u8; VMM_NAMESPACES.len() * 4];
    let mut fds = [-1; VMM_NAMESPACES.len()];
    let mut iov = [libc::iovec {
        iov_base: kinds.as_mut_ptr().cast(),
        iov_len: kinds.len(),
    }];
    // SAFETY: the iovec describes `kinds`, which outlives the call; the kernel writes at
    // most its length there.
    let (read, count) = unsafe { socket.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: recvmsg gave us these `count` descriptors; nothing else owns them.
    let owned: Vec<OwnedFd> = fds
        .iter()
        .take(count)
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if read != kinds.len() || count != VMM_NAMESPACES.len() {
        return Err(bad(&format!("{read} bytes and {count} descriptors")));
    }
    let mut seen = 0;
    for (chunk, fd) in kinds.chunks_exact(4).zip(&owned) {
        let flag = i32::from_ne_bytes(chunk.try_into().map_err(|_| bad("short type"))?);
        if !VMM_NAMESPACES.iter().any(|(f, _)| *f == flag) || seen & flag != 0 {
            return Err(bad(&format!("unexpected namespace type {flag:#x}")));
        }
        seen |= flag;
        use std::os::fd::AsRawFd;
        // SAFETY: setns() on a descriptor we own; no memory is touched.
        if unsafe { libc::setns(fd.as_raw_fd(), flag) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
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
        // Passed over a socket, as a VMM gets them: the joining thread is in all three
        // and sees only a loopback interface.
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        empty.send(&ours).unwrap();
        let (inside, dev) = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    join_passed(&theirs).unwrap();
                    let inside: Vec<_> = VMM_NAMESPACES
                        .iter()
                        .map(|(_, name)| ns_of(&format!("/proc/thread-self/ns/{name}")))
                        .collect();
                    let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
                    (inside, dev)
                })
                .join()
                .unwrap()
        });
        assert_eq!(inside, made);
        let interfaces: Vec<&str> = dev
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(interfaces, ["lo"]);
    }

    /// What a VMM is handed on its standard input must be exactly one namespace of each
    /// kind: anything else is refused and leaves the thread where it was.
    #[test]
    fn passed_namespaces_that_are_not_one_of_each_are_refused() {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let send = |kinds: &[i32], fds: &[std::os::fd::RawFd]| {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            let bytes: Vec<u8> = kinds.iter().flat_map(|k| k.to_ne_bytes()).collect();
            if fds.is_empty() {
                std::io::Write::write_all(&mut &ours, &bytes).unwrap();
            } else {
                ours.send_with_fds(&[bytes.as_slice()], fds).unwrap();
            }
            drop(ours);
            let before = ns_of("/proc/thread-self/ns/net");
            let result = std::thread::spawn(move || join_passed(&theirs))
                .join()
                .unwrap();
            assert_eq!(ns_of("/proc/thread-self/ns/net"), before);
            result
        };
        let own = |name: &str| std::fs::File::open(format!("/proc/self/ns/{name}")).unwrap();
        let (net, ipc, uts) = (own("net"), own("ipc"), own("uts"));
        let all = [net.as_raw_fd(), ipc.as_raw_fd(), uts.as_raw_fd()];
        let (n, i, u) = (libc::CLONE_NEWNET, libc::CLONE_NEWIPC, libc::CLONE_NEWUTS);
        // Nothing at all (the parent closed its end), no descriptors, too few, a type
        // twice, a type that is not ours, and a descriptor that is not the type it is said
        // to be (setns checks; the first, network, is joined in the thread that fails).
        assert!(send(&[], &[]).is_err());
        assert!(send(&[n, i, u], &[]).is_err());
        assert!(send(&[n, i], &all[..2]).is_err());
        assert!(send(&[n, n, u], &all).is_err());
        assert!(send(&[n, libc::CLONE_NEWNS, u], &all).is_err());
        assert!(send(&[n, u, i], &all).is_err());
    }
}
