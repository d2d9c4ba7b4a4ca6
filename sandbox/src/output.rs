//! Where a command's input comes from and where its output goes.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};

/// Which output stream a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Stdout,
    Stderr,
}

/// Receives output chunks as they arrive (never buffered to the end).
pub trait OutputSink {
    fn chunk(&mut self, kind: StreamKind, data: &[u8]) -> std::io::Result<()>;
}

/// Writes chunks to this process's own stdout and stderr, flushing each one.
#[derive(Debug, Default)]
pub struct PassThrough;

impl OutputSink for PassThrough {
    fn chunk(&mut self, kind: StreamKind, data: &[u8]) -> std::io::Result<()> {
        match kind {
            StreamKind::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(data)?;
                out.flush()
            }
            StreamKind::Stderr => {
                let mut err = std::io::stderr().lock();
                err.write_all(data)?;
                err.flush()
            }
        }
    }
}

/// Collects output in memory (tests and small library calls).
#[derive(Debug, Default)]
pub struct Collect {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl OutputSink for Collect {
    fn chunk(&mut self, kind: StreamKind, data: &[u8]) -> std::io::Result<()> {
        match kind {
            StreamKind::Stdout => self.stdout.extend_from_slice(data),
            StreamKind::Stderr => self.stderr.extend_from_slice(data),
        }
        Ok(())
    }
}

/// Standard input of the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdinMode {
    /// The command reads this process's stdin.
    Inherit,
    /// The command's stdin is empty.
    Null,
    /// The command reads this descriptor (the read end of a pipe, say), which the caller
    /// keeps open until the exec returns.
    Fd(std::os::fd::RawFd),
}

impl StdinMode {
    /// A `Stdio` for a spawned child: inherited, empty, or a duplicate of the descriptor.
    pub fn stdio(self) -> std::io::Result<std::process::Stdio> {
        Ok(match self {
            StdinMode::Inherit => std::process::Stdio::inherit(),
            StdinMode::Null => std::process::Stdio::null(),
            StdinMode::Fd(fd) => {
                // SAFETY: the caller keeps `fd` open for the exec; we only duplicate it.
                let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                std::process::Stdio::from(borrowed.try_clone_to_owned()?)
            }
        })
    }
}

/// The I/O wiring for one exec.
pub struct ExecIo<'a> {
    pub stdin: StdinMode,
    /// `None`: the command writes straight to this process's stdout/stderr (fastest, keeps
    /// a terminal a terminal). `Some`: chunks are relayed to the sink.
    pub sink: Option<&'a mut dyn OutputSink>,
    /// Most bytes of stdout+stderr passed on; the rest is counted and dropped.
    pub output_limit: Option<u64>,
    /// Signals other threads send to the running command (see [`crate::signals`]).
    pub signals: Option<crate::signals::ExecSignals>,
}

impl std::fmt::Debug for ExecIo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecIo")
            .field("stdin", &self.stdin)
            .field("sink", &self.sink.is_some())
            .field("output_limit", &self.output_limit)
            .field("signals", &self.signals)
            .finish()
    }
}

impl<'a> ExecIo<'a> {
    /// Inherit stdin, relay output to `sink`.
    pub fn to_sink(sink: &'a mut dyn OutputSink) -> Self {
        Self {
            stdin: StdinMode::Inherit,
            sink: Some(sink),
            output_limit: None,
            signals: None,
        }
    }
}

/// Applies an output byte limit in front of a sink.
#[derive(Debug, Default)]
pub(crate) struct Limiter {
    pub(crate) passed: u64,
    pub(crate) truncated: bool,
}

impl Limiter {
    /// The part of `data` that may still pass under `limit`.
    pub(crate) fn admit<'d>(&mut self, limit: Option<u64>, data: &'d [u8]) -> &'d [u8] {
        let Some(limit) = limit else {
            return data;
        };
        let room = limit.saturating_sub(self.passed);
        let take = (data.len() as u64).min(room) as usize;
        if take < data.len() {
            self.truncated = true;
        }
        self.passed += take as u64;
        data.get(..take).unwrap_or_default()
    }
}

/// A pipe, both ends close-on-exec: (read end, write end). For an exec's stdin
/// ([`StdinMode::Fd`]) and the tiers' own status and output pipes.
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_cuts_at_the_limit_and_flags_truncation() {
        let mut l = Limiter::default();
        let first = l.admit(Some(5), b"abc").to_vec();
        let second = l.admit(Some(5), b"defg").to_vec();
        let third = l.admit(Some(5), b"h").to_vec();
        assert_eq!(
            (first, second, third, l.truncated),
            (b"abc".to_vec(), b"de".to_vec(), vec![], true)
        );
    }

    #[test]
    fn limiter_without_limit_passes_everything() {
        let mut l = Limiter::default();
        assert_eq!(l.admit(None, b"abc"), b"abc");
        assert!(!l.truncated);
    }
}
