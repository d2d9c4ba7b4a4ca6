//! Sandbox backends behind one lifecycle trait.
//!
//! Every backend consumes the same resolved [`policy::Policy`] and [`policy::FsView`] and
//! goes through provision → start → exec → stop → deprovision. [`run_once`] composes them
//! for the one-shot `mxc-vm run`.
//!
//! Binaries that use the `process` backend must call [`init_hook`] first thing in `main`:
//! the backend re-executes the current binary (`/proc/self/exe __sandbox-init`) inside the
//! new namespaces to set the sandbox up.

pub mod bubblewrap;
pub mod egress;
pub mod env;
mod fds;
pub mod host;
pub mod interrupt;
mod landlock;
pub mod limits;
pub mod microvm;
pub mod output;
pub mod process;
pub mod proxy;
pub mod seccomp;
pub mod signals;
pub mod stages;
mod supervise;
pub mod view;

use std::path::PathBuf;
use std::time::Duration;

use policy::{Containment, FsView, Policy};

pub use output::{ExecIo, OutputSink, StreamKind};
pub use signals::ExecSignals;

/// Errors from any backend. Messages are short; the caller adds context.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("backend {backend} is not available on this host: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
    #[error("backend {backend} cannot enforce {what}")]
    Unenforceable { backend: &'static str, what: String },
    #[error("the policy has no command to run (give one after `--` or set process.argv/command)")]
    NoCommand,
    /// A setup step failed, as the sandbox reported it (a status line: text).
    #[error("sandbox setup failed at {stage}: {message}")]
    Setup { stage: String, message: String },
    /// A setup step on the host failed with an error, kept as the cause.
    #[error("sandbox setup failed at {stage}")]
    SetupFailed {
        stage: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lifecycle misuse: {0}")]
    Lifecycle(&'static str),
    #[error("stopped by {} before the command finished", interrupt::name(*.signal))]
    Interrupted { signal: i32 },
}

impl SandboxError {
    /// [`SandboxError::SetupFailed`] at `stage`, keeping `source` as the cause.
    pub(crate) fn setup(
        stage: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        SandboxError::SetupFailed {
            stage: stage.into(),
            source: source.into(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        SandboxError::Io {
            context: context.into(),
            source,
        }
    }
}

/// An error and its causes (`source()` chain) on one line, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Everything a backend needs to build a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub policy: Policy,
    pub view: FsView,
    /// Identifier used in names (cgroup, audit log); unique per sandbox.
    pub id: String,
    /// Host-side network options: audit log, resolver, notices of refusals.
    pub net: proxy::NetOptions,
}

/// One command to run inside a started sandbox.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox; `None` = backend default.
    pub cwd: Option<PathBuf>,
    pub timeout: Option<Duration>,
}

impl ExecRequest {
    /// The request the policy itself describes.
    pub fn from_policy(policy: &Policy) -> Result<Self, SandboxError> {
        let command = policy
            .process
            .command
            .as_ref()
            .ok_or(SandboxError::NoCommand)?;
        Ok(Self {
            argv: command.to_argv(),
            env: policy.process.env.clone(),
            cwd: policy.process.cwd.clone(),
            timeout: policy.exec_timeout(),
        })
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Code(i32),
    Signal(i32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    pub exit: ExitKind,
    pub timed_out: bool,
    pub duration: Duration,
    /// Output beyond `limits.output_bytes` was dropped.
    pub output_truncated: bool,
}

impl ExecOutcome {
    /// The exit code `mxc-vm run` returns: the command's code, 128+N for a signal, 124 on
    /// timeout.
    pub fn shell_code(&self) -> i32 {
        if self.timed_out {
            return 124;
        }
        match self.exit {
            ExitKind::Code(c) => c,
            ExitKind::Signal(s) => 128 + s,
        }
    }
}

/// The lifecycle every backend implements.
pub trait Backend: Send {
    /// The backend's name as used on the command line.
    fn name(&self) -> &'static str;
    /// The process whose end ends the whole started sandbox (every exec in it), when the
    /// backend keeps one from `start` to `stop`: SIGKILL to it is how a service ends a
    /// sandbox at once; `stop` then reaps it (it stays the caller's child until then).
    fn root_pid(&self) -> Option<u32> {
        None
    }
    /// Check the host can enforce the spec and prepare everything that does not run code.
    fn provision(&mut self, spec: &SandboxSpec) -> Result<(), SandboxError>;
    /// Bring the sandbox to the point where it can run commands (a VM boots here).
    fn start(&mut self) -> Result<(), SandboxError>;
    /// Run one command to completion, streaming its output through `io`.
    fn exec(&mut self, req: &ExecRequest, io: &mut ExecIo<'_>)
        -> Result<ExecOutcome, SandboxError>;
    /// Stop everything the sandbox runs.
    fn stop(&mut self) -> Result<(), SandboxError>;
    /// Release every host resource (nothing may be left: processes, mounts, files).
    fn deprovision(&mut self) -> Result<(), SandboxError>;
    /// After `start`: a handle that runs commands in this sandbox from any thread, many
    /// at once, when the backend can (a persistent process sandbox, a microVM). Its
    /// execs fail once the sandbox is stopped; `stop` ends those still running.
    fn shared_exec(&self) -> Option<std::sync::Arc<dyn SharedExec>> {
        None
    }
}

/// Runs commands in a started sandbox from many threads at once (see
/// [`Backend::shared_exec`]).
pub trait SharedExec: Send + Sync {
    /// Run one command to completion, streaming its output through `io`.
    fn exec(&self, req: &ExecRequest, io: &mut ExecIo<'_>) -> Result<ExecOutcome, SandboxError>;
}

/// How [`backend_for`] builds a backend.
#[derive(Debug, Default)]
pub struct BackendOptions {
    /// The microVM's kernel, image, console, progress and boot timeout (only the
    /// microVM tier reads them).
    pub microvm: microvm::MicrovmOptions,
    /// One sandbox for every exec (a service's sandboxes): the process tier keeps its
    /// namespaces, root and PID 1 across execs; a microVM always does; bubblewrap makes
    /// a fresh sandbox per exec either way.
    pub persistent: bool,
}

/// Create the backend for a concrete containment choice (not `auto`): the one place a
/// backend is built.
pub fn backend_for(
    containment: Containment,
    options: BackendOptions,
) -> Result<Box<dyn Backend>, SandboxError> {
    match containment {
        Containment::Process if options.persistent => {
            Ok(Box::new(process::ProcessBackend::persistent()))
        }
        Containment::Process => Ok(Box::new(process::ProcessBackend::new())),
        Containment::Bubblewrap => Ok(Box::new(bubblewrap::BubblewrapBackend::new())),
        Containment::Microvm => Ok(Box::new(microvm::MicrovmBackend::new(options.microvm))),
        Containment::Hyperlight => Err(SandboxError::Unavailable {
            backend: "hyperlight",
            reason: "Hyperlight runs guests at CPL0 and needs hardware KVM with a Hyperlight \
                     guest binary; it is not built into this version"
                .into(),
        }),
        Containment::Auto => Err(SandboxError::Lifecycle(
            "`auto` must be resolved with select_backend first",
        )),
    }
}

/// Resolve `auto` to a concrete backend for this host.
pub fn select_backend(choice: Containment) -> Containment {
    if choice != Containment::Auto {
        return choice;
    }
    // Cheap checks only: this runs on every `mxc-vm run`.
    if host::microvm_usable() {
        Containment::Microvm
    } else {
        Containment::Process
    }
}

/// provision → start → exec → stop → deprovision, for one command. Stop and deprovision
/// run even when exec fails, or when a signal ([`interrupt`]) stopped the run.
pub fn run_once(
    backend: &mut dyn Backend,
    spec: &SandboxSpec,
    req: &ExecRequest,
    io: &mut ExecIo<'_>,
) -> Result<ExecOutcome, SandboxError> {
    interrupt::check()?;
    backend.provision(spec)?;
    let result = interrupt::check()
        .and_then(|()| backend.start())
        .and_then(|()| interrupt::check())
        .and_then(|()| backend.exec(req, io));
    let stopped = backend.stop();
    let deprovisioned = backend.deprovision();
    let outcome = result?;
    stopped?;
    deprovisioned?;
    Ok(outcome)
}

/// Must be called first thing in `main` of any binary that uses the process backend.
/// When the binary was re-executed as the sandbox init, this runs it and never returns.
pub fn init_hook() {
    process::init::hook();
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(std::ffi::OsStr::new(microvm::VMM_ARG)) {
        let rest: Vec<std::ffi::OsString> = args.collect();
        std::process::exit(microvm::vmm_main(&rest));
    }
}
