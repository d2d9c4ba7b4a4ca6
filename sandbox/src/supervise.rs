//! Supervising a sandboxed command from the host: relaying its output, reading the status
//! channel, enforcing the wall-clock timeout.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::output::{ExecIo, Limiter, StreamKind};
use crate::{ExecOutcome, ExitKind, SandboxError};

/// Messages the sandbox's own processes send to the host over the status pipe, one JSON
/// object per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Status {
    /// Host PID of the sandbox's PID 1, so the host can kill the whole tree.
    Child { pid: i32 },
    /// Setup failed; nothing was run.
    Error { stage: String, message: String },
    /// A persistent sandbox's PID 1 is ready for execs.
    Ready,
    /// The command could not be executed (not found, not executable).
    ExecFailed { message: String, code: i32 },
    /// Something the user should know, e.g. Landlock is unavailable.
    Warning { message: String },
    /// The command exited.
    Exit { code: i32 },
    /// The command was killed by a signal.
    Signal { signal: i32 },
    /// A setup stage ended at this `CLOCK_MONOTONIC` time (only when stages are timed,
    /// see [`crate::stages`]).
    Stage { name: String, at_ns: u64 },
}

impl Status {
    /// Serialise as one line.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

/// Splits a status pipe's bytes into lines. Bytes without a newline past 64 KiB are
/// dropped: a hostile sandbox could stream one line forever.
#[derive(Debug, Default)]
pub(crate) struct StatusLines {
    pending: Vec<u8>,
}

impl StatusLines {
    /// Adds `data`; returns the lines it completed, each with its newline.
    pub(crate) fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        self.pending.extend_from_slice(data);
        let mut lines = Vec::new();
        while let Some(pos) = self.pending.iter().position(|b| *b == b'\n') {
            lines.push(self.pending.drain(..=pos).collect());
        }
        if self.pending.len() > 64 * 1024 {
            self.pending.clear();
        }
        lines
    }
}

/// Parse one of our own status lines.
pub(crate) fn parse_status(line: &[u8]) -> Option<Status> {
    serde_json::from_slice(line).ok()
}

/// What the supervisor needs to kill the sandbox.
pub(crate) trait Killer {
    fn kill(&mut self, extra_pid: Option<i32>);
    /// The sandbox reported the pid of its first process (its PID 1).
    fn started(&mut self, _pid: i32) {}
    /// How other threads signal the command once the sandbox reported `pid` (its PID 1
    /// as the host sees it): by default only SIGKILL, which ends the exec's sandbox.
    fn deliverer(&self, pid: i32) -> crate::signals::Deliver {
        crate::signals::kill_only(pid)
    }
}

/// Kills a sandbox through the host's child that runs it (the init, or bwrap), and the
/// pid the sandbox reported when there is one; remembers the sandbox's PID 1.
pub(crate) struct ChildKiller<'a> {
    child: &'a mut std::process::Child,
    /// The sandbox's PID 1 as the sandbox reported it.
    pub init: Option<i32>,
    /// The child is the init of a PID namespace of its own: the pid the sandbox reports
    /// is of that namespace (meaningless here), and killing the child kills everything.
    own_pid_ns: bool,
}

impl<'a> ChildKiller<'a> {
    pub(crate) fn new(child: &'a mut std::process::Child) -> Self {
        Self {
            child,
            init: None,
            own_pid_ns: false,
        }
    }

    /// For a child that is the init of its own PID namespace.
    pub(crate) fn of_pid_ns_init(child: &'a mut std::process::Child) -> Self {
        Self {
            own_pid_ns: true,
            ..Self::new(child)
        }
    }
}

impl Killer for ChildKiller<'_> {
    fn kill(&mut self, extra_pid: Option<i32>) {
        if let Some(pid) = extra_pid.filter(|_| !self.own_pid_ns) {
            // SAFETY: kill() has no memory effects; the pid came from the sandbox's own
            // status report.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
    }

    fn started(&mut self, pid: i32) {
        if !self.own_pid_ns {
            self.init = Some(pid);
        }
    }

    fn deliverer(&self, pid: i32) -> crate::signals::Deliver {
        if self.own_pid_ns {
            // The namespace dies with its init, our child (reaped only after the exec's
            // signals have ended).
            crate::signals::kill_only(self.child.id() as i32)
        } else {
            crate::signals::kill_only(pid)
        }
    }
}

/// The pipes of a running sandboxed command, as seen by the host.
pub(crate) struct Pipes {
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub status: Option<OwnedFd>,
}

/// Relay output and status until every pipe is closed, killing the sandbox at the
/// deadline. Returns the outcome (without duration; the caller fills it).
pub(crate) fn supervise(
    pipes: Pipes,
    io: &mut ExecIo<'_>,
    timeout: Option<Duration>,
    killer: &mut dyn Killer,
    parse: fn(&[u8]) -> Option<Status>,
    warnings: &mut Vec<String>,
) -> Result<ExecOutcome, SandboxError> {
    let result = supervise_pipes(pipes, io, timeout, killer, parse, warnings);
    // Whatever happened, the command is gone (or about to be reaped): no signal may be
    // sent to its pid from here on.
    if let Some(signals) = &io.signals {
        signals.end();
    }
    result
}

fn supervise_pipes(
    mut pipes: Pipes,
    io: &mut ExecIo<'_>,
    timeout: Option<Duration>,
    killer: &mut dyn Killer,
    parse: fn(&[u8]) -> Option<Status>,
    warnings: &mut Vec<String>,
) -> Result<ExecOutcome, SandboxError> {
    let start = Instant::now();
    let deadline = timeout.map(|t| start + t);
    let mut limiter = Limiter::default();
    let mut status_lines = StatusLines::default();
    let mut statuses: Vec<Status> = Vec::new();
    let mut timed_out = false;
    let mut child_pid: Option<i32> = None;
    let mut buf = vec![0u8; 64 * 1024];

    loop {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(3);
        let mut kinds: Vec<u8> = Vec::with_capacity(3);
        for (i, fd) in [&pipes.stdout, &pipes.stderr].into_iter().enumerate() {
            if let Some(fd) = fd {
                fds.push(libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                kinds.push(i as u8);
            }
        }
        if let Some(fd) = &pipes.status {
            fds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            kinds.push(2);
        }
        let wait_ms: i32 = match deadline {
            Some(d) if !timed_out => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    timed_out = true;
                    killer.kill(child_pid);
                    continue;
                }
                left.as_millis().clamp(1, i32::MAX as u128) as i32
            }
            _ => -1,
        };
        // SAFETY: fds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(SandboxError::io("poll on the sandbox's pipes", err));
        }
        let mut status_closed = false;
        for (pfd, kind) in fds.iter().zip(kinds.iter()) {
            if pfd.revents == 0 {
                continue;
            }
            // SAFETY: reading into our own buffer from an fd we own.
            let got = unsafe { libc::read(pfd.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if got < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
            }
            let got = got.max(0) as usize;
            let data = buf.get(..got).unwrap_or_default();
            match kind {
                0 | 1 if got == 0 => {
                    if *kind == 0 {
                        pipes.stdout = None;
                    } else {
                        pipes.stderr = None;
                    }
                }
                0 | 1 => {
                    let stream = if *kind == 0 {
                        StreamKind::Stdout
                    } else {
                        StreamKind::Stderr
                    };
                    let admitted = limiter.admit(io.output_limit, data);
                    if let Some(sink) = io.sink.as_deref_mut() {
                        if !admitted.is_empty() {
                            // A closed consumer (e.g. `| head`) must not kill the
                            // supervisor; the output is simply dropped from here on.
                            let _ = sink.chunk(stream, admitted);
                        }
                    }
                }
                _ if got == 0 => status_closed = true,
                _ => {
                    for line in status_lines.push(data) {
                        if let Some(s) = parse(&line) {
                            if let Status::Stage { name, at_ns } = &s {
                                crate::stages::record(name, *at_ns);
                                continue;
                            }
                            if let Status::Child { pid } = s {
                                child_pid = Some(pid);
                                killer.started(pid);
                                if let Some(signals) = &io.signals {
                                    signals.attach(killer.deliverer(pid));
                                }
                                if timed_out {
                                    killer.kill(child_pid);
                                }
                            }
                            statuses.push(s);
                        }
                    }
                }
            }
        }
        if status_closed {
            pipes.status = None;
        }
        // The status pipe closes when the sandbox's PID 1 is gone, which takes every
        // process of the sandbox with it; the output pipes then close too.
        if pipes.stdout.is_none() && pipes.stderr.is_none() && pipes.status.is_none() {
            break;
        }
    }

    let mut exit = None;
    for s in statuses {
        match s {
            Status::Error { stage, message } if !timed_out => {
                return Err(SandboxError::Setup { stage, message })
            }
            Status::ExecFailed { message, code } => {
                if let Some(sink) = io.sink.as_deref_mut() {
                    let _ = sink.chunk(
                        StreamKind::Stderr,
                        format!("mxc-vm: {message}\n").as_bytes(),
                    );
                } else {
                    warnings.push(message);
                }
                exit = Some(ExitKind::Code(code));
            }
            Status::Warning { message } => warnings.push(message),
            Status::Exit { code } => exit = Some(ExitKind::Code(code)),
            Status::Signal { signal } => exit = Some(ExitKind::Signal(signal)),
            _ => {}
        }
    }
    let exit = match exit {
        Some(e) => e,
        None if timed_out => ExitKind::Signal(libc::SIGKILL),
        None => {
            return Err(SandboxError::Setup {
                stage: "supervise".into(),
                message: "the sandbox ended without reporting an exit status".into(),
            })
        }
    };
    Ok(ExecOutcome {
        exit,
        timed_out,
        duration: start.elapsed(),
        output_truncated: limiter.truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_split_across_reads_and_endless_lines_are_dropped() {
        let mut lines = StatusLines::default();
        assert!(lines.push(b"{\"a\"").is_empty());
        assert_eq!(
            lines.push(b":1}\n{\"b\":2}\n{"),
            vec![b"{\"a\":1}\n".to_vec(), b"{\"b\":2}\n".to_vec()]
        );
        // A line that never ends is dropped once past 64 KiB; the next line is whole.
        assert!(lines.push(&vec![b'x'; 70 * 1024]).is_empty());
        assert_eq!(lines.push(b"ok\n"), vec![b"ok\n".to_vec()]);
    }
}
