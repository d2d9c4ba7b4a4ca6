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

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::InitPlan;
use crate::proxy::sys::{recv_fds, send_fds};
use crate::supervise::Status;

/// Inherited descriptor of the control socket in the init and PID 1 (sessions only).
pub(crate) const CTL_FD: i32 = 6;

/// Largest control message.
const MAX_MESSAGE: usize = 256 * 1024;

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
}

/// Send a request (and the exec's descriptors) to PID 1.
pub(crate) fn send(ctl: RawFd, req: &Request, fds: &[RawFd]) -> std::io::Result<()> {
    let data = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    send_fds(ctl, &data, fds)
}

fn write_status(fd: RawFd, status: &Status) {
    let line = status.to_line();
    // SAFETY: writing our own buffer to a descriptor we hold.
    unsafe { libc::write(fd, line.as_ptr().cast(), line.len()) };
}

/// PID 1's loop: run execs as they are asked for until the host closes the control
/// socket. Returns PID 1's exit code.
pub(crate) fn serve(plan: &InitPlan) -> i32 {
    // SAFETY: plain signal-mask and descriptor calls on data we own.
    let signals = unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let mut mask: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut mask);
        libc::sigaddset(&mut mask, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &mask, std::ptr::null_mut());
        libc::signalfd(-1, &mask, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
    };
    if signals < 0 {
        return super::init::fail("session", std::io::Error::last_os_error());
    }
    // SAFETY: the signalfd was just created and is ours.
    let signals = unsafe { OwnedFd::from_raw_fd(signals) };
    // SAFETY: fcntl on the inherited control socket.
    unsafe { libc::fcntl(CTL_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    super::init::report(&Status::Ready);
    let mut running: HashMap<libc::pid_t, OwnedFd> = HashMap::new();
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: CTL_FD,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfd.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return 1;
        }
        if fds[1].revents != 0 {
            reap(&signals, &mut running);
        }
        if fds[0].revents == 0 {
            continue;
        }
        let (n, mut passed) = match recv_fds(CTL_FD, &mut buf) {
            Ok(r) => r,
            Err(_) => continue,
        };
        if n == 0 {
            // The host closed its end: the sandbox ends (everything dies with PID 1).
            return 0;
        }
        match serde_json::from_slice::<Request>(&buf[..n]) {
            Ok(Request::Exec { argv, env, cwd }) if passed.len() == 4 => {
                let err = passed.pop();
                let out = passed.pop();
                let stdin = passed.pop();
                let status = passed.pop();
                if let (Some(status), Some(stdin), Some(out), Some(err)) = (status, stdin, out, err)
                {
                    let exec_plan = InitPlan {
                        argv,
                        env,
                        cwd,
                        ..plan.clone()
                    };
                    if let Some(pid) = spawn(&exec_plan, &signals, [&status, &stdin, &out, &err]) {
                        write_status(status.as_raw_fd(), &Status::Child { pid });
                        running.insert(pid, status);
                    }
                }
            }
            Ok(Request::Kill { pid }) if running.contains_key(&pid) && pid > 1 => {
                // SAFETY: kill() has no memory effects; pid is a command we started.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            // A malformed or unknown request is dropped; its descriptors close with it.
            _ => {}
        }
    }
}

/// Fork the command with the exec's descriptors on 3 (status), 0, 1, 2.
fn spawn(plan: &InitPlan, signals: &OwnedFd, fds: [&OwnedFd; 4]) -> Option<libc::pid_t> {
    let [status, stdin, out, err] = fds.map(AsRawFd::as_raw_fd);
    // SAFETY: fork in PID 1, which is single-threaded.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        write_status(
            status,
            &Status::Error {
                stage: "fork".into(),
                message: std::io::Error::last_os_error().to_string(),
            },
        );
        return None;
    }
    if pid == 0 {
        // SAFETY: in the child: restore the signal state, put the exec's descriptors in
        // place (dup2 clears close-on-exec; the status pipe gets it back), close ours.
        unsafe {
            let mut mask: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut mask);
            libc::sigprocmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::close(signals.as_raw_fd());
            libc::close(CTL_FD);
            libc::dup2(stdin, 0);
            libc::dup2(out, 1);
            libc::dup2(err, 2);
            libc::dup2(status, super::STATUS_FD);
            libc::fcntl(super::STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        let code = super::init::command(plan);
        // SAFETY: leave the child without running the parent's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    Some(pid)
}

/// Reap every child that ended; report the commands' ends and kill what is left of
/// their process groups.
fn reap(signals: &OwnedFd, running: &mut HashMap<libc::pid_t, OwnedFd>) {
    let mut info = [0u8; 128];
    // SAFETY: draining the non-blocking signalfd into our buffer.
    while unsafe { libc::read(signals.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) } > 0 {}
    loop {
        let mut wstatus = 0;
        // SAFETY: waitpid writes into our integer.
        let pid = unsafe { libc::waitpid(-1, &mut wstatus, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        let Some(status) = running.remove(&pid) else {
            continue;
        };
        // SAFETY: kill() has no memory effects; the group is the command's own session.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let end = if libc::WIFSIGNALED(wstatus) {
            Status::Signal {
                signal: libc::WTERMSIG(wstatus),
            }
        } else {
            Status::Exit {
                code: libc::WEXITSTATUS(wstatus),
            }
        };
        write_status(status.as_raw_fd(), &end);
    }
}

/// The host's side of a persistent sandbox.
pub(crate) struct Session {
    ctl: OwnedFd,
    init: std::process::Child,
    /// The init's status pipe: kept open so PID 1 never writes into a closed pipe.
    _status: OwnedFd,
    _root: crate::interrupt::Registered,
    /// The proxy handoff, alive as long as the sandbox.
    _handoff: Option<(OwnedFd, crate::proxy::Server)>,
    _cgroup: Option<crate::limits::SandboxCgroup>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("init", &self.init.id())
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
            init,
            _status: status_r,
            _root: root,
            _handoff: handoff,
            _cgroup: cgroup,
        })
    }

    /// The host pid of the sandbox's init (its root: killing it ends the sandbox).
    pub(crate) fn root_pid(&self) -> u32 {
        self.init.id()
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

    /// End the sandbox: PID 1 sees the control socket close and exits, taking every
    /// process of the sandbox with it; the init follows.
    pub(crate) fn stop(self) {
        let Session { ctl, mut init, .. } = self;
        drop(ctl);
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
    }
}

/// Read the init's status lines until PID 1 is ready (or setup failed).
fn wait_ready(status: &OwnedFd, warnings: &mut Vec<String>) -> Result<(), crate::SandboxError> {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    let mut pending: Vec<u8> = Vec::new();
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
        pending.extend_from_slice(&buf[..n as usize]);
        while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            match crate::supervise::parse_status(&line) {
                Some(Status::Ready) => return Ok(()),
                Some(Status::Error { stage, message }) => {
                    return Err(crate::SandboxError::Setup { stage, message })
                }
                Some(Status::Warning { message }) => warnings.push(message),
                _ => {}
            }
        }
        if pending.len() > 64 * 1024 {
            pending.clear();
        }
    }
}
