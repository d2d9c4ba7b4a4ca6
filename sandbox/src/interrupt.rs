//! SIGTERM, SIGINT and SIGHUP while a sandbox runs: what `timeout`, a service manager, a
//! CI runner or Ctrl-C sends to `mxc-vm`.
//!
//! [`install`] sets a handler that records the first such signal and SIGKILLs the
//! processes registered with [`Registered`] (a sandbox's init, bubblewrap, the VMM): each
//! is the root of its sandbox, so the sandbox dies with it. The supervisor then sees its
//! pipes close and returns, and the ordinary stop and deprovision steps remove everything
//! (runtime directory, network namespace, proxy). The caller asks [`taken`] and exits
//! 128+N. The lifecycle checks [`check`] between steps, so a signal that arrives while
//! nothing is registered (provisioning, the boot wait) stops the run at the next step.
//!
//! A signal that was ignored when `mxc-vm` started stays ignored: `nohup` ignores SIGHUP,
//! and a script's background job (`mxc-vm run ... &`) has SIGINT ignored, so that a
//! hangup or a Ctrl-C meant for the terminal's foreground job does not stop it.
//!
//! The handler runs once (`SA_RESETHAND`): a second signal has its default effect, so a
//! user who presses Ctrl-C twice is never kept waiting. It does only async-signal-safe
//! work: atomics, `getpid`, `kill`, `raise`, `sigaction`. No thread is started, so the
//! process tier's single-threaded fork path stays available.

use std::sync::atomic::{AtomicI32, Ordering};

/// The signals handled.
pub const SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// The first signal received, 0 while none.
static TAKEN: AtomicI32 = AtomicI32::new(0);
/// The pid of the process that installed the handler (a forked child is not it).
static OWNER: AtomicI32 = AtomicI32::new(0);
/// Processes to SIGKILL on a signal; 0 is a free slot.
static ROOTS: [AtomicI32; 256] = [const { AtomicI32::new(0) }; 256];

extern "C" fn on_signal(sig: libc::c_int) {
    // SAFETY: getpid() is async-signal-safe and has no preconditions.
    let me = unsafe { libc::getpid() };
    if me != OWNER.load(Ordering::SeqCst) {
        // A child forked before its exec inherited the handler: give it the default
        // action, as if the handler had never been installed.
        // SAFETY: signal() and raise() are async-signal-safe.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return;
    }
    let _ = TAKEN.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    for slot in &ROOTS {
        let pid = slot.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill() is async-signal-safe; the pid is a live child of ours that
            // its owner registered and unregisters only after reaping it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Install the handler for [`SIGNALS`] in this process (call once, early in `main`), but
/// not for one this process inherited as ignored.
pub fn install() -> std::io::Result<()> {
    // SAFETY: getpid() has no preconditions.
    OWNER.store(unsafe { libc::getpid() }, Ordering::SeqCst);
    for sig in SIGNALS {
        if inherited_ignored(sig)? {
            continue;
        }
        // SAFETY: a zeroed sigaction is a valid starting point; the handler is an
        // extern "C" fn that only does async-signal-safe work. No SA_RESTART: a blocking
        // wait of the supervisor returns EINTR and looks at the sandbox again.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESETHAND;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether `sig` is ignored in this process now (before [`install`]: as inherited).
fn inherited_ignored(sig: i32) -> std::io::Result<bool> {
    // SAFETY: a zeroed sigaction is valid to be written into; a null new action only
    // reads the current one.
    let (rc, current) = unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        let rc = libc::sigaction(sig, std::ptr::null(), &mut current);
        (rc, current)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(current.sa_sigaction == libc::SIG_IGN)
}

/// The first signal received since [`install`], if any.
pub fn taken() -> Option<i32> {
    match TAKEN.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// `Err(Interrupted)` once a signal was received.
pub fn check() -> Result<(), crate::SandboxError> {
    match taken() {
        Some(signal) => Err(crate::SandboxError::Interrupted { signal }),
        None => Ok(()),
    }
}

/// The name of a handled signal, for messages.
pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// A process that a signal kills (the root of a sandbox), for as long as this lives.
/// Drop it after the process was reaped. If a signal came before registration, the
/// process is killed at once.
#[derive(Debug)]
pub struct Registered {
    slot: Option<usize>,
}

impl Registered {
    pub fn new(pid: i32) -> Self {
        let slot = (pid > 0)
            .then(|| {
                ROOTS.iter().position(|s| {
                    s.compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                })
            })
            .flatten();
        if taken().is_some() {
            // SAFETY: kill() has no memory effects; the pid is the caller's child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        Self { slot }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.and_then(|i| ROOTS.get(i)) {
            slot.store(0, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_takes_a_slot_and_gives_it_back() {
        let before = ROOTS
            .iter()
            .filter(|s| s.load(Ordering::SeqCst) != 0)
            .count();

        let reg = Registered::new(i32::MAX);
        let during = ROOTS
            .iter()
            .filter(|s| s.load(Ordering::SeqCst) == i32::MAX)
            .count();
        drop(reg);
        let after = ROOTS
            .iter()
            .filter(|s| s.load(Ordering::SeqCst) != 0)
            .count();

        assert_eq!(during, 1);
        assert_eq!(before, after);
    }

    #[test]
    fn names() {
        assert_eq!(name(libc::SIGTERM), "SIGTERM");
        assert_eq!(name(libc::SIGHUP), "SIGHUP");
    }
}
