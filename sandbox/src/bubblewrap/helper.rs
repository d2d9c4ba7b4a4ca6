//! The exec helper bubblewrap runs in front of every command: this binary, bound
//! read-only into the sandbox at [`super::HELPER_PATH`] and started as
//! `__bwrap-exec PLAN -- CMD...` inside bwrap's namespaces, after bwrap has installed the
//! seccomp filters and set no_new_privs. It does the part of a sandbox's setup that bwrap
//! cannot:
//! 1. with a proxied network, binds the proxy port in the sandbox's network namespace and
//!    hands the listener to the host proxy ([`crate::proxy::handoff`]);
//! 2. restricts itself with Landlock, exactly as the native tier's command does (the
//!    view's read-only, read-write and private trees; no FIFOs or Unix sockets made in a
//!    read-write grant);
//! 3. execs the command (PATH search), which inherits all of it.
//!
//! A failure is a line on stderr and exit code 125 (126/127 when the command cannot be
//! executed or found): never a command run with less confinement than asked.

use std::ffi::{CString, OsString};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What the helper does before the command; the host writes it as one JSON argument.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HelperPlan {
    /// Bind this port and send the listener over this inherited descriptor.
    pub proxy: Option<(u16, RawFd)>,
    /// Landlock trees (see [`crate::view::SandboxView`]).
    pub ro: Vec<PathBuf>,
    pub rw: Vec<PathBuf>,
    pub private: Vec<PathBuf>,
}

fn fail(msg: String, code: i32) -> i32 {
    eprintln!("mxc-vm: {msg}");
    code
}

/// Runs the helper with the arguments after `__bwrap-exec`; returns only on failure,
/// with the exit code.
pub fn main(args: &[OsString]) -> i32 {
    let (Some(plan), Some(sep)) = (args.first(), args.get(1)) else {
        return fail(
            format!("{}: expected PLAN -- CMD", super::EXEC_HELPER_ARG),
            125,
        );
    };
    let plan: HelperPlan = match serde_json::from_slice(plan.as_bytes()) {
        Ok(p) => p,
        Err(e) => return fail(format!("{}: bad plan: {e}", super::EXEC_HELPER_ARG), 125),
    };
    let Some(command) = args.get(2..).filter(|c| sep == "--" && !c.is_empty()) else {
        return fail(format!("{}: expected -- CMD", super::EXEC_HELPER_ARG), 125);
    };
    if let Some((port, fd)) = plan.proxy {
        if fd < 3 {
            return fail(
                format!("{}: bad descriptor {fd}", super::EXEC_HELPER_ARG),
                125,
            );
        }
        // SAFETY: the descriptor was inherited from bwrap for this purpose only; this
        // process owns it from here on (it closes below, before the command runs).
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Err(e) = crate::proxy::handoff::bind_and_send(port, fd) {
            return fail(format!("cannot set up the sandbox's proxy port: {e}"), 125);
        }
        drop(sock);
    }
    // A partly enforcing kernel is the host's to report (it checked the ABI); here only
    // a failure to restrict at all stops the run.
    if let Err(e) = crate::landlock::restrict(&plan.ro, &plan.rw, &plan.private) {
        return fail(format!("landlock: {}", crate::error_chain(&e)), 125);
    }
    exec(command)
}

fn exec(command: &[OsString]) -> i32 {
    // Nothing but 0, 1 and 2 reaches the command: not what bwrap or mxc-vm inherited
    // (crate::fds).
    if let Err(e) = crate::fds::cloexec_from_3() {
        return fail(format!("cannot close inherited descriptors: {e}"), 125);
    }
    let argv: Vec<CString> = match command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
    {
        Ok(v) => v,
        Err(_) => return fail("an argument contains NUL".into(), 126),
    };
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let Some(&program) = ptrs.first() else {
        return fail("no command".into(), 125);
    };
    // SAFETY: argv is a NUL-terminated array of NUL-terminated strings that outlive the
    // call; execvp only returns on failure.
    unsafe { libc::execvp(program, ptrs.as_ptr()) };
    let e = std::io::Error::last_os_error();
    let code = if e.raw_os_error() == Some(libc::ENOENT) {
        127
    } else {
        126
    };
    let name = command
        .first()
        .map(|c| c.to_string_lossy())
        .unwrap_or_default();
    fail(format!("cannot execute {name}: {e}"), code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_round_trips_and_bad_arguments_are_refused() {
        let plan = HelperPlan {
            proxy: Some((3128, 7)),
            ro: vec!["/usr".into()],
            rw: vec!["/work".into()],
            private: vec!["/tmp".into()],
        };
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<HelperPlan>(&json).unwrap(), plan);

        assert_eq!(main(&[]), 125);
        assert_eq!(main(&["{".into(), "--".into(), "true".into()]), 125);
        assert_eq!(main(&[json.clone().into(), "true".into()]), 125);
        assert_eq!(main(&[json.into(), "--".into()]), 125);
    }
}
