//! The VMM's seccomp filters as the build script compiled them (`vmm/build.rs`, from
//! [`super::rules`]): a VMM starting up copies them out of its binary instead of
//! compiling them, and fills in its own pid where the process-wide filter names it.

use seccompiler::{sock_filter, BpfProgram};

use super::rules::{ThreadKind, THREAD_KINDS};

/// One BPF instruction: code, jump if true, jump if false, operand.
type Insn = (u16, u8, u8, u32);

/// The tables `vmm/build.rs` wrote.
mod tables {
    use super::Insn;
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

fn program(insns: &[Insn]) -> BpfProgram {
    insns
        .iter()
        .map(|&(code, jt, jf, k)| sock_filter { code, jt, jf, k })
        .collect()
}

/// The `clone3` filter ([`super::rules::clone3_filter`]).
pub fn clone3() -> BpfProgram {
    program(tables::CLONE3)
}

/// The process-wide filter of the VMM process `pid` ([`super::rules::process_filter`]).
pub fn process(pid: u32) -> BpfProgram {
    let mut prog = program(tables::PROCESS);
    for &at in tables::PROCESS_PID_AT {
        if let Some(insn) = prog.get_mut(at) {
            insn.k = pid;
        }
    }
    prog
}

/// The allowlist of `kind` ([`super::rules::thread_filter`]).
pub fn thread(kind: ThreadKind) -> Option<BpfProgram> {
    let index = THREAD_KINDS.iter().position(|k| *k == kind)?;
    tables::THREADS.get(index).map(|insns| program(insns))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::seccomp::rules;

    fn insns(prog: &[sock_filter]) -> Vec<Insn> {
        prog.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect()
    }

    /// What the build compiled is what the rules compile to now, instruction for
    /// instruction; the process filter for any pid, its own included.
    #[test]
    fn the_filters_compiled_at_build_time_are_those_the_rules_compile_to() {
        assert_eq!(insns(&clone3()), insns(&rules::clone3_filter().unwrap()));
        for pid in [1, 2, 4242, std::process::id(), 4_194_304, u32::MAX] {
            assert_eq!(
                insns(&process(pid)),
                insns(&rules::process_filter(pid).unwrap()),
                "pid {pid}"
            );
        }
        for kind in THREAD_KINDS {
            assert_eq!(
                insns(&thread(kind).unwrap()),
                insns(&rules::thread_filter(kind).unwrap()),
                "{kind:?}"
            );
        }
    }
}
