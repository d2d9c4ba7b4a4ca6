//! Signals for a running exec from another thread: what a service's "signal this exec"
//! request goes through.
//!
//! The caller puts an [`ExecSignals`] in the exec's [`crate::ExecIo`] and keeps a clone.
//! The backend attaches a deliverer once the command runs (the process tiers when the
//! sandbox reports the command's pid, the microVM once its agent connection is open) and
//! ends the handle when the exec returns. [`ExecSignals::send`] waits a little for the
//! command to start, so a signal sent right after the exec was accepted is not lost, and
//! answers why a signal cannot be delivered: the exec ended, it never started, or the
//! tier cannot deliver that signal (the one-shot tiers deliver only SIGKILL, which ends
//! the exec's own sandbox).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Delivers one signal number to the running command (its process group). It runs with
/// the handle's lock held, so [`ExecSignals::end`] (called before the exec is reaped)
/// waits for it: a deliverer that signals a host pid cannot reach a reused one. It must
/// not wait: a command not running yet answers [`Delivered::NotYet`], and
/// [`ExecSignals::send`] tries again without the lock.
pub type Deliver = Box<dyn FnMut(i32) -> Result<Delivered, String> + Send>;

/// What a [`Deliver`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// The signal was sent.
    Yes,
    /// The command has not started yet (the microVM agent has the exec but not yet its
    /// process): ask again shortly.
    NotYet,
}

/// How long [`ExecSignals::send`] keeps asking a deliverer that answers
/// [`Delivered::NotYet`], and how often.
const NOT_YET_FOR: Duration = Duration::from_secs(1);
const NOT_YET_EVERY: Duration = Duration::from_millis(2);

/// Why a signal was not delivered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignalError {
    #[error("{0} is not a signal number (1..=64)")]
    NotASignal(i32),
    #[error("the exec has ended")]
    Ended,
    #[error("the exec's command did not start within {0:?}")]
    NotStarted(Duration),
    #[error("the signal could not be delivered: {0}")]
    Refused(String),
}

#[derive(Default)]
struct State {
    deliver: Option<Deliver>,
    ended: bool,
}

/// A shareable handle through which other threads signal one exec.
#[derive(Clone, Default)]
pub struct ExecSignals {
    inner: Arc<(Mutex<State>, Condvar)>,
}

impl std::fmt::Debug for ExecSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state();
        f.debug_struct("ExecSignals")
            .field("attached", &state.deliver.is_some())
            .field("ended", &state.ended)
            .finish()
    }
}

impl ExecSignals {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Send `signo` to the exec's command and its process group, waiting up to
    /// `patience` for the command to start.
    pub fn send(&self, signo: i32, patience: Duration) -> Result<(), SignalError> {
        if !(1..=64).contains(&signo) {
            return Err(SignalError::NotASignal(signo));
        }
        let deadline = Instant::now() + patience;
        let mut not_yet_until = None;
        let mut state = self.state();
        loop {
            if state.ended {
                return Err(SignalError::Ended);
            }
            let wait = if let Some(deliver) = state.deliver.as_mut() {
                match deliver(signo).map_err(SignalError::Refused)? {
                    Delivered::Yes => return Ok(()),
                    Delivered::NotYet => {
                        let until = *not_yet_until.get_or_insert(Instant::now() + NOT_YET_FOR);
                        if Instant::now() >= until {
                            return Err(SignalError::Refused("the command is not running".into()));
                        }
                        NOT_YET_EVERY
                    }
                }
            } else {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(SignalError::NotStarted(patience));
                }
                left
            };
            // The lock is released while waiting: the exec may end meanwhile.
            state = self
                .inner
                .1
                .wait_timeout(state, wait)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// The command runs: signals go to `deliver` until [`Self::end`].
    pub fn attach(&self, deliver: Deliver) {
        let mut state = self.state();
        if !state.ended {
            state.deliver = Some(deliver);
        }
        self.inner.1.notify_all();
    }

    /// The exec is over (or never started): later signals answer [`SignalError::Ended`].
    pub fn end(&self) {
        let mut state = self.state();
        state.ended = true;
        state.deliver = None;
        self.inner.1.notify_all();
    }

    /// Whether [`Self::end`] was called.
    pub fn ended(&self) -> bool {
        self.state().ended
    }
}

/// A signal's number from its name (`TERM`, `SIGTERM`, case-insensitive) or its number.
pub fn parse_signal(text: &str) -> Option<i32> {
    if let Ok(n) = text.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let n = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ABRT" => libc::SIGABRT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "WINCH" => libc::SIGWINCH,
        _ => return None,
    };
    Some(n)
}

/// The deliverer of a one-shot sandbox whose PID 1 has host pid `init`: SIGKILL ends the
/// exec's whole sandbox (its PID namespace dies with its PID 1); no other signal can
/// reach the command through a namespace's init, so those are refused.
pub(crate) fn kill_only(init: i32) -> Deliver {
    Box::new(move |signo| {
        if signo != libc::SIGKILL {
            return Err(
                "this tier makes a fresh sandbox per exec and can only end it (SIGKILL); \
                 use a persistent process or microVM sandbox for other signals"
                    .into(),
            );
        }
        // SAFETY: kill() has no memory effects; `init` is the exec's sandbox PID 1 as
        // the sandbox reported it, and the handle is ended before the exec is reaped.
        if unsafe { libc::kill(init, libc::SIGKILL) } < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(Delivered::Yes)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_waits_for_the_command_and_ends_with_the_exec() {
        let signals = ExecSignals::new();
        assert_eq!(
            signals.send(0, Duration::ZERO),
            Err(SignalError::NotASignal(0))
        );
        assert_eq!(
            signals.send(65, Duration::ZERO),
            Err(SignalError::NotASignal(65))
        );
        assert_eq!(
            signals.send(15, Duration::from_millis(10)),
            Err(SignalError::NotStarted(Duration::from_millis(10)))
        );
        let got = Arc::new(Mutex::new(Vec::new()));
        let sender = {
            let signals = signals.clone();
            std::thread::spawn(move || signals.send(15, Duration::from_secs(30)))
        };
        std::thread::sleep(Duration::from_millis(50));
        let seen = Arc::clone(&got);
        signals.attach(Box::new(move |n| {
            seen.lock().unwrap().push(n);
            if n == 10 {
                Err("no".into())
            } else {
                Ok(Delivered::Yes)
            }
        }));
        assert_eq!(sender.join().unwrap(), Ok(()));
        assert_eq!(
            signals.send(10, Duration::ZERO),
            Err(SignalError::Refused("no".into()))
        );
        assert_eq!(*got.lock().unwrap(), vec![15, 10]);
        signals.end();
        assert_eq!(signals.send(15, Duration::ZERO), Err(SignalError::Ended));
        // Attaching after the end changes nothing.
        signals.attach(Box::new(|_| Ok(Delivered::Yes)));
        assert_eq!(signals.send(15, Duration::ZERO), Err(SignalError::Ended));
    }

    /// A deliverer whose command has not started is asked again without the lock held:
    /// the exec can end meanwhile, which ends the wait at once.
    #[test]
    fn a_command_not_yet_running_is_asked_again_and_the_exec_may_end_meanwhile() {
        let signals = ExecSignals::new();
        let asked = Arc::new(Mutex::new(0));
        let count = Arc::clone(&asked);
        signals.attach(Box::new(move |_| {
            let mut n = count.lock().unwrap();
            *n += 1;
            Ok(if *n < 3 {
                Delivered::NotYet
            } else {
                Delivered::Yes
            })
        }));
        assert_eq!(signals.send(15, Duration::ZERO), Ok(()));
        assert_eq!(*asked.lock().unwrap(), 3);

        signals.attach(Box::new(|_| Ok(Delivered::NotYet)));
        let sender = {
            let signals = signals.clone();
            std::thread::spawn(move || signals.send(15, Duration::ZERO))
        };
        std::thread::sleep(Duration::from_millis(20));
        let ending = Instant::now();
        signals.end();
        assert_eq!(sender.join().unwrap(), Err(SignalError::Ended));
        assert!(ending.elapsed() < NOT_YET_FOR, "{:?}", ending.elapsed());

        let never = ExecSignals::new();
        never.attach(Box::new(|_| Ok(Delivered::NotYet)));
        assert_eq!(
            never.send(15, Duration::ZERO),
            Err(SignalError::Refused("the command is not running".into()))
        );
    }

    #[test]
    fn signal_names_and_numbers() {
        assert_eq!(parse_signal("TERM"), Some(libc::SIGTERM));
        assert_eq!(parse_signal("sigkill"), Some(libc::SIGKILL));
        assert_eq!(parse_signal("2"), Some(2));
        for bad in ["0", "65", "-9", "SIGFOO", "", "SIG"] {
            assert_eq!(parse_signal(bad), None, "{bad}");
        }
    }

    #[test]
    fn one_shot_tiers_deliver_only_sigkill() {
        let mut deliver = kill_only(i32::MAX);
        assert!(deliver(libc::SIGTERM).unwrap_err().contains("SIGKILL"));
    }
}
