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
//! lists are compiled once per process, on first use, and only after
//! [`enable`] (the `__vmm` process; tests and embedders that do not call it run
//! unfiltered).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::SeccompError;

/// The kinds of VMM thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// Runs a vCPU and the device emulation its exits reach (MMIO and port I/O, the
    /// serial console, virtio notifications): KVM ioctls and eventfd writes, no files,
    /// no sockets, no threads.
    Vcpu,
    /// The boot vCPU of a VM that saves its ready snapshot when the guest is ready
    /// (`mxc-vm image build`: our own freshly booted image, before any command): the
    /// vCPU's calls and writing the snapshot files.
    VcpuSaving,
    /// The device event loop: epoll, the vsock backend's Unix sockets (`AF_UNIX` only).
    Devices,
    /// A virtio-fs worker: file system calls on the share's descriptors; no sockets, no
    /// ioctls, no threads.
    FsWorker,
    /// The control socket: accepts the host's requests and opens shares for binding (a
    /// short-lived thread of its own imports each share's root).
    Control,
}

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
/// The compiled lists, by kind (each compiled by the first thread of its kind).
static FILTERS: [OnceLock<Result<BpfProgram, String>>; 5] = [
    OnceLock::new(),
    OnceLock::new(),
    OnceLock::new(),
    OnceLock::new(),
    OnceLock::new(),
];

/// Every thread of this process filters itself from now on (the `__vmm` process calls
/// this before it builds the VM).
pub fn enable() {
    if ENABLED.set(()).is_err() {
        return;
    }
    // Compile every list while the VM is being built, off the boot vCPU's path (a
    // thread that enters before this finished compiles its own or waits for it).
    let _ = std::thread::Builder::new()
        .name("mxc-seccomp".into())
        .spawn(|| {
            for kind in ALL {
                if let Some(slot) = FILTERS.get(kind as usize) {
                    slot.get_or_init(|| filter(kind).map_err(|e| e.to_string()));
                }
            }
        });
}

/// Every kind, in the order of [`FILTERS`].
const ALL: [ThreadKind; 5] = [
    ThreadKind::Vcpu,
    ThreadKind::VcpuSaving,
    ThreadKind::Devices,
    ThreadKind::FsWorker,
    ThreadKind::Control,
];

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
    let slot = FILTERS
        .get(kind as usize)
        .ok_or_else(|| SeccompError::Compile(format!("no list for {kind:?}")))?;
    let prog = slot
        .get_or_init(|| filter(kind).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|why| SeccompError::Compile(why.clone()))?;
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes plain integers and affects only us.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    seccompiler::apply_filter(prog).map_err(SeccompError::Install)
}

/// What every thread does: memory, locks, signals, time, its own end.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_restart_syscall,
    libc::SYS_fcntl,
    libc::SYS_tgkill,
];

/// Running a vCPU and emulating what its exits reach.
const VCPU: &[i64] = &[libc::SYS_ioctl, libc::SYS_rt_sigaction, libc::SYS_eventfd2];

/// Writing the snapshot: the directory, the files under temporary names, the renames.
const SAVING: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_pwrite64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_lseek,
];

/// The event loop and the vsock backend.
const DEVICES: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_ioctl,
    libc::SYS_timerfd_settime,
    libc::SYS_getsockopt,
];

/// A share's server: every file operation the policy layer passes on, on descriptors.
const FS: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_readlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_flock,
    libc::SYS_copy_file_range,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
];

/// The control socket, and opening shares for binding.
const CONTROL: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_readlink,
    libc::SYS_umask,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_tid_address,
];

/// `prctl` only to name a thread (what starting one does).
fn prctl_rules() -> Result<Vec<SeccompRule>, SeccompError> {
    [libc::PR_SET_NAME, libc::PR_GET_NAME]
        .into_iter()
        .map(|op| {
            let cond =
                SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, op as u64)
                    .map_err(SeccompError::Build)?;
            SeccompRule::new(vec![cond]).map_err(SeccompError::Build)
        })
        .collect()
}

/// One argument of a call equal to `value`.
fn arg_is(index: u8, value: u64) -> Result<Vec<SeccompRule>, SeccompError> {
    let cond = SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .map_err(SeccompError::Build)?;
    Ok(vec![
        SeccompRule::new(vec![cond]).map_err(SeccompError::Build)?
    ])
}

/// The system calls of `kind`, with the argument rules some need.
fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let lists: &[&[i64]] = match kind {
        ThreadKind::Vcpu => &[COMMON, VCPU],
        ThreadKind::VcpuSaving => &[COMMON, VCPU, SAVING],
        ThreadKind::Devices => &[COMMON, DEVICES],
        ThreadKind::FsWorker => &[COMMON, FS],
        ThreadKind::Control => &[COMMON, FS, CONTROL],
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = lists
        .iter()
        .flat_map(|list| list.iter())
        .map(|nr| (*nr, Vec::new()))
        .collect();
    rules.insert(libc::SYS_prctl, prctl_rules()?);
    match kind {
        // Unix sockets only: the vsock backend's, the control socket's.
        ThreadKind::Devices | ThreadKind::Control => {
            rules.insert(libc::SYS_socket, arg_is(0, libc::AF_UNIX as u64)?);
        }
        _ => {}
    }
    if kind == ThreadKind::Control {
        // The short-lived import thread detaches its cwd and umask (CLONE_FS) only.
        rules.insert(libc::SYS_unshare, arg_is(0, libc::CLONE_FS as u64)?);
    }
    Ok(rules)
}

/// The compiled list of `kind`.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    SeccompFilter::new(
        rules(kind)?,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .and_then(TryInto::try_into)
    .map_err(SeccompError::Build)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fork; in the child install the process-wide filters and `kind`'s list, run
    /// `call`, exit with its result. `Ok(exit code)` or `Err(signal)`.
    fn in_child(kind: ThreadKind, call: fn() -> i32) -> Result<i32, i32> {
        let progs = [
            super::super::clone3_filter().unwrap(),
            super::super::filter().unwrap(),
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
