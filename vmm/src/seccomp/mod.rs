//! The VMM's own seccomp filter: system calls a VMM never makes kill the whole process.
//!
//! The guest is hostile from its first instruction; if it ever took over a VMM thread
//! (a device-emulation bug), this filter keeps it from the calls that would reach
//! further into the host: running programs, tracing or reading other processes, mounts
//! and namespaces, BPF, keys, perf, kernel modules, kexec, io_uring. Installed on every
//! thread (TSYNC) once the VM is built and before it runs; threads started later inherit
//! it. On top of it each thread kind (vCPU, device loop, fs worker, control) has its own
//! allowlist ([`threads`]). Every filter's rules are in [`rules`]; the build compiles
//! them into BPF, so that a VMM only loads them.

mod compiled;
pub mod dispatch;
mod evaluate;
pub mod rules;
pub mod threads;

pub use evaluate::{evaluate, Verdict};

use seccompiler::BpfProgram;

/// Errors building or installing the filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("installing the VMM's seccomp filter failed")]
    Install(#[source] seccompiler::Error),
    #[error("the VMM has no seccomp list for {0}")]
    Compile(String),
    #[error("dropping a VMM thread's capabilities failed")]
    Capabilities(#[source] std::io::Error),
}

/// What `vmm` refuses, for documentation and `mxc-vm backends`.
pub fn describe() -> String {
    let names: Vec<&str> = rules::KILLED
        .iter()
        .chain(rules::MOUNT_CALLS)
        .map(|(_, n)| *n)
        .collect();
    format!(
        "the VMM is killed by: {}, unshare or clone into new namespaces, a signal to \
         another process; each VMM thread \
         may make only its kind's calls (vCPU: KVM ioctls and eventfds, no files or \
         sockets; device loop: epoll and Unix sockets; fs worker: file calls, no sockets \
         or ioctls), others answer EPERM",
        names.join(", ")
    )
}

/// The compiled filter, for this process.
pub fn filter() -> BpfProgram {
    filter_for(std::process::id())
}

/// The compiled filter for the VMM process `pid`: the only process it may signal
/// ([`rules::process_filter`], compiled at build time).
pub fn filter_for(pid: u32) -> BpfProgram {
    compiled::process(pid)
}

/// `clone3` answers ENOSYS: its flags are in memory, where a filter cannot see them, and
/// the C library then falls back to `clone`, which [`filter`] judges.
pub fn clone3_filter() -> BpfProgram {
    compiled::clone3()
}

/// Install the filters on every thread of this process. Sets `no_new_privs` first (which
/// seccomp needs without CAP_SYS_ADMIN; the VMM never executes anything anyway).
pub fn install() -> Result<(), SeccompError> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes plain integers and affects only us.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    for prog in [clone3_filter(), filter()] {
        seccompiler::apply_filter_all_threads(&prog).map_err(SeccompError::Install)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Fork, install the filter in the child, run `call` there, and return how the child
    /// ended: `Ok(exit code)` or `Err(signal)`.
    fn in_filtered_child(call: fn() -> i32) -> Result<i32, i32> {
        in_child_with(&[clone3_filter(), filter()], call)
    }

    /// Fork, install `progs` in the child, run `call` there, and return how the child
    /// ended: `Ok(exit code)` or `Err(signal)`.
    pub(crate) fn in_child_with(progs: &[BpfProgram], call: fn() -> i32) -> Result<i32, i32> {
        // SAFETY: the child only calls async-signal-safe functions (prctl, seccomp via
        // the prebuilt program, the test's call, _exit) before it exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: see above; _exit never returns.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                let code = if progs.iter().all(|p| seccompiler::apply_filter(p).is_ok()) {
                    call()
                } else {
                    99
                };
                libc::_exit(code);
            }
        }
        let mut status = 0;
        // SAFETY: waitpid writes into our integer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if libc::WIFSIGNALED(status) {
            Err(libc::WTERMSIG(status))
        } else {
            Ok(libc::WEXITSTATUS(status))
        }
    }

    #[test]
    fn a_forbidden_call_kills_the_process_and_ordinary_ones_pass() {
        let exec = in_filtered_child(|| {
            let path = c"/bin/true".as_ptr();
            let argv = [path, std::ptr::null()];
            // SAFETY: valid NUL-terminated strings and a NULL-terminated argv.
            unsafe { libc::execve(path, argv.as_ptr(), std::ptr::null()) };
            7
        });
        let new_ns = in_filtered_child(|| {
            // SAFETY: unshare takes flags only.
            unsafe { libc::unshare(libc::CLONE_NEWNS) };
            7
        });
        // Every namespace, the time namespace (CLONE_NEWTIME, 0x80) too: the filter
        // left it out until the process tiers' list of flags became this one.
        let new_time_ns = in_filtered_child(|| {
            // SAFETY: unshare takes flags only.
            unsafe { libc::unshare(0x80) };
            7
        });
        // Every call of the mount API, the new ones too (mount_setattr could make a
        // read-only mount of the jail writable, fspick and fsconfig reconfigure a file
        // system under it): they were missing until the process tiers' list became this.
        let mount_calls = [
            in_filtered_child(|| {
                // SAFETY: invalid arguments: the call reads nothing and fails.
                unsafe { libc::syscall(libc::SYS_mount_setattr, -1, 0, 0, 0, 0) };
                7
            }),
            in_filtered_child(|| {
                // SAFETY: invalid arguments: the call reads nothing and fails.
                unsafe { libc::syscall(libc::SYS_fspick, -1, 0, 0) };
                7
            }),
            in_filtered_child(|| {
                // SAFETY: invalid arguments: the call reads nothing and fails.
                unsafe { libc::syscall(libc::SYS_fsconfig, -1, 0, 0, 0, 0) };
                7
            }),
        ];
        let ordinary = in_filtered_child(|| {
            // SAFETY: getpid and unshare(CLONE_FS) have no memory effects.
            let fs = unsafe {
                libc::getpid();
                libc::unshare(libc::CLONE_FS)
            };
            if fs == 0 {
                0
            } else {
                8
            }
        });

        assert_eq!(exec, Err(libc::SIGSYS));
        assert_eq!(new_ns, Err(libc::SIGSYS));
        assert_eq!(new_time_ns, Err(libc::SIGSYS));
        assert_eq!(mount_calls, [Err(libc::SIGSYS); 3]);
        assert_eq!(ordinary, Ok(0));
    }
    /// Run as root, a VMM taken over by its guest could signal any process of the host
    /// (`kill(-1, SIGKILL)` ends them all): every way to signal another process kills the
    /// VMM, while signals to its own threads (how it kicks a vCPU) pass.
    #[test]
    fn a_signal_to_another_process_kills_the_vmm_and_its_own_threads_still_get_theirs() {
        // Signal 0 checks without sending: harmless to pid 1 if the filter let it through.
        let kill = in_filtered_child(|| {
            // SAFETY: kill with signal 0 sends nothing.
            unsafe { libc::kill(1, 0) };
            7
        });
        let tgkill = in_filtered_child(|| {
            // SAFETY: tgkill with signal 0 sends nothing.
            unsafe { libc::syscall(libc::SYS_tgkill, 1, 1, 0) };
            7
        });
        let tkill = in_filtered_child(|| {
            // SAFETY: tkill with signal 0 sends nothing.
            unsafe { libc::syscall(libc::SYS_tkill, 1, 0) };
            7
        });
        let pidfd = in_filtered_child(|| {
            // SAFETY: pidfd_open takes integers; a descriptor it returned is not used.
            unsafe { libc::syscall(libc::SYS_pidfd_open, 1, 0) };
            7
        });
        // The child builds its filter itself, for its own pid, and signals itself.
        let own = in_child_with(&[], || {
            if seccompiler::apply_filter(&filter()).is_err() {
                return 99;
            }
            // SAFETY: tgkill with signal 0 to this very thread sends nothing.
            let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), 0) };
            if rc == 0 {
                0
            } else {
                8
            }
        });

        assert_eq!(kill, Err(libc::SIGSYS));
        assert_eq!(tgkill, Err(libc::SIGSYS));
        assert_eq!(tkill, Err(libc::SIGSYS));
        assert_eq!(pidfd, Err(libc::SIGSYS));
        assert_eq!(own, Ok(0));
    }
}
