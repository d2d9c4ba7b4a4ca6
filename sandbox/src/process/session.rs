//! A process-tier sandbox that lives across many execs (`ProcessBackend::persistent`,
//! what `mxc-vm serve` uses): the namespaces, the root and PID 1 are made once at
//! `start`, and each exec asks PID 1 to fork the command, confined exactly as a one-shot
//! run's command is (rlimits, Landlock, no capabilities, no_new_privs, seccomp). What one
//! exec leaves in the sandbox's own `/tmp` the next one sees, as in any long-lived
//! sandbox; the host's files are reached only through the policy's grants, as always.
//!
//! PID 1 and the host talk over a sequenced-packet socket pair (`CTL_FD` inside): each
//! request is one JSON message; an exec carries four descriptors (its status pipe, stdin,
//! stdout, stderr). PID 1 reports the command's pid and exit on that exec's status pipe,
//! in the same lines a one-shot run's init writes, so the host supervises both alike.
//! When the command exits, PID 1 kills what is left of its process group, so the exec's
//! pipes close. The host closing its end ends PID 1, and with it the PID namespace.
//! This module holds the protocol and the host's side; PID 1's loop is in `init`.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::InitPlan;
use crate::proxy::sys::send_fds;
use crate::supervise::Status;

/// Inherited descriptor of the control socket in the init and PID 1 (sessions only).
pub(crate) const CTL_FD: i32 = 6;

/// Largest control message.
pub(crate) const MAX_MESSAGE: usize = 256 * 1024;

/// What the host asks of PID 1.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Request {
    /// Run a command; the message carries [status, stdin, stdout, stderr].
    Exec {
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: PathBuf,
    },
    /// SIGKILL a running command (its pid as PID 1 reported it) and its process group.
    Kill { pid: i32 },
    /// Send `signo` (1..=64) to a running command's process group.
    Signal { pid: i32, signo: i32 },
}

/// Send a request (and the exec's descriptors) to PID 1.
pub(crate) fn send(ctl: RawFd, req: &Request, fds: &[RawFd]) -> std::io::Result<()> {
    let data = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    send_fds(ctl, &data, fds)
}

/// The host's side of a persistent sandbox.
pub(crate) struct Session {
    ctl: OwnedFd,
    /// The init (reaped by [`Session::stop`]) and its pid.
    init: std::sync::Mutex<std::process::Child>,
    init_pid: u32,
    /// The init's status pipe: kept open so PID 1 never writes into a closed pipe.
    _status: OwnedFd,
    /// Registered for the signal handler until `stop` reaped the init.
    root: std::sync::Mutex<Option<crate::interrupt::Registered>>,
    /// The proxy handoff, alive as long as the sandbox.
    _handoff: Option<(OwnedFd, crate::proxy::Server)>,
    _cgroup: Option<crate::limits::SandboxCgroup>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("init", &self.init_pid)
            .finish_non_exhaustive()
    }
}

/// Kills a session's command through PID 1 (the pid it reported is its own namespace's).
struct SessionKiller<'a> {
    ctl: &'a OwnedFd,
}

impl crate::supervise::Killer for SessionKiller<'_> {
    fn kill(&mut self, extra_pid: Option<i32>) {
        if let Some(pid) = extra_pid {
            let _ = send(self.ctl.as_raw_fd(), &Request::Kill { pid }, &[]);
        }
    }

    /// Signals go to PID 1, which sends them to the command's process group while the
    /// command runs (a pid it no longer runs is ignored there, so a late signal can never
    /// reach another process).
    fn deliverer(&self, pid: i32) -> crate::signals::Deliver {
        let ctl = self.ctl.try_clone();
        Box::new(move |signo| {
            let ctl = ctl.as_ref().map_err(|e| e.to_string())?;
            send(ctl.as_raw_fd(), &Request::Signal { pid, signo }, &[])
                .map(|()| crate::signals::Delivered::Yes)
                .map_err(|e| format!("the sandbox's PID 1 is gone ({e})"))
        })
    }
}

/// How long PID 1 may take to report ready.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Session {
    /// Start the sandbox: the init builds the root, PID 1 reports ready.
    pub(crate) fn start(
        plan: &InitPlan,
        cgroup: Option<crate::limits::SandboxCgroup>,
        handoff: Option<(OwnedFd, crate::proxy::Server)>,
        warnings: &mut Vec<String>,
    ) -> Result<Self, crate::SandboxError> {
        let (status_r, status_w) = super::pipe_cloexec()?;
        let (ctl, ctl_sandbox) = crate::proxy::sys::seqpacket_pair()
            .map_err(|e| crate::SandboxError::io("socketpair", e))?;
        let mut init = super::spawn_init(
            plan,
            std::process::Stdio::null(),
            false,
            cgroup.as_ref(),
            &status_w,
            handoff.as_ref().map(|(fd, _)| fd),
            Some(&ctl_sandbox),
        )?;
        drop(status_w);
        drop(ctl_sandbox);
        let root = crate::interrupt::Registered::new(init.id() as i32);
        if let Err(e) = wait_ready(&status_r, warnings) {
            let _ = init.kill();
            let _ = init.wait();
            return Err(e);
        }
        Ok(Self {
            ctl,
            init_pid: init.id(),
            init: std::sync::Mutex::new(init),
            _status: status_r,
            root: std::sync::Mutex::new(Some(root)),
            _handoff: handoff,
            _cgroup: cgroup,
        })
    }

    /// The host pid of the sandbox's init (its root: killing it ends the sandbox).
    pub(crate) fn root_pid(&self) -> u32 {
        self.init_pid
    }

    /// Run one command in the sandbox.
    pub(crate) fn exec(
        &self,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: PathBuf,
        io: &mut crate::output::ExecIo<'_>,
        timeout: Option<std::time::Duration>,
        warnings: &mut Vec<String>,
    ) -> Result<crate::ExecOutcome, crate::SandboxError> {
        use crate::output::StdinMode;
        let dup = |fd: RawFd, what: &'static str| {
            // SAFETY: the descriptor is open for the duration of the exec; we duplicate it.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
                .try_clone_to_owned()
                .map_err(|e| crate::SandboxError::io(what, e))
        };
        let (status_r, status_w) = super::pipe_cloexec()?;
        let stdin: OwnedFd = match io.stdin {
            StdinMode::Null => std::fs::File::open("/dev/null")
                .map(OwnedFd::from)
                .map_err(|e| crate::SandboxError::io("opening /dev/null", e))?,
            StdinMode::Inherit => dup(0, "duplicating stdin")?,
            StdinMode::Fd(fd) => dup(fd, "duplicating stdin")?,
        };
        let (out_r, out_w, err_r, err_w) = if io.sink.is_some() {
            let (or, ow) = super::pipe_cloexec()?;
            let (er, ew) = super::pipe_cloexec()?;
            (Some(or), ow, Some(er), ew)
        } else {
            (
                None,
                dup(1, "duplicating stdout")?,
                None,
                dup(2, "duplicating stderr")?,
            )
        };
        let request = Request::Exec { argv, env, cwd };
        send(
            self.ctl.as_raw_fd(),
            &request,
            &[
                status_w.as_raw_fd(),
                stdin.as_raw_fd(),
                out_w.as_raw_fd(),
                err_w.as_raw_fd(),
            ],
        )
        .map_err(|e| crate::SandboxError::Setup {
            stage: "session".into(),
            message: format!("the sandbox's PID 1 is gone ({e}); create a new sandbox"),
        })?;
        drop((status_w, stdin, out_w, err_w));
        let pipes = crate::supervise::Pipes {
            stdout: out_r,
            stderr: err_r,
            status: Some(status_r),
        };
        let mut killer = SessionKiller { ctl: &self.ctl };
        crate::supervise::supervise(
            pipes,
            io,
            timeout,
            &mut killer,
            crate::supervise::parse_status,
            warnings,
        )
    }

    /// End the sandbox: PID 1 sees the control socket shut down and exits, taking every
    /// process of the sandbox with it (execs running on other threads see their pipes
    /// close); the init follows.
    pub(crate) fn stop(&self) {
        // SAFETY: shutdown() on our own socket; other threads holding the session only
        // see their sends fail from now on.
        unsafe { libc::shutdown(self.ctl.as_raw_fd(), libc::SHUT_RDWR) };
        let mut init = self
            .init
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match init.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if std::time::Instant::now() >= deadline => {
                    let _ = init.kill();
                    let _ = init.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(std::time::Duration::from_millis(2)),
            }
        }
        // Reaped: its pid may be reused, so the signal handler must forget it.
        drop(
            self.root
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take(),
        );
    }
}

/// Read the init's status lines until PID 1 is ready (or setup failed).
fn wait_ready(status: &OwnedFd, warnings: &mut Vec<String>) -> Result<(), crate::SandboxError> {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    let mut lines = crate::supervise::StatusLines::default();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(crate::SandboxError::Setup {
                stage: "session".into(),
                message: format!("the sandbox was not ready within {READY_TIMEOUT:?}"),
            });
        }
        let mut pfd = libc::pollfd {
            fd: status.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) } <= 0 {
            continue;
        }
        // SAFETY: reading into our buffer from our descriptor.
        let n = unsafe { libc::read(status.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return Err(crate::SandboxError::Setup {
                stage: "session".into(),
                message: "the sandbox's init ended during setup".into(),
            });
        }
        for line in lines.push(buf.get(..n as usize).unwrap_or_default()) {
            match crate::supervise::parse_status(&line) {
                Some(Status::Ready) => return Ok(()),
                Some(Status::Error { stage, message }) => {
                    return Err(crate::SandboxError::Setup { stage, message })
                }
                Some(Status::Warning { message }) => warnings.push(message),
                _ => {}
            }
        }
    }
}
