//! The rules of the VMM's seccomp filters, in one place: the process-wide filter
//! ([`process_filter`]: calls that kill the VMM), the `clone3` filter and each thread
//! kind's allowlist ([`thread_filter`]).
//!
//! This file uses only `std`, `libc`, `seccompiler` and [`super::dispatch`] (a binary
//! search over the calls' numbers in front of seccompiler's programs, which makes an
//! install cheap): the build script (`vmm/build.rs`) includes both and compiles every
//! filter into BPF once, at build time, so that a VMM starting up only loads them
//! (`super::compiled`); the unit tests check that what was compiled then is what these
//! rules compile to now.

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::dispatch::{self, DispatchError};

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

/// Every kind, in the order of the compiled lists.
pub const THREAD_KINDS: [ThreadKind; 5] = [
    ThreadKind::Vcpu,
    ThreadKind::VcpuSaving,
    ThreadKind::Devices,
    ThreadKind::FsWorker,
    ThreadKind::Control,
];

/// Calls that kill the VMM.
pub const KILLED: &[(i64, &str)] = &[
    (libc::SYS_execve, "execve"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_pidfd_getfd, "pidfd_getfd"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_keyctl, "keyctl"),
    (libc::SYS_add_key, "add_key"),
    (libc::SYS_request_key, "request_key"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_delete_module, "delete_module"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_kexec_file_load, "kexec_file_load"),
    (libc::SYS_reboot, "reboot"),
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    (libc::SYS_io_uring_enter, "io_uring_enter"),
    (libc::SYS_io_uring_register, "io_uring_register"),
    (libc::SYS_iopl, "iopl"),
    (libc::SYS_ioperm, "ioperm"),
    // Signals reach other processes only through these; the VMM signals its own threads
    // with tgkill (see `own_process_only`).
    (libc::SYS_kill, "kill"),
    (libc::SYS_tkill, "tkill"),
    (libc::SYS_rt_sigqueueinfo, "rt_sigqueueinfo"),
    (libc::SYS_pidfd_open, "pidfd_open"),
    (libc::SYS_pidfd_send_signal, "pidfd_send_signal"),
];

/// Every call of the mount API, old and new: they kill the VMM, and the process tiers'
/// filter refuses them (`sandbox::seccomp`).
pub const MOUNT_CALLS: &[(i64, &str)] = &[
    (libc::SYS_mount, "mount"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_pivot_root, "pivot_root"),
    (libc::SYS_chroot, "chroot"),
    (libc::SYS_move_mount, "move_mount"),
    (libc::SYS_open_tree, "open_tree"),
    (libc::SYS_fsopen, "fsopen"),
    (libc::SYS_fsconfig, "fsconfig"),
    (libc::SYS_fsmount, "fsmount"),
    (libc::SYS_fspick, "fspick"),
    (libc::SYS_mount_setattr, "mount_setattr"),
];

/// The flags of `clone` and `unshare` that make a namespace: with any of them those calls
/// kill the VMM (the fs worker's `unshare(CLONE_FS)` stays allowed), and the process
/// tiers' filter refuses them (`sandbox::seccomp`).
pub const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
    0x80, // CLONE_NEWTIME
];

fn flag_rules() -> Result<Vec<SeccompRule>, BackendError> {
    NAMESPACE_FLAGS
        .iter()
        .map(|flag| {
            let cond = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(*flag),
                *flag,
            )?;
            SeccompRule::new(vec![cond])
        })
        .collect()
}

/// `tgkill` and `rt_tgsigqueueinfo` to a thread group other than `pid` (run as root, a
/// VMM taken over by its guest could otherwise signal any process of the host).
fn own_process_only(pid: u32) -> Result<Vec<SeccompRule>, BackendError> {
    Ok(vec![arg_rule(0, SeccompCmpOp::Ne, u64::from(pid))?])
}

/// The process-wide filter of the VMM process `pid`, the only process it may signal:
/// the calls of [`KILLED`] and [`MOUNT_CALLS`], namespaces and signals to others kill the process.
pub fn process_filter(pid: u32) -> Result<BpfProgram, DispatchError> {
    dispatch::compile(
        process_rules(pid)?,
        SeccompAction::Allow,
        SeccompAction::KillProcess,
    )
}

/// The rules of [`process_filter`], by system call.
pub(crate) fn process_rules(pid: u32) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = KILLED
        .iter()
        .chain(MOUNT_CALLS)
        .map(|(nr, _)| (*nr, vec![]))
        .collect();
    rules.insert(libc::SYS_unshare, flag_rules()?);
    rules.insert(libc::SYS_clone, flag_rules()?);
    rules.insert(libc::SYS_tgkill, own_process_only(pid)?);
    rules.insert(libc::SYS_rt_tgsigqueueinfo, own_process_only(pid)?);
    Ok(rules)
}

/// `clone3` answers ENOSYS: its flags are in memory, where a filter cannot see them, and
/// the C library then falls back to `clone`, which [`process_filter`] judges.
pub fn clone3_filter() -> Result<BpfProgram, BackendError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )?
    .try_into()
}

/// The allowlist of `kind`: its calls pass, any other answers `EPERM`.
pub fn thread_filter(kind: ThreadKind) -> Result<BpfProgram, DispatchError> {
    dispatch::compile(
        thread_rules(kind)?,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
    )
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
fn prctl_rules() -> Result<Vec<SeccompRule>, BackendError> {
    [libc::PR_SET_NAME, libc::PR_GET_NAME]
        .into_iter()
        .map(|op| arg_rule(0, SeccompCmpOp::Eq, op as u64))
        .collect()
}

/// One argument of a call equal to `value`.
fn arg_is(index: u8, value: u64) -> Result<Vec<SeccompRule>, BackendError> {
    Ok(vec![arg_rule(index, SeccompCmpOp::Eq, value)?])
}

/// One rule of one condition: the call's argument `index` (its low 32 bits) compared by
/// `op` with `value`.
fn arg_rule(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        op,
        value,
    )?])
}

/// The system calls of `kind`, with the argument rules some need.
pub(crate) fn thread_rules(
    kind: ThreadKind,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
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
