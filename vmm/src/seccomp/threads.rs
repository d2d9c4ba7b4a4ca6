//! Per-thread allowlists: each kind of VMM thread may make only the system calls its
//! work needs. Anything else fails with `EPERM` (the call is not made; a library that
//! probes, such as the C allocator reading `/sys/devices/system/cpu/online`, falls
//! back), and the calls of the process-wide filter ([`super::filter`]) still kill the
//! whole VMM: stacked filters take the strictest answer.
//!
//! A thread installs its own list when it starts its work ([`enter`]); threads it
//! starts afterwards inherit the list, so every thread that starts others does so before
//! it enters (the fs workers are started when their device is made, and enter when the
//! guest first notifies their queues, before they read anything the guest wrote). The
//! lists are compiled at build time ([`super::rules`]) and apply only after [`enable`]
//! (the `__vmm` process; tests and embedders that do not call it run unfiltered).

use std::sync::OnceLock;

use seccompiler::BpfProgram;

use super::SeccompError;

pub use super::rules::ThreadKind;

/// The capabilities a thread of this kind gives up before it runs.
fn drop_capabilities_for(kind: ThreadKind) -> Result<(), SeccompError> {
    if kind.handles_guest_data() {
        crate::privileges::drop_all_capabilities().map_err(SeccompError::Capabilities)?;
    }
    Ok(())
}

impl ThreadKind {
    /// The threads that act on what the guest sends keep no capability (an fs worker
    /// drops its own when it takes its share's credentials; the control thread, which
    /// only the host talks to, keeps what opening a share needs).
    fn handles_guest_data(self) -> bool {
        matches!(self, Self::Vcpu | Self::VcpuSaving | Self::Devices)
    }
}

/// Whether threads filter themselves in this process.
static ENABLED: OnceLock<()> = OnceLock::new();

/// Every thread of this process filters itself from now on (the `__vmm` process calls
/// this before it builds the VM).
pub fn enable() {
    let _ = ENABLED.set(());
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    ENABLED.get().is_some()
}

/// Install `kind`'s list on the calling thread, if this process filters its threads.
pub fn enter(kind: ThreadKind) -> Result<(), SeccompError> {
    drop_capabilities_for(kind)?;
    if !enabled() {
        return Ok(());
    }
    let prog = filter(kind)?;
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes plain integers and affects only us.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    seccompiler::apply_filter(&prog).map_err(SeccompError::Install)
}

/// The compiled list of `kind` (built into the binary: [`super::rules::thread_filter`]).
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    super::compiled::thread(kind).ok_or_else(|| SeccompError::Compile(format!("{kind:?} threads")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fork; in the child install the process-wide filters and `kind`'s list, run
    /// `call`, exit with its result. `Ok(exit code)` or `Err(signal)`.
    fn in_child(kind: ThreadKind, call: fn() -> i32) -> Result<i32, i32> {
        let progs = [
            super::super::clone3_filter(),
            super::super::filter(),
            filter(kind).unwrap(),
        ];
        super::super::tests::in_child_with(&progs, call)
    }

    /// 0 when the call succeeded, its errno otherwise.
    fn errno_of(ret: i64) -> i32 {
        if ret >= 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        }
    }

    fn open_etc_hostname() -> i32 {
        // SAFETY: a valid NUL-terminated path; the fd is closed if opened.
        let fd = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
        let e = errno_of(i64::from(fd));
        if fd >= 0 {
            // SAFETY: our own descriptor.
            unsafe { libc::close(fd) };
        }
        e
    }

    fn inet_socket() -> i32 {
        // SAFETY: socket takes integers only.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        errno_of(i64::from(fd))
    }

    fn unix_socket() -> i32 {
        // SAFETY: socket takes integers only.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        errno_of(i64::from(fd))
    }

    fn terminal_ioctl() -> i32 {
        let mut size = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes a winsize into ours; fd 0 may be anything.
        let ret = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut size) };
        match errno_of(i64::from(ret)) {
            libc::EPERM => libc::EPERM,
            // Not a terminal, or no fd 0: the call was made.
            _ => 0,
        }
    }

    fn exec_true() -> i32 {
        let path = c"/bin/true".as_ptr();
        let argv = [path, std::ptr::null()];
        // SAFETY: valid NUL-terminated strings and a NULL-terminated argv.
        unsafe { libc::execve(path, argv.as_ptr(), std::ptr::null()) };
        7
    }

    fn new_mount_namespace() -> i32 {
        // SAFETY: unshare takes flags only.
        errno_of(i64::from(unsafe { libc::unshare(libc::CLONE_NEWNS) }))
    }

    fn rename_thread() -> i32 {
        // SAFETY: PR_SET_NAME reads a NUL-terminated name of at most 16 bytes.
        let named = unsafe { libc::prctl(libc::PR_SET_NAME, c"mxc-test".as_ptr()) };
        // SAFETY: PR_SET_DUMPABLE takes integers.
        let dumpable = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1) };
        if named == 0 && errno_of(i64::from(dumpable)) == libc::EPERM {
            0
        } else {
            1
        }
    }

    #[test]
    fn threads_that_handle_guest_data_keep_no_capability() {
        use crate::privileges::has_effective_capabilities;
        let had = has_effective_capabilities().unwrap();
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::VcpuSaving,
            ThreadKind::Devices,
        ] {
            // Capabilities are per thread: the test's own thread keeps its own.
            let left = std::thread::spawn(move || {
                drop_capabilities_for(kind).unwrap();
                has_effective_capabilities().unwrap()
            })
            .join()
            .unwrap();
            assert!(!left, "{kind:?}");
        }
        let control = std::thread::spawn(|| {
            drop_capabilities_for(ThreadKind::Control).unwrap();
            has_effective_capabilities().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(control, had);
    }

    #[test]
    fn each_thread_kind_gets_only_its_calls() {
        use ThreadKind::*;
        let eperm = Ok(libc::EPERM);
        // A vCPU opens no file, makes no socket; its ioctls pass.
        assert_eq!(in_child(Vcpu, open_etc_hostname), eperm);
        assert_eq!(in_child(Vcpu, unix_socket), eperm);
        assert_eq!(in_child(Vcpu, terminal_ioctl), Ok(0));
        assert_eq!(in_child(VcpuSaving, open_etc_hostname), Ok(0));
        // The device loop: Unix sockets only, no files.
        assert_eq!(in_child(Devices, unix_socket), Ok(0));
        assert_eq!(in_child(Devices, inet_socket), eperm);
        assert_eq!(in_child(Devices, open_etc_hostname), eperm);
        // An fs worker: files, but no sockets and no ioctls (no TIOCSTI, no FICLONE).
        assert_eq!(in_child(FsWorker, open_etc_hostname), Ok(0));
        assert_eq!(in_child(FsWorker, unix_socket), eperm);
        assert_eq!(in_child(FsWorker, terminal_ioctl), eperm);
        // The control thread: Unix sockets and files, no other network.
        assert_eq!(in_child(Control, inet_socket), eperm);
        assert_eq!(in_child(Control, unix_socket), Ok(0));
        // Naming a thread is all prctl does, everywhere.
        for kind in [Vcpu, Devices, FsWorker, Control] {
            assert_eq!(in_child(kind, rename_thread), Ok(0), "{kind:?}");
        }
        // And what the process-wide filter kills still kills, whatever the list says.
        for kind in [Vcpu, FsWorker, Control] {
            assert_eq!(in_child(kind, exec_true), Err(libc::SIGSYS), "{kind:?}");
        }
        assert_eq!(in_child(Control, new_mount_namespace), Err(libc::SIGSYS));
    }
}
