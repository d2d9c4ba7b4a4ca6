//! The seccomp filters every process-level sandbox installs, built with seccompiler.
//!
//! Two filters, because they need different errors:
//! - `clone3` fails with ENOSYS, so libc falls back to `clone`, whose flags a filter can
//!   inspect (clone3 passes them in memory, out of a filter's reach);
//! - everything else on the deny list fails with EPERM.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter failed")]
    Build(#[source] seccompiler::BackendError),
    #[error("compiling the seccomp filter failed")]
    Compile(#[source] seccompiler::BackendError),
    #[error("installing the seccomp filter failed")]
    Install(#[source] seccompiler::Error),
}

/// System calls that are denied outright.
const DENIED_SYSCALLS: &[(i64, &str)] = &[
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_pidfd_getfd, "pidfd_getfd"),
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    (libc::SYS_io_uring_enter, "io_uring_enter"),
    (libc::SYS_io_uring_register, "io_uring_register"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_keyctl, "keyctl"),
    (libc::SYS_add_key, "add_key"),
    (libc::SYS_request_key, "request_key"),
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
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_kexec_file_load, "kexec_file_load"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_delete_module, "delete_module"),
    (libc::SYS_reboot, "reboot"),
    (libc::SYS_swapon, "swapon"),
    (libc::SYS_swapoff, "swapoff"),
    (libc::SYS_acct, "acct"),
    (libc::SYS_quotactl, "quotactl"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_open_by_handle_at, "open_by_handle_at"),
    (libc::SYS_syslog, "syslog"),
    (libc::SYS_iopl, "iopl"),
    (libc::SYS_ioperm, "ioperm"),
    (libc::SYS_lookup_dcookie, "lookup_dcookie"),
    (libc::SYS_fanotify_init, "fanotify_init"),
    (libc::SYS_settimeofday, "settimeofday"),
    (libc::SYS_clock_settime, "clock_settime"),
    (libc::SYS_clock_adjtime, "clock_adjtime"),
    (libc::SYS_adjtimex, "adjtimex"),
    (libc::SYS_vhangup, "vhangup"),
    (libc::SYS_uselib, "uselib"),
];

/// Socket families a sandboxed program may use; every other family is denied.
const ALLOWED_FAMILIES: &[u64] = &[
    libc::AF_UNIX as u64,
    libc::AF_INET as u64,
    libc::AF_INET6 as u64,
    libc::AF_NETLINK as u64,
];
/// Highest address family number Linux knows (AF_MAX - 1); anything above is denied too.
const LAST_FAMILY: u64 = 45;

/// Namespace-creating clone flags.
const CLONE_NS_FLAGS: &[u64] = &[
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
    0x80, // CLONE_NEWTIME
];

/// Terminal ioctls that inject input or reach the console.
const DENIED_IOCTLS: &[u64] = &[libc::TIOCSTI, 0x541C /* TIOCLINUX */];

/// Names of what the filters deny, for `mxc-vm backends` and documentation.
pub fn describe() -> Vec<String> {
    let mut v: Vec<String> = DENIED_SYSCALLS.iter().map(|(_, n)| n.to_string()).collect();
    v.push("clone3 (ENOSYS, so libc falls back to clone)".into());
    v.push("clone with namespace flags".into());
    v.push("socket/socketpair other than AF_UNIX, AF_INET, AF_INET6, AF_NETLINK".into());
    v.push("ioctl TIOCSTI, TIOCLINUX".into());
    v
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(SeccompError::Build)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(SeccompError::Build)
}

/// The deny-list filter (EPERM).
fn deny_filter() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, _) in DENIED_SYSCALLS {
        rules.insert(*nr, vec![]);
    }
    let mut family_rules = Vec::new();
    for family in (0..=LAST_FAMILY).filter(|f| !ALLOWED_FAMILIES.contains(f)) {
        family_rules.push(rule(vec![cond(0, SeccompCmpOp::Eq, family)?])?);
    }
    family_rules.push(rule(vec![cond(0, SeccompCmpOp::Gt, LAST_FAMILY)?])?);
    rules.insert(libc::SYS_socket, family_rules.clone());
    rules.insert(libc::SYS_socketpair, family_rules);

    let mut clone_rules = Vec::new();
    for flag in CLONE_NS_FLAGS {
        clone_rules.push(rule(vec![cond(0, SeccompCmpOp::MaskedEq(*flag), *flag)?])?);
    }
    rules.insert(libc::SYS_clone, clone_rules);

    let mut ioctl_rules = Vec::new();
    for req in DENIED_IOCTLS {
        ioctl_rules.push(rule(vec![cond(1, SeccompCmpOp::Eq, *req)?])?);
    }
    rules.insert(libc::SYS_ioctl, ioctl_rules);

    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Compile)
}

/// The clone3 filter (ENOSYS).
fn clone3_filter() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_clone3, vec![]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Compile)
}

/// Both filters, in the order they are installed.
pub fn filters() -> Result<Vec<BpfProgram>, SeccompError> {
    Ok(vec![clone3_filter()?, deny_filter()?])
}

/// Install both filters on the calling thread. NO_NEW_PRIVS must already be set.
pub fn install() -> Result<(), SeccompError> {
    for prog in filters()? {
        seccompiler::apply_filter(&prog).map_err(SeccompError::Install)?;
    }
    Ok(())
}

/// A program as the raw bytes of its `struct sock_filter` array (what bwrap reads).
pub fn to_bytes(prog: &BpfProgram) -> Vec<u8> {
    let mut out = Vec::with_capacity(prog.len() * 8);
    for ins in prog {
        out.extend_from_slice(&ins.code.to_ne_bytes());
        out.push(ins.jt);
        out.push(ins.jf);
        out.extend_from_slice(&ins.k.to_ne_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        let progs = filters().expect("filters compile");
        assert_eq!(progs.len(), 2);
        assert!(progs.iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn bytes_are_eight_per_instruction() {
        let prog = clone3_filter().expect("compiles");
        assert_eq!(to_bytes(&prog).len(), prog.len() * 8);
    }
}
