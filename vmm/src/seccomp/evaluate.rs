//! A classic-BPF interpreter for seccomp filters, to check what a filter answers
//! without installing it (the tests of the VMM's and the process tiers' filters).

use seccompiler::sock_filter;

/// What a filter answered for one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The `SECCOMP_RET_*` value.
    pub action: u32,
    /// How many instructions it ran.
    pub steps: usize,
}

/// Runs `prog` over the `struct seccomp_data` of the call (`nr`, `arch`, `args`; the
/// instruction pointer 0). `None` where the program uses an instruction seccomp filters
/// do not (or the ones seccompiler and [`super::dispatch`] emit do not), or runs off
/// its end.
pub fn evaluate(prog: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> Option<Verdict> {
    use libc::{
        BPF_ABS, BPF_ALU, BPF_AND, BPF_JA, BPF_JEQ, BPF_JGE, BPF_JGT, BPF_JMP, BPF_JSET, BPF_K,
        BPF_LD, BPF_RET, BPF_W,
    };
    let mut data = Vec::with_capacity(64);
    data.extend_from_slice(&nr.to_ne_bytes());
    data.extend_from_slice(&arch.to_ne_bytes());
    data.extend_from_slice(&0u64.to_ne_bytes());
    for a in args {
        data.extend_from_slice(&a.to_ne_bytes());
    }
    let (mut acc, mut pc, mut steps) = (0u32, 0usize, 0usize);
    loop {
        let ins = prog.get(pc)?;
        let code = u32::from(ins.code);
        pc += 1;
        steps += 1;
        match code {
            c if c == BPF_LD | BPF_W | BPF_ABS => {
                let at = usize::try_from(ins.k).ok()?;
                let word = data.get(at..at.checked_add(4)?)?;
                acc = u32::from_ne_bytes(word.try_into().ok()?);
            }
            c if c == BPF_ALU | BPF_AND | BPF_K => acc &= ins.k,
            c if c == BPF_JMP | BPF_JA => pc = pc.checked_add(usize::try_from(ins.k).ok()?)?,
            c if c & 0x07 == BPF_JMP && c & 0x08 == BPF_K => {
                let taken = match c & 0xf0 {
                    x if x == BPF_JEQ => acc == ins.k,
                    x if x == BPF_JGT => acc > ins.k,
                    x if x == BPF_JGE => acc >= ins.k,
                    x if x == BPF_JSET => acc & ins.k != 0,
                    _ => return None,
                };
                pc += usize::from(if taken { ins.jt } else { ins.jf });
            }
            c if c == BPF_RET | BPF_K => {
                return Some(Verdict {
                    action: ins.k,
                    steps,
                })
            }
            _ => return None,
        }
    }
}
