//! The credentials a share's worker thread serves with.
//!
//! Linux keeps credentials, capabilities and the umask per thread (the umask once the
//! thread has its own `fs_struct`), and the raw system calls below change only the calling
//! thread (glibc's wrappers would change every thread of the VMM). Each worker calls
//! [`confine_current_thread`] before it serves its first request (a device's worker opens
//! its share's root between steps 1 and 2: [`own_fs_struct`], then [`drop_credentials`]):
//!
//! 1. `unshare(CLONE_FS)`: its own umask and cwd, then `umask(0)` so the modes the guest
//!    asks for are applied as given (the policy layer strips set-ID bits first). The rest
//!    of the VMM keeps its umask.
//! 2. With [`RunAs`] (only possible when the VMM runs as root): supplementary groups set to
//!    the group alone, then real, effective and saved gid and uid switched. Files the guest
//!    creates then belong to that user, and the host checks every access as that user.
//! 3. Every capability set cleared: ambient, inheritable, effective, permitted. The thread
//!    cannot get them back (it never calls `execve`). As root this removes what lets root
//!    ignore file permissions (`CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH`, `CAP_FOWNER`),
//!    change owners (`CAP_CHOWN`), keep set-ID bits (`CAP_FSETID`) and create device nodes
//!    (`CAP_MKNOD`): a uid-0 server without capabilities can only open what the file
//!    modes grant to uid 0 as an ordinary owner. As an ordinary user there is nothing to
//!    drop, and the share is limited to what that user may do anyway.
//!
//! Any failure stops the worker before it serves anything (fail closed).

use std::io;

use serde::{Deserialize, Serialize};

/// Serve a share as this user and group instead of the VMM's own (needs root).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// Give the calling thread its own umask (0) and the fewest credentials it can have.
pub fn confine_current_thread(run_as: Option<RunAs>) -> io::Result<()> {
    own_fs_struct()?;
    drop_credentials(run_as)
}

/// Step 1 alone: the calling thread's own `fs_struct`, umask 0.
pub fn own_fs_struct() -> io::Result<()> {
    // SAFETY: unshare(2) with CLONE_FS only detaches this thread's cwd/root/umask from the
    // rest of the process; it touches no memory.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: umask(2) cannot fail and now affects only this thread's fs_struct.
    unsafe { libc::umask(0) };
    Ok(())
}

/// Steps 2 and 3: the identity of `run_as`, then no capabilities.
pub fn drop_credentials(run_as: Option<RunAs>) -> io::Result<()> {
    if let Some(id) = run_as {
        switch_identity(id)?;
    }
    crate::privileges::drop_all_capabilities()
}

fn switch_identity(id: RunAs) -> io::Result<()> {
    let groups = [id.gid];
    // SAFETY: raw setgroups(2) on this thread only, reading `groups` (one gid_t) which
    // outlives the call.
    check(unsafe { libc::syscall(libc::SYS_setgroups, 1usize, groups.as_ptr()) })?;
    // SAFETY: raw setresgid(2)/setresuid(2) change only this thread's credentials; no
    // memory is involved. The gid goes first: after the uid changes, root's right to change
    // gids is gone.
    check(unsafe { libc::syscall(libc::SYS_setresgid, id.gid, id.gid, id.gid) })?;
    // SAFETY: as above.
    check(unsafe { libc::syscall(libc::SYS_setresuid, id.uid, id.uid, id.uid) })?;
    let (uid, gid) = current_ids()?;
    if uid != id.uid || gid != id.gid {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(())
}

/// The calling thread's effective uid and gid, from the kernel (never cached).
pub fn current_ids() -> io::Result<(u32, u32)> {
    let (mut ruid, mut euid, mut suid) = (0u32, 0u32, 0u32);
    let (mut rgid, mut egid, mut sgid) = (0u32, 0u32, 0u32);
    // SAFETY: getresuid(2)/getresgid(2) write three u32s each into the locals passed by
    // pointer, which live across the calls.
    check(unsafe {
        libc::syscall(
            libc::SYS_getresuid,
            &mut ruid as *mut u32,
            &mut euid as *mut u32,
            &mut suid as *mut u32,
        )
    })?;
    // SAFETY: as above.
    check(unsafe {
        libc::syscall(
            libc::SYS_getresgid,
            &mut rgid as *mut u32,
            &mut egid as *mut u32,
            &mut sgid as *mut u32,
        )
    })?;
    Ok((euid, egid))
}

fn check(ret: libc::c_long) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub use crate::privileges::has_effective_capabilities;

#[cfg(test)]
mod tests {
    use super::*;

    fn in_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().unwrap()
    }

    /// The `Umask:` line of a /proc status file.
    fn umask_in(status: &str) -> String {
        let text = std::fs::read_to_string(status).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .unwrap()
            .trim()
            .to_owned()
    }

    #[test]
    fn a_confined_thread_has_no_capabilities_and_its_own_umask() {
        let process_before = umask_in("/proc/self/status");

        let (caps_left, worker_umask) = in_thread(|| {
            confine_current_thread(None).unwrap();
            (
                has_effective_capabilities().unwrap(),
                umask_in("/proc/thread-self/status"),
            )
        });

        assert!(!caps_left);
        assert_eq!(worker_umask, "0000");
        assert_eq!(umask_in("/proc/self/status"), process_before);
    }

    #[test]
    fn run_as_switches_only_the_worker_thread() {
        // Switching users needs root; this machine's CI runs as root.
        // SAFETY: geteuid(2) has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(root, "this test needs root to switch users");

        let worker_ids = in_thread(|| {
            confine_current_thread(Some(RunAs {
                uid: 4321,
                gid: 4322,
            }))
            .unwrap();
            current_ids().unwrap()
        });

        assert_eq!(worker_ids, (4321, 4322));
        assert_eq!(current_ids().unwrap(), (0, 0));
    }
}
