//! Seccomp filters in which every system call's path is short: a binary search over the
//! numbers the rules name, in front of small seccompiler programs of a few calls each.
//!
//! seccompiler tests a call's number against each named number in turn. At every
//! install the kernel runs the new filter once for each system-call number, to fill
//! seccomp's action cache (the numbers it may allow without running the filter), so an
//! install costs about (system-call numbers) × (path length): the VMM's lists, 200-460
//! instructions long, walked 41,000-85,000 instructions over the first 512 numbers, and
//! took 0.14-0.28 ms each to install on a kvm_pvm host (0.9-1.6 ms in the nested
//! hardware-KVM lane), on the path of every VMM start (the process filter and each
//! thread's own). Here a call walks `2·log2(buckets)` search instructions and then its
//! bucket's program, which holds at most [`BUCKET`] calls: 8,400-8,800 instructions
//! over those numbers, 0.05-0.09 ms per install (0.6-0.9 ms in the lane), for 12-19 %
//! more instructions. A call's verdict is what the one seccompiler program for all the
//! rules gives (tests compare them for every number, architecture and compared value).
//!
//! This file uses only `std`, `libc` and `seccompiler`: `vmm/build.rs` includes it.

use std::collections::BTreeMap;
use std::fmt;

use seccompiler::{
    sock_filter, BackendError, BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch,
};

/// The most system calls one program behind the search holds.
pub const BUCKET: usize = 3;

/// `AUDIT_ARCH_X86_64`.
pub const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
/// Offset of the system-call number in `struct seccomp_data`.
pub const DATA_NR: u32 = 0;
/// Offset of the architecture in `struct seccomp_data`.
pub const DATA_ARCH: u32 = 4;
/// `BPF_MAXINSNS`: the longest program the kernel loads.
const MAX_LEN: usize = 4096;

/// Why a filter could not be compiled.
#[derive(Debug)]
pub enum DispatchError {
    /// seccompiler refused a rule or a bucket's program.
    Compile(BackendError),
    /// A system-call number that is not a 32-bit unsigned number.
    Number(i64),
    /// More instructions than the kernel loads.
    TooLarge(usize),
    /// seccompiler's program did not start with the architecture check this module
    /// replaces (a seccompiler version that lays its programs out differently).
    Prologue,
}

impl fmt::Display for DispatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Compile(_) => write!(f, "seccompiler refused the filter"),
            Self::Number(nr) => write!(f, "{nr} is not a system-call number"),
            Self::TooLarge(len) => write!(
                f,
                "the filter has {len} instructions, more than the {MAX_LEN} the kernel loads"
            ),
            Self::Prologue => write!(
                f,
                "seccompiler's program does not start with the architecture check expected"
            ),
        }
    }
}

impl std::error::Error for DispatchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Compile(e) => Some(e),
            _ => None,
        }
    }
}

impl From<BackendError> for DispatchError {
    fn from(e: BackendError) -> Self {
        Self::Compile(e)
    }
}

/// The rules of one bucket's calls.
type Bucket = BTreeMap<i64, Vec<SeccompRule>>;

/// The x86-64 filter of `rules`: a call they name gets `matched` when one of its rules
/// matches (or it has none) and `mismatch` otherwise, any other call `mismatch`, a call
/// from another architecture kills the process (as seccompiler's filters do).
pub fn compile(
    mut rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, DispatchError> {
    if let Some(nr) = rules.keys().find(|nr| u32::try_from(**nr).is_err()) {
        return Err(DispatchError::Number(*nr));
    }
    // Each bucket holds a run of the numbers, in order.
    let mut buckets = Vec::with_capacity(rules.len().div_ceil(BUCKET));
    while let Some(next) = rules.keys().nth(BUCKET).copied() {
        let rest = rules.split_off(&next);
        buckets.push(rules);
        rules = rest;
    }
    if !rules.is_empty() {
        buckets.push(rules);
    }
    let mut out: BpfProgram = PROLOGUE
        .iter()
        .map(|&(c, jt, jf, k)| jump(c, k, jt, jf))
        .collect();
    if buckets.is_empty() {
        out.push(stmt(libc::BPF_RET | libc::BPF_K, mismatch.into()));
    } else {
        search(&mut out, buckets, &mismatch, &matched)?;
    }
    if out.len() > MAX_LEN {
        return Err(DispatchError::TooLarge(out.len()));
    }
    Ok(out)
}

/// How every seccompiler program for x86-64 starts, and so this filter: another
/// architecture kills the process, then the accumulator holds the call's number.
const PROLOGUE: [(u32, u8, u8, u32); 4] = [
    (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, DATA_ARCH),
    (
        libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
        1,
        0,
        AUDIT_ARCH_X86_64,
    ),
    (
        libc::BPF_RET | libc::BPF_K,
        0,
        0,
        libc::SECCOMP_RET_KILL_PROCESS,
    ),
    (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, DATA_NR),
];

/// Appends the search over `buckets` (the accumulator holds the call's number), with
/// each bucket's program at its leaf.
fn search(
    out: &mut BpfProgram,
    mut buckets: Vec<Bucket>,
    mismatch: &SeccompAction,
    matched: &SeccompAction,
) -> Result<(), DispatchError> {
    if buckets.len() == 1 {
        let bucket = buckets.pop().unwrap_or_default();
        return leaf(out, bucket, mismatch, matched);
    }
    let upper = buckets.split_off(buckets.len() / 2);
    let split = upper
        .first()
        .and_then(|b| b.keys().next())
        .map_or(0, |nr| *nr);
    let split = u32::try_from(split).map_err(|_| DispatchError::Number(split))?;
    // From the split on: the upper half, through a long jump (a conditional jump reaches
    // 255 instructions, the lower half is longer).
    out.push(jump(
        libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
        split,
        0,
        1,
    ));
    let to_upper = out.len();
    out.push(stmt(libc::BPF_JMP | libc::BPF_JA, 0));
    search(out, buckets, mismatch, matched)?;
    let to_here = offset(to_upper, out.len())?;
    if let Some(ja) = out.get_mut(to_upper) {
        ja.k = to_here;
    }
    search(out, upper, mismatch, matched)
}

/// seccompiler's program of the bucket's rules, without the [`PROLOGUE`] this filter's
/// start already ran: it tests the number against each of the bucket's calls, any other
/// gets `mismatch`. (Nothing jumps back in cBPF: the rest of the program never reaches
/// the prologue, so it runs the same without it.)
fn leaf(
    out: &mut BpfProgram,
    bucket: Bucket,
    mismatch: &SeccompAction,
    matched: &SeccompAction,
) -> Result<(), DispatchError> {
    let program: BpfProgram = SeccompFilter::new(
        bucket,
        mismatch.clone(),
        matched.clone(),
        TargetArch::x86_64,
    )?
    .try_into()?;
    let starts_as_expected = program
        .iter()
        .zip(PROLOGUE)
        .all(|(i, (c, jt, jf, k))| (u32::from(i.code), i.jt, i.jf, i.k) == (c, jt, jf, k));
    match program.get(PROLOGUE.len()..) {
        Some(rest) if starts_as_expected && !rest.is_empty() => {
            out.extend_from_slice(rest);
            Ok(())
        }
        _ => Err(DispatchError::Prologue),
    }
}

/// The jump offset from the instruction at `from` to the one at `to`.
fn offset(from: usize, to: usize) -> Result<u32, DispatchError> {
    to.checked_sub(from + 1)
        .and_then(|o| u32::try_from(o).ok())
        .ok_or(DispatchError::TooLarge(to))
}

/// A BPF instruction without jumps.
pub fn stmt(code: u32, k: u32) -> sock_filter {
    jump(code, k, 0, 0)
}

/// A BPF instruction: `code` with operand `k`, `jt` and `jf` instructions ahead when a
/// conditional jump's test holds or not.
pub fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        // BPF instruction codes are 16 bits.
        code: code as u16,
        jt,
        jf,
        k,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeSet;

    use super::*;
    use crate::seccomp::evaluate;
    use crate::seccomp::rules::{self, THREAD_KINDS};

    const I386: u32 = 3 | 0x4000_0000;
    const AARCH64: u32 = 183 | 0x8000_0000 | 0x4000_0000;
    const X32_BIT: u32 = 0x4000_0000;

    /// seccompiler's one program for all of `rules`: what [`compile`] must answer alike.
    fn plain(
        rules: BTreeMap<i64, Vec<SeccompRule>>,
        mismatch: SeccompAction,
        matched: SeccompAction,
    ) -> BpfProgram {
        SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
            .unwrap()
            .try_into()
            .unwrap()
    }

    /// The VMM's filters: (name, rules, mismatch, match).
    #[allow(clippy::type_complexity)]
    fn vmm_filters() -> Vec<(
        String,
        BTreeMap<i64, Vec<SeccompRule>>,
        SeccompAction,
        SeccompAction,
    )> {
        let mut all = vec![(
            "process".to_owned(),
            rules::process_rules(4242).unwrap(),
            SeccompAction::Allow,
            SeccompAction::KillProcess,
        )];
        for kind in THREAD_KINDS {
            all.push((
                format!("{kind:?}"),
                rules::thread_rules(kind).unwrap(),
                SeccompAction::Errno(libc::EPERM as u32),
                SeccompAction::Allow,
            ));
        }
        all
    }

    /// Every operand a program compares with, and 0 and all ones.
    fn compared_values(prog: &[sock_filter]) -> BTreeSet<u32> {
        let mut values: BTreeSet<u32> = prog
            .iter()
            .filter(|i| u32::from(i.code) & 0x07 == libc::BPF_JMP)
            .map(|i| i.k)
            .collect();
        values.extend([0, 1, u32::MAX]);
        values
    }

    /// For every number below 1024 (and its x32 alias, and a few far beyond), from
    /// x86-64 and two other architectures, the dispatched filter answers what
    /// seccompiler's program answers; a call the rules name, with each argument (and
    /// all at once) set to every value the program compares with, in either half.
    #[test]
    fn every_call_gets_the_verdict_of_the_plain_program() {
        let mut compared = 0usize;
        for (name, rules, mismatch, matched) in vmm_filters() {
            let named: BTreeSet<u32> = rules.keys().map(|nr| u32::try_from(*nr).unwrap()).collect();
            let reference = plain(rules.clone(), mismatch.clone(), matched.clone());
            let dispatched = compile(rules, mismatch, matched).unwrap();
            let values = compared_values(&reference);
            let numbers = (0..1024u32).flat_map(|nr| [nr, nr | X32_BIT]).chain([
                0x7fff_ffff,
                0x8000_0000,
                u32::MAX,
            ]);
            for nr in numbers {
                for arch in [AUDIT_ARCH_X86_64, I386, AARCH64] {
                    let mut cases = vec![[0u64; 6]];
                    if named.contains(&nr) && arch == AUDIT_ARCH_X86_64 {
                        for v in &values {
                            for wide in [u64::from(*v), u64::from(*v) << 32] {
                                cases.push([wide; 6]);
                                for at in 0..6 {
                                    let mut args = [0u64; 6];
                                    args[at] = wide;
                                    cases.push(args);
                                }
                            }
                        }
                    }
                    for args in cases {
                        let want = evaluate(&reference, nr, arch, args).unwrap().action;
                        let got = evaluate(&dispatched, nr, arch, args).unwrap().action;
                        assert_eq!(got, want, "{name}: call {nr:#x}, arch {arch:#x}, {args:x?}");
                        compared += 1;
                    }
                }
            }
        }
        assert!(compared > 300_000, "{compared}");
    }

    /// The install-time cost the kernel pays (it runs the filter for each number): every
    /// call below 512 is decided in a fifth of the instructions seccompiler's chain took
    /// on average, and none takes more than `BUCKET` tests past the search and its
    /// bucket's program.
    #[test]
    fn a_call_is_decided_in_a_few_instructions() {
        for (name, rules, mismatch, matched) in vmm_filters() {
            let reference = plain(rules.clone(), mismatch.clone(), matched.clone());
            let dispatched = compile(rules, mismatch, matched).unwrap();
            let steps = |prog: &[sock_filter]| -> Vec<usize> {
                (0..512)
                    .map(|nr| evaluate(prog, nr, AUDIT_ARCH_X86_64, [0; 6]).unwrap().steps)
                    .collect()
            };
            let (before, after) = (steps(&reference), steps(&dispatched));
            let (sum_before, sum_after) =
                (before.iter().sum::<usize>(), after.iter().sum::<usize>());
            assert!(
                sum_after * 4 < sum_before,
                "{name}: {sum_after} instructions for 512 calls, seccompiler's {sum_before}"
            );
            assert!(
                after.iter().max() < Some(&100),
                "{name}: {:?} at most",
                after.iter().max()
            );
            assert!(dispatched.len() < MAX_LEN);
        }
    }

    #[test]
    fn a_number_that_is_not_a_system_call_number_is_refused() {
        let rules = BTreeMap::from([(-1i64, vec![])]);
        let err = compile(rules, SeccompAction::Allow, SeccompAction::KillProcess).unwrap_err();
        assert!(matches!(err, DispatchError::Number(-1)), "{err:?}");
        assert_eq!(err.to_string(), "-1 is not a system-call number");
    }

    #[test]
    fn without_rules_every_call_gets_the_mismatch_action() {
        let empty = BTreeMap::new;
        let reference = plain(empty(), SeccompAction::Allow, SeccompAction::KillProcess);
        let prog = compile(empty(), SeccompAction::Allow, SeccompAction::KillProcess).unwrap();
        for (nr, arch) in [(0, AUDIT_ARCH_X86_64), (39, AUDIT_ARCH_X86_64), (39, I386)] {
            assert_eq!(
                evaluate(&prog, nr, arch, [0; 6]).unwrap().action,
                evaluate(&reference, nr, arch, [0; 6]).unwrap().action,
            );
        }
    }

    #[test]
    fn fewer_calls_than_a_bucket_holds_need_no_search() {
        let getpid = libc::SYS_getpid as u32;
        let rules = BTreeMap::from([(i64::from(getpid), vec![])]);
        let prog = compile(rules, SeccompAction::Errno(1), SeccompAction::Allow).unwrap();
        let verdict = |nr, arch| evaluate(&prog, nr, arch, [0; 6]).unwrap().action;
        assert_eq!(verdict(getpid, AUDIT_ARCH_X86_64), libc::SECCOMP_RET_ALLOW);
        assert_eq!(
            verdict(getpid + 1, AUDIT_ARCH_X86_64),
            libc::SECCOMP_RET_ERRNO | 1
        );
        assert_eq!(verdict(getpid, I386), libc::SECCOMP_RET_KILL_PROCESS);
        assert!(!prog
            .iter()
            .any(|i| u32::from(i.code) == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K));
    }
}
