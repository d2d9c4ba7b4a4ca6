//! The seccomp filters every process-level sandbox installs, built with seccompiler.
//!
//! Three filters, because they need different errors:
//! - the ABI filter, first: a call from any architecture but x86-64 kills the process,
//!   and every x32 system call (number with bit 30, `__X32_SYSCALL_BIT`, set) fails with
//!   EPERM. The other filters match x86-64 numbers only, so without it a denied call
//!   would be reachable through its x32 number on a kernel with x32 enabled;
//! - `clone3` fails with ENOSYS, so libc falls back to `clone`, whose flags a filter can
//!   inspect (clone3 passes them in memory, out of a filter's reach);
//! - everything else on the deny list fails with EPERM (behind a binary search over its
//!   system call numbers, `vmm::seccomp::dispatch`, which makes installing it cheaper).

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
    #[error("compiling the deny filter behind its binary search failed")]
    Dispatch(#[source] vmm::seccomp::dispatch::DispatchError),
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

/// Every call denied outright: [`DENIED_SYSCALLS`] and the mount API (the list the
/// VMM's filter kills for, `vmm::seccomp::rules::MOUNT_CALLS`).
fn denied_calls() -> impl Iterator<Item = &'static (i64, &'static str)> {
    DENIED_SYSCALLS
        .iter()
        .chain(vmm::seccomp::rules::MOUNT_CALLS)
}

/// Socket families a sandboxed program may use; every other family is denied.
const ALLOWED_FAMILIES: &[u64] = &[
    libc::AF_UNIX as u64,
    libc::AF_INET as u64,
    libc::AF_INET6 as u64,
    libc::AF_NETLINK as u64,
];

/// Namespace-creating clone flags (the VMM's filter kills for the same).
use vmm::seccomp::rules::NAMESPACE_FLAGS as CLONE_NS_FLAGS;

/// Terminal ioctls that inject input or reach the console.
const DENIED_IOCTLS: &[u64] = &[libc::TIOCSTI as _, 0x541C /* TIOCLINUX */];

/// Calls that set a file's mode, with the index of their mode argument: refused when the
/// mode carries set-user-ID or set-group-ID. A sandbox of root's writes its files as host
/// root, so such a file in a read-write grant would hand root to whoever runs it on the
/// host. (`open` and `openat` only create with their mode; without O_CREAT the C library
/// passes 0.)
const MODE_SETTERS: &[(i64, u8)] = &[
    (libc::SYS_chmod, 1),
    (libc::SYS_fchmod, 1),
    (libc::SYS_fchmodat, 2),
    (452, 2), // fchmodat2
    (libc::SYS_open, 2),
    (libc::SYS_openat, 3),
    (libc::SYS_creat, 1),
    (libc::SYS_mknod, 1),
    (libc::SYS_mknodat, 2),
];
const SET_ID_BITS: [u64; 2] = [libc::S_ISUID as u64, libc::S_ISGID as u64];

/// Extended attributes cannot be set (EOPNOTSUPP, which programs take for a file system
/// without them): `security.capability` would give a file in a grant capabilities on the
/// host, as set-user-ID would give it root.
const XATTR_SETTERS: &[i64] = &[
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    463, // setxattrat
];

/// The x32 system-call bit (`__X32_SYSCALL_BIT`).
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// `AUDIT_ARCH_X86_64`: EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
pub use vmm::seccomp::dispatch::AUDIT_ARCH_X86_64;
use vmm::seccomp::dispatch::{jump, stmt, DATA_ARCH, DATA_NR};

/// Names of what the filters deny, for `mxc-vm backends` and documentation.
pub fn describe() -> Vec<String> {
    let mut v: Vec<String> = denied_calls().map(|(_, n)| n.to_string()).collect();
    v.push("every x32 system call (number with bit 30 set); any non-x86-64 ABI kills".into());
    v.push("clone3 (ENOSYS, so libc falls back to clone)".into());
    v.push("clone with namespace flags".into());
    v.push("socket/socketpair other than AF_UNIX, AF_INET, AF_INET6, AF_NETLINK".into());
    v.push("ioctl TIOCSTI, TIOCLINUX".into());
    v.push(
        "set-user-ID and set-group-ID modes (chmod, fchmod, fchmodat, fchmodat2, open, \
         openat, creat, mknod, mknodat); openat2 (ENOSYS, so libc falls back to openat)"
            .into(),
    );
    v.push("setting extended attributes (EOPNOTSUPP)".into());
    v
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(SeccompError::Build)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(SeccompError::Build)
}

/// The deny-list filter (EPERM), behind a binary search over its system call numbers
/// (`vmm::seccomp::dispatch`: installing it is cheap).
fn deny_filter() -> Result<BpfProgram, SeccompError> {
    vmm::seccomp::dispatch::compile(
        deny_rules()?,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
    )
    .map_err(SeccompError::Dispatch)
}

/// The deny list's rules, by system call.
fn deny_rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, _) in denied_calls() {
        rules.insert(*nr, vec![]);
    }
    // One rule that matches every family but the allowed ones, known to Linux or not.
    // (A rule per denied family is the same set in twelve times the instructions, and
    // the kernel copies, JIT-compiles and, for every system call number, pre-evaluates
    // each instruction at every install: a test proves the two equal.)
    let family_rule = rule(
        ALLOWED_FAMILIES
            .iter()
            .map(|family| cond(0, SeccompCmpOp::Ne, *family))
            .collect::<Result<_, _>>()?,
    )?;
    rules.insert(libc::SYS_socket, vec![family_rule.clone()]);
    rules.insert(libc::SYS_socketpair, vec![family_rule]);

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

    for (nr, arg) in MODE_SETTERS {
        let mut set_id = Vec::new();
        for bit in SET_ID_BITS {
            set_id.push(rule(vec![cond(*arg, SeccompCmpOp::MaskedEq(bit), bit)?])?);
        }
        rules.insert(*nr, set_id);
    }
    Ok(rules)
}

/// A filter that answers `errno` to the calls `rules` match and allows the rest.
fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        TargetArch::x86_64,
    )
    .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Compile)
}

/// The ABI filter: not x86-64 → kill the process; an x32 number → EPERM; else allow
/// (the next filters decide). Hand-written because seccompiler keys rules by exact
/// system-call number and cannot test a bit of it.
fn abi_filter() -> BpfProgram {
    use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W};
    vec![
        stmt(BPF_LD | BPF_W | BPF_ABS, DATA_ARCH),
        // x86-64: skip the kill.
        jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD | BPF_W | BPF_ABS, DATA_NR),
        // x32 bit set: fall through to EPERM; else jump to allow.
        jump(BPF_JMP | BPF_JSET | BPF_K, X32_SYSCALL_BIT, 0, 1),
        stmt(
            BPF_RET | BPF_K,
            libc::SECCOMP_RET_ERRNO | (libc::EPERM as u32 & libc::SECCOMP_RET_DATA),
        ),
        stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// The filter of calls that answer ENOSYS, so that the C library falls back to one the
/// other filters can judge: clone3 (its flags are in memory), openat2 (its mode too).
fn clone3_filter() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_clone3, vec![]);
    rules.insert(437, vec![]); // openat2
    compile(rules, libc::ENOSYS)
}

/// The filter of calls that answer EOPNOTSUPP: setting extended attributes.
fn xattr_filter() -> Result<BpfProgram, SeccompError> {
    let rules = XATTR_SETTERS.iter().map(|nr| (*nr, vec![])).collect();
    compile(rules, libc::EOPNOTSUPP)
}

/// The filters, in the order they are installed.
pub fn filters() -> Result<Vec<BpfProgram>, SeccompError> {
    Ok(vec![
        abi_filter(),
        clone3_filter()?,
        deny_filter()?,
        xattr_filter()?,
    ])
}

/// The filters compiled once per process: [`prepare`] before forking a sandbox means
/// its processes install them without compiling again.
static COMPILED: std::sync::OnceLock<Vec<BpfProgram>> = std::sync::OnceLock::new();

/// Compile the filters now (once per process), so that [`install`] in a forked child
/// only loads them.
pub fn prepare() -> Result<(), SeccompError> {
    if COMPILED.get().is_none() {
        let _ = COMPILED.set(filters()?);
    }
    Ok(())
}

/// Install the filters on the calling thread. NO_NEW_PRIVS must already be set.
pub fn install() -> Result<(), SeccompError> {
    prepare()?;
    for prog in COMPILED.get().into_iter().flatten() {
        seccompiler::apply_filter(prog).map_err(SeccompError::Install)?;
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
    use seccompiler::sock_filter;

    #[test]
    fn filters_compile() {
        let progs = filters().expect("filters compile");
        assert_eq!(progs.len(), 4);
        assert!(progs.iter().all(|p| !p.is_empty()));
    }

    fn run(prog: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        vmm::seccomp::evaluate(prog, nr, arch, args).unwrap().action
    }

    /// What the kernel does with all filters: the most restrictive action wins.
    fn verdict(nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        let rank = |action: u32| match action & 0xffff_0000 {
            a if a == libc::SECCOMP_RET_KILL_PROCESS => 0,
            a if a == libc::SECCOMP_RET_ERRNO => 3,
            a if a == libc::SECCOMP_RET_ALLOW => 9,
            other => panic!("unexpected action {other:#x}"),
        };
        filters()
            .unwrap()
            .iter()
            .map(|p| run(p, nr, arch, args))
            .min_by_key(|a| rank(*a))
            .unwrap()
    }

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;

    #[test]
    fn every_denied_call_is_refused_under_its_x32_number_too() {
        for (nr, name) in denied_calls() {
            let nr = u32::try_from(*nr).unwrap();
            assert_ne!(verdict(nr, AUDIT_ARCH_X86_64, [0; 6]), ALLOW, "{name}");
            assert_ne!(
                verdict(nr | X32_SYSCALL_BIT, AUDIT_ARCH_X86_64, [0; 6]),
                ALLOW,
                "{name} through its x32 number"
            );
        }
        // x32 numbers of allowed calls are refused as well: the whole ABI is off.
        let x32_read = X32_SYSCALL_BIT;
        assert_eq!(
            verdict(x32_read, AUDIT_ARCH_X86_64, [0; 6]),
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32
        );
        // An ordinary call is allowed.
        assert_eq!(
            verdict(libc::SYS_getpid as u32, AUDIT_ARCH_X86_64, [0; 6]),
            ALLOW
        );
    }

    #[test]
    fn set_id_modes_and_extended_attributes_are_refused() {
        let x64 = AUDIT_ARCH_X86_64;
        let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        for (nr, arg) in MODE_SETTERS {
            let nr = u32::try_from(*nr).unwrap();
            let with = |mode: u64| {
                let mut args = [0u64; 6];
                args[usize::from(*arg)] = mode;
                verdict(nr, x64, args)
            };
            assert_eq!(with(0o4755), eperm, "{nr} with set-user-ID");
            assert_eq!(with(0o2755), eperm, "{nr} with set-group-ID");
            assert_eq!(with(0o755), ALLOW, "{nr} with an ordinary mode");
            assert_eq!(with(0o1777), ALLOW, "{nr} with the sticky bit");
        }
        for nr in XATTR_SETTERS {
            let v = verdict(u32::try_from(*nr).unwrap(), x64, [0; 6]);
            assert_eq!(v, libc::SECCOMP_RET_ERRNO | libc::EOPNOTSUPP as u32);
        }
        let openat2 = verdict(437, x64, [0; 6]);
        assert_eq!(openat2, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32);
    }

    #[test]
    fn another_architecture_is_killed() {
        const AUDIT_ARCH_I386: u32 = 3 | 0x4000_0000;
        let v = verdict(libc::SYS_getpid as u32, AUDIT_ARCH_I386, [0; 6]);
        assert_eq!(v, libc::SECCOMP_RET_KILL_PROCESS);
    }

    #[test]
    fn argument_rules_still_hold() {
        let unshare_user = [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0];
        let vsock = [libc::AF_VSOCK as u64, 1, 0, 0, 0, 0];
        let inet = [libc::AF_INET as u64, 1, 0, 0, 0, 0];
        assert_ne!(
            verdict(libc::SYS_clone as u32, AUDIT_ARCH_X86_64, unshare_user),
            ALLOW
        );
        assert_ne!(
            verdict(libc::SYS_socket as u32, AUDIT_ARCH_X86_64, vsock),
            ALLOW
        );
        assert_eq!(
            verdict(libc::SYS_socket as u32, AUDIT_ARCH_X86_64, inet),
            ALLOW
        );
        assert_eq!(
            verdict(libc::SYS_clone3 as u32, AUDIT_ARCH_X86_64, [0; 6]),
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
    }

    /// The deny filter as it was built before its socket rule was folded into one: a
    /// rule per denied family up to the last one Linux knows, and one for the numbers
    /// above it.
    fn deny_filter_per_family() -> BpfProgram {
        const LAST_FAMILY: u64 = 45;
        let mut family_rules = Vec::new();
        for family in (0..=LAST_FAMILY).filter(|f| !ALLOWED_FAMILIES.contains(f)) {
            family_rules.push(rule(vec![cond(0, SeccompCmpOp::Eq, family).unwrap()]).unwrap());
        }
        family_rules.push(rule(vec![cond(0, SeccompCmpOp::Gt, LAST_FAMILY).unwrap()]).unwrap());
        let mut rules = deny_rules().unwrap();
        rules.insert(libc::SYS_socket, family_rules.clone());
        rules.insert(libc::SYS_socketpair, family_rules);
        compile(rules, libc::EPERM).unwrap()
    }

    /// The deny filter (its socket rule folded, behind its dispatch) decides every call
    /// as the per-family one without a dispatch did: every system call number (and its
    /// x32 alias), each argument position set to every value the rules compare with,
    /// their neighbours, combinations and both halves of a 64-bit word; and on other
    /// architectures.
    #[test]
    fn the_folded_deny_filter_equals_the_per_family_one() {
        let folded = deny_filter().unwrap();
        let reference = deny_filter_per_family();
        let mut values: Vec<u64> = (0..=80).collect();
        values.extend(
            CLONE_NS_FLAGS
                .iter()
                .flat_map(|f| [*f, *f | 17, *f - 1, *f + 1]),
        );
        values.extend(DENIED_IOCTLS.iter().flat_map(|r| [*r, *r - 1, *r + 1]));
        values.extend([
            0o4000, 0o2000, 0o6000, 0o4755, 0o2755, 0o6755, 0o1777, 0o777,
        ]);
        values.extend([
            u64::from(u32::MAX),
            u64::MAX,
            1 << 32,
            (1 << 32) | 1,
            (1 << 32) | 2,
        ]);
        values.extend([(10 << 32) | 10, (16 << 32) | 5, 0x7fff_ffff, 0x8000_0000]);
        let all_ns = CLONE_NS_FLAGS.iter().fold(0, |a, f| a | f);
        values.extend([all_ns, all_ns | u64::from(libc::SIGCHLD as u32)]);
        let mut compared = 0usize;
        const AUDIT_ARCH_I386: u32 = 3 | 0x4000_0000;
        const AUDIT_ARCH_AARCH64: u32 = 183 | 0x8000_0000 | 0x4000_0000;
        for arch in [AUDIT_ARCH_I386, AUDIT_ARCH_AARCH64, 0] {
            for nr in [0, 1, 41, 101, 435, 1023, u32::MAX] {
                assert_eq!(
                    run(&folded, nr, arch, [0; 6]),
                    run(&reference, nr, arch, [0; 6]),
                    "nr {nr} on {arch:#x}"
                );
            }
        }
        for nr in (0..=1023u32).flat_map(|nr| [nr, nr | X32_SYSCALL_BIT]) {
            for position in 0..4 {
                for value in &values {
                    let mut args = [0u64; 6];
                    args[position] = *value;
                    let (a, b) = (
                        run(&folded, nr, AUDIT_ARCH_X86_64, args),
                        run(&reference, nr, AUDIT_ARCH_X86_64, args),
                    );
                    assert_eq!(a, b, "nr {nr:#x}, argument {position} = {value:#x}");
                    compared += 1;
                }
            }
        }
        assert!(compared > 800_000);
        // 584 instructions instead of 867.
        assert!(
            folded.len() * 3 < reference.len() * 2 + 300,
            "{}",
            folded.len()
        );
    }

    /// The dispatch decides a call the deny list does not name in a few instructions,
    /// where seccompiler's chain of number tests walked them all.
    #[test]
    fn the_deny_filter_allows_an_unnamed_call_at_once() {
        let plain = compile(deny_rules().unwrap(), libc::EPERM).unwrap();
        let dispatched = deny_filter().unwrap();
        let getpid = libc::SYS_getpid as u32;
        let evaluate = |prog: &[sock_filter]| {
            vmm::seccomp::evaluate(prog, getpid, AUDIT_ARCH_X86_64, [0; 6]).unwrap()
        };

        let (before, after) = (evaluate(&plain), evaluate(&dispatched));

        assert_eq!((before.action, after.action), (ALLOW, ALLOW));
        assert!(after.steps <= 20, "{} instructions", after.steps);
        assert!(before.steps > 100, "{} instructions", before.steps);
    }

    #[test]
    fn bytes_are_eight_per_instruction() {
        let prog = clone3_filter().expect("compiles");
        assert_eq!(to_bytes(&prog).len(), prog.len() * 8);
    }
}
