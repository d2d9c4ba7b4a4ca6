//! The native `process` backend: Linux namespaces, a fresh root of read-only binds,
//! Landlock as a second layer, a seccomp filter, no new privileges, and cgroup v2 or
//! rlimit limits.
//!
//! Process tree (host view) of a single-threaded caller (`mxc-vm run`), the fast path:
//! ```text
//! mxc-vm (supervisor)            relays output, enforces the timeout
//!  ├─ (netns helper, briefly)    makes the network and IPC namespaces for PID 1
//!  └─ PID 1 of a new PID ns      cloned into new user/mount/uts namespaces (and the v2
//!      │                         cgroup); enters the cgroup, network and IPC namespaces,
//!      │                         builds the root, mounts /proc, pivots, reaps
//!      └─ the command            Landlock + no_new_privs + seccomp, then execve
//! ```
//! A multi-threaded caller (`mxc-vm serve`) starts `mxc-vm __sandbox-init` instead, a
//! fresh exec of the current binary (see [`crate::init_hook`]) in all of the new
//! namespaces, so that the setup runs in a single-threaded process whatever the
//! caller's threads are doing; it builds the root and forks PID 1.

pub mod init;
mod mounts;
mod session;

use std::ffi::CString;
use std::io::{Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::egress::{net_mode, SandboxNet};
use crate::env::{compose_env, with_proxy_env};
pub use crate::landlock::kernel_abi as landlock_abi;
use crate::limits::{self, Enforcement, Rlimit, SandboxCgroup};
use crate::output::{ExecIo, StdinMode};
use crate::supervise::{self, Killer, Pipes, Status};
use crate::view::{NetMode, SandboxView};
use crate::{Backend, ExecOutcome, ExecRequest, SandboxError, SandboxSpec};

/// `argv[1]` that makes the binary run as the sandbox init.
pub const INIT_ARG: &str = "__sandbox-init";
/// Inherited descriptor of the status pipe in the init.
pub(crate) const STATUS_FD: i32 = 3;
/// Inherited descriptor of the plan (a sealed memfd) in the init.
pub(crate) const PLAN_FD: i32 = 4;
/// Inherited descriptor of the proxy handoff socket in the init (proxied network only).
pub(crate) const NET_FD: i32 = 5;

/// Everything the init needs, serialised into a memfd.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct InitPlan {
    pub view: SandboxView,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub net: NetMode,
    pub rlimits: Vec<Rlimit>,
    /// Report each setup stage's time (see [`crate::stages`]).
    #[serde(default)]
    pub stages: bool,
    /// A persistent sandbox: PID 1 serves execs over the control socket
    /// ([`session`]) instead of running `argv` once.
    #[serde(default)]
    pub session: bool,
}

#[derive(Debug, Default)]
pub struct ProcessBackend {
    spec: Option<SandboxSpec>,
    view: Option<SandboxView>,
    net: Option<NetMode>,
    network: SandboxNet,
    enforcement: Option<Enforcement>,
    started: bool,
    /// Warnings collected while running (Landlock unavailable, …).
    pub warnings: Vec<String>,
    /// One sandbox for all execs (see [`session`]) instead of a fresh one per exec.
    persistent: bool,
    session: Option<std::sync::Arc<session::Session>>,
}

impl ProcessBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// A sandbox that lives from `start` to `stop` and runs every exec inside it: the
    /// namespaces and root are made once, and what an exec leaves in the sandbox's own
    /// `/tmp` the next one sees (what a service's long-lived sandboxes want).
    pub fn persistent() -> Self {
        Self {
            persistent: true,
            ..Self::default()
        }
    }
}

impl Backend for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    fn root_pid(&self) -> Option<u32> {
        self.session.as_ref().map(|s| s.root_pid())
    }

    fn provision(&mut self, spec: &SandboxSpec) -> Result<(), SandboxError> {
        let net = net_mode(&spec.policy, &spec.net);
        let cwd = std::env::current_dir().ok();
        let mut view = SandboxView::build(&spec.view, net, cwd.as_deref());
        crate::stages::mark("host: view built");
        view.refuse_unenforceable(spec, "process")?;
        self.network = SandboxNet::provision(spec, net)?;
        view.limit_tmp(spec.policy.limits.memory_mib);
        self.view = Some(view);
        self.net = Some(net);
        self.enforcement = Some(limits::detect());
        crate::stages::mark("host: limits detected");
        // Compiled here, once: the sandbox's command only loads them.
        crate::seccomp::prepare().map_err(|e| SandboxError::setup("seccomp", e))?;
        self.spec = Some(spec.clone());
        crate::stages::mark("host: provisioned");
        Ok(())
    }

    fn start(&mut self) -> Result<(), SandboxError> {
        let (Some(spec), Some(view), Some(net), Some(enforcement)) =
            (&self.spec, &self.view, self.net, &self.enforcement)
        else {
            return Err(SandboxError::Lifecycle("start before provision"));
        };
        self.network.start()?;
        if self.persistent && self.session.is_none() {
            let cgroup = SandboxCgroup::for_sandbox(enforcement, &spec.id, &spec.policy.limits)
                .map_err(|e| SandboxError::setup("cgroup", e))?;
            let plan = InitPlan {
                view: view.clone(),
                argv: Vec::new(),
                env: Vec::new(),
                cwd: view.default_cwd.clone(),
                net,
                rlimits: limits::rlimits(&spec.policy.limits, enforcement, cgroup.is_some()),
                stages: false,
                session: true,
            };
            let handoff = self.network.begin_exec()?;
            let mut warnings = Vec::new();
            let started = session::Session::start(&plan, cgroup, handoff, &mut warnings);
            self.warnings.extend(warnings);
            self.session = Some(std::sync::Arc::new(started?));
        }
        self.started = true;
        Ok(())
    }

    fn exec(
        &mut self,
        req: &ExecRequest,
        io: &mut ExecIo<'_>,
    ) -> Result<ExecOutcome, SandboxError> {
        let (Some(spec), Some(view), Some(net), Some(enforcement)) =
            (&self.spec, &self.view, self.net, &self.enforcement)
        else {
            return Err(SandboxError::Lifecycle("exec before provision"));
        };
        if !self.started {
            return Err(SandboxError::Lifecycle("exec before start"));
        }
        if req.argv.is_empty() {
            return Err(SandboxError::NoCommand);
        }
        if let Some(session) = &self.session {
            let mut warnings = Vec::new();
            let outcome = session.exec(
                req.argv.clone(),
                with_proxy_env(compose_env(&req.env), net),
                req.cwd.clone().unwrap_or_else(|| view.default_cwd.clone()),
                io,
                req.timeout,
                &mut warnings,
            );
            self.warnings.extend(warnings);
            return outcome;
        }
        let cgroup = SandboxCgroup::for_sandbox(enforcement, &spec.id, &spec.policy.limits)
            .map_err(|e| SandboxError::setup("cgroup", e))?;
        let plan = InitPlan {
            view: view.clone(),
            argv: req.argv.clone(),
            env: with_proxy_env(compose_env(&req.env), net),
            cwd: req.cwd.clone().unwrap_or_else(|| view.default_cwd.clone()),
            net,
            rlimits: limits::rlimits(&spec.policy.limits, enforcement, cgroup.is_some()),
            stages: crate::stages::enabled(),
            session: false,
        };
        crate::stages::mark("host: cgroup, plan");
        let handoff = self.network.begin_exec()?;
        let mut warnings = Vec::new();
        let outcome = spawn_and_supervise(
            &plan,
            io,
            req.timeout,
            cgroup.as_ref(),
            handoff.as_ref().map(|(fd, _)| fd),
            &mut warnings,
        );
        // The sandbox is gone: stop accepting (open connections end with `stop`).
        drop(handoff);
        self.warnings.extend(warnings);
        drop(cgroup);
        crate::stages::mark("host: cgroup removed");
        outcome
    }

    fn stop(&mut self) -> Result<(), SandboxError> {
        // A persistent sandbox ends here; a one-shot exec's process tree is gone when
        // exec returns (its PID namespace dies with its PID 1). What remains are proxied
        // connections still closing.
        if let Some(session) = self.session.take() {
            session.stop();
        }
        self.network.stop();
        self.started = false;
        Ok(())
    }

    fn deprovision(&mut self) -> Result<(), SandboxError> {
        if let Some(session) = self.session.take() {
            session.stop();
        }
        self.network.stop();
        self.network = SandboxNet::default();
        self.spec = None;
        self.view = None;
        Ok(())
    }

    fn shared_exec(&self) -> Option<std::sync::Arc<dyn crate::SharedExec>> {
        let (Some(session), Some(view), Some(net)) = (&self.session, &self.view, self.net) else {
            return None;
        };
        Some(std::sync::Arc::new(SessionExec {
            session: std::sync::Arc::clone(session),
            net,
            default_cwd: view.default_cwd.clone(),
        }))
    }
}

/// A persistent sandbox's execs from many threads: each asks PID 1 for its own command.
struct SessionExec {
    session: std::sync::Arc<session::Session>,
    net: NetMode,
    default_cwd: std::path::PathBuf,
}

impl crate::SharedExec for SessionExec {
    fn exec(&self, req: &ExecRequest, io: &mut ExecIo<'_>) -> Result<ExecOutcome, SandboxError> {
        if req.argv.is_empty() {
            return Err(SandboxError::NoCommand);
        }
        // Status warnings of a shared exec have no backend to collect them; the command's
        // own failures reach its stderr.
        let mut warnings = Vec::new();
        self.session.exec(
            req.argv.clone(),
            with_proxy_env(compose_env(&req.env), self.net),
            req.cwd.clone().unwrap_or_else(|| self.default_cwd.clone()),
            io,
            req.timeout,
            &mut warnings,
        )
    }
}

/// The namespaces every process-tier sandbox gets, the network one included: no tier
/// shares the host's network.
const SANDBOX_NAMESPACES: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWNET;

fn pipe_cloexec() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    crate::output::pipe().map_err(|e| SandboxError::io("pipe", e))
}

fn plan_memfd(plan: &InitPlan) -> Result<OwnedFd, SandboxError> {
    let name = c"mxc-vm-plan";
    // SAFETY: memfd_create reads the NUL-terminated name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(SandboxError::io(
            "memfd_create",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    let bytes = serde_json::to_vec(plan).map_err(|e| SandboxError::setup("plan", e))?;
    file.write_all(&bytes)
        .and_then(|()| file.rewind())
        .map_err(|e| SandboxError::io("writing the sandbox plan", e))?;
    Ok(OwnedFd::from(file))
}

fn spawn_and_supervise(
    plan: &InitPlan,
    io: &mut ExecIo<'_>,
    timeout: Option<std::time::Duration>,
    cgroup: Option<&SandboxCgroup>,
    net_fd: Option<&OwnedFd>,
    warnings: &mut Vec<String>,
) -> Result<ExecOutcome, SandboxError> {
    let (status_r, status_w) = pipe_cloexec()?;
    if single_threaded() {
        return spawn_forked(
            plan, io, timeout, cgroup, net_fd, warnings, status_r, status_w,
        );
    }
    let mut child = spawn_init(
        plan,
        io.stdin
            .stdio()
            .map_err(|e| SandboxError::io("duplicating stdin", e))?,
        io.sink.is_some(),
        cgroup,
        &status_w,
        net_fd,
        None,
    )?;
    let _root = crate::interrupt::Registered::new(child.id() as i32);
    drop(status_w);
    let pipes = Pipes {
        stdout: child.stdout.take().map(OwnedFd::from),
        stderr: child.stderr.take().map(OwnedFd::from),
        status: Some(status_r),
    };
    let mut killer = supervise::ChildKiller::new(&mut child);
    let result = supervise::supervise(
        pipes,
        io,
        timeout,
        &mut killer,
        supervise::parse_status,
        warnings,
    );
    // The init exits right after its PID 1; reap it whatever happened.
    if result.is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
    result
}

/// Start the init by re-executing this binary: in the child, before the exec, it joins
/// the cgroup, enters new namespaces, maps our ids and gets the status pipe, the plan,
/// the proxy handoff socket and (sessions) the control socket on their fixed numbers.
#[allow(clippy::too_many_arguments)]
fn spawn_init(
    plan: &InitPlan,
    stdin: Stdio,
    relay: bool,
    cgroup: Option<&SandboxCgroup>,
    status_w: &OwnedFd,
    net_fd: Option<&OwnedFd>,
    ctl_fd: Option<&OwnedFd>,
) -> Result<Child, SandboxError> {
    let plan_fd = plan_memfd(plan)?;
    // Everything the child needs after fork is prepared here: after fork only
    // async-signal-safe calls are allowed.
    // SAFETY: getuid/getgid/getpid cannot fail and touch no memory.
    let (uid, gid, ppid) = unsafe { (libc::getuid(), libc::getgid(), libc::getpid()) };
    let uid_map = format!("0 {uid} 1");
    let gid_map = format!("0 {gid} 1");
    let join = cgroup.map(open_join_file).transpose()?;
    let join_fd = join.as_ref().map(AsRawFd::as_raw_fd);
    let fds = Inherit {
        status: status_w.as_raw_fd(),
        plan: plan_fd.as_raw_fd(),
        net: net_fd.map_or(-1, |f| f.as_raw_fd()),
        ctl: ctl_fd.map_or(-1, |f| f.as_raw_fd()),
    };
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("mxc-vm-sandbox").arg(INIT_ARG).env_clear();
    cmd.stdin(stdin);
    if relay {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    // SAFETY: the closure only makes async-signal-safe system calls (prctl, unshare,
    // open/write/close, fcntl, dup2) on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            child_setup(
                join_fd,
                Parent::Pid(ppid),
                SANDBOX_NAMESPACES,
                uid_map.as_bytes(),
                gid_map.as_bytes(),
                fds,
                &mut [0; 2],
            )
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| SandboxError::io("starting the sandbox init", e))?;
    drop(plan_fd);
    drop(join);
    Ok(child)
}

/// The cgroup file a freshly forked child writes "0" to, to join (see
/// [`SandboxCgroup::join_file`]), opened here, before the fork.
fn open_join_file(cgroup: &SandboxCgroup) -> Result<OwnedFd, SandboxError> {
    let path = cgroup.join_file();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map(OwnedFd::from)
        .map_err(|e| SandboxError::io("opening the sandbox's cgroup", e))
}

/// The namespaces PID 1 is cloned into on the fast path: all of the sandbox's but two.
/// The cgroup namespace PID 1 enters once it is in the sandbox's cgroup, so that this
/// cgroup is the root of what the sandbox sees. The network namespace (the costliest
/// to make, ~0.4 ms) and the IPC one a helper makes meanwhile, while PID 1 builds the
/// root ([`netns_helper`]); PID 1 enters them before it forks the command, or fails.
const CLONED_NAMESPACES: u64 =
    (SANDBOX_NAMESPACES & !(libc::CLONE_NEWCGROUP | HELPER_NAMESPACES)) as u64;
/// The namespaces the helper makes for PID 1 ([`netns_helper`]): the network one and
/// the IPC one (whose message-queue file system costs about as much as a mount
/// namespace).
const HELPER_NAMESPACES: libc::c_int = libc::CLONE_NEWNET | libc::CLONE_NEWIPC;
/// clone3's flag that starts the child in the cgroup v2 directory `clone_args.cgroup`.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// How the cloned PID 1 gets into the sandbox's cgroup.
enum Join {
    /// No cgroup (rlimits only).
    None,
    /// Started in it by clone3 (cgroup v2): the directory's descriptor.
    CloneInto(OwnedFd),
    /// It writes "0" to this open file (cgroup v1's `tasks`; v2's `cgroup.procs` where
    /// clone3 is refused).
    Write(OwnedFd),
}

/// Clone PID 1 of the sandbox's new PID namespace, in the new user, mount, IPC, UTS
/// and network namespaces: one system call instead of a fork, an `unshare` and a
/// second fork (and, with cgroup v2, none of the global cgroup lock that a write to
/// `cgroup.procs` takes). Like fork, the child goes on from here on a copy of this
/// process (no stack of its own); returns 0 in the child.
///
/// clone3 is refused with ENOSYS by kernels before 5.3 and by container runtimes'
/// seccomp profiles, and CLONE_INTO_CGROUP with EINVAL before 5.7: then plain clone,
/// and a v2 cgroup is joined by its `cgroup.procs` instead.
fn clone_pid_one(cgroup: Option<&SandboxCgroup>, join: &mut Join) -> std::io::Result<libc::pid_t> {
    // SAFETY: zeroed is a valid clone_args (every field an integer).
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = CLONED_NAMESPACES;
    args.exit_signal = libc::SIGCHLD as u64;
    if let Join::CloneInto(dir) = join {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = dir.as_raw_fd() as u64;
    }
    // SAFETY: clone3 reads the struct of the given size; without CLONE_VM and with no
    // stack the child runs on a copy of this (single-threaded) process, as after fork.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if pid >= 0 {
        return Ok(pid as libc::pid_t);
    }
    let err = std::io::Error::last_os_error();
    if !matches!(
        err.raw_os_error(),
        Some(libc::ENOSYS | libc::EINVAL | libc::E2BIG)
    ) {
        return Err(err);
    }
    clone_pid_one_plain(cgroup, join)
}

/// [`clone_pid_one`] where clone3 is refused: clone(2), and a v2 cgroup joined by a
/// write to its `cgroup.procs` (opened here) instead of CLONE_INTO_CGROUP.
fn clone_pid_one_plain(
    cgroup: Option<&SandboxCgroup>,
    join: &mut Join,
) -> std::io::Result<libc::pid_t> {
    if let (Join::CloneInto(_), Some(cgroup)) = (&*join, cgroup) {
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(cgroup.join_file())?;
        *join = Join::Write(OwnedFd::from(procs));
    }
    // SAFETY: as above, through clone(2): flags with the exit signal, no new stack, no
    // thread-id or TLS pointers.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            CLONED_NAMESPACES | libc::SIGCHLD as u64,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(pid as libc::pid_t)
}

/// This process as a pidfd, for the cloned PID 1 to check that it is still there
/// (its PID namespace hides our pid).
fn pidfd_self() -> Result<OwnedFd, SandboxError> {
    // SAFETY: pidfd_open of our own pid; the descriptor it returns is ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if fd < 0 {
        return Err(SandboxError::io(
            "pidfd_open",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a fresh descriptor owned by nobody else (pidfds are close-on-exec).
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether this process has one thread: then the init can run in a plain forked child
/// (no re-exec), since no other thread can hold a lock the child would need.
fn single_threaded() -> bool {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return false;
    };
    // Fields after the command name (which may contain spaces) start with the state,
    // field 3; num_threads is field 20.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(17))
        .and_then(|n| n.parse::<u32>().ok())
        == Some(1)
}

/// Kills and reaps a forked init.
struct PidKiller {
    pid: libc::pid_t,
}

impl Killer for PidKiller {
    fn kill(&mut self, extra_pid: Option<i32>) {
        // SAFETY: kill() has no memory effects; both pids are our own descendants.
        unsafe {
            if let Some(pid) = extra_pid {
                libc::kill(pid, libc::SIGKILL);
            }
            libc::kill(self.pid, libc::SIGKILL);
        }
    }

    /// The sandbox's PID 1 is our own child here, whatever pid the sandbox reported.
    fn deliverer(&self, _pid: i32) -> crate::signals::Deliver {
        crate::signals::kill_only(self.pid)
    }
}

fn wait_pid(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waitpid writes into our integer.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
    {}
}

/// The fast path for single-threaded callers: clone PID 1 of the sandbox straight into
/// its namespaces (and, with cgroup v2, its cgroup), and run the init's work in it
/// without re-executing the binary (which would cost an exec, the dynamic loader and
/// page faults of a large executable) and without a process in between.
#[allow(clippy::too_many_arguments)]
fn spawn_forked(
    plan: &InitPlan,
    io: &mut ExecIo<'_>,
    timeout: Option<std::time::Duration>,
    cgroup: Option<&SandboxCgroup>,
    net_fd: Option<&OwnedFd>,
    warnings: &mut Vec<String>,
    status_r: OwnedFd,
    status_w: OwnedFd,
) -> Result<ExecOutcome, SandboxError> {
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let uid_map = format!("0 {uid} 1");
    let gid_map = format!("0 {gid} 1");
    let mut join = match cgroup {
        None => Join::None,
        Some(c) if c.is_v1() => Join::Write(open_join_file(c)?),
        Some(c) => Join::CloneInto(
            std::fs::File::open(c.path())
                .map(OwnedFd::from)
                .map_err(|e| SandboxError::io("opening the sandbox's cgroup", e))?,
        ),
    };
    let parent = pidfd_self()?;
    let (netns_send, netns_recv) =
        std::os::unix::net::UnixStream::pair().map_err(|e| SandboxError::io("socketpair", e))?;
    let relay = if io.sink.is_some() {
        Some((pipe_cloexec()?, pipe_cloexec()?))
    } else {
        None
    };
    let null = match io.stdin {
        StdinMode::Null => Some(
            std::fs::File::open("/dev/null")
                .map_err(|e| SandboxError::io("opening /dev/null", e))?,
        ),
        StdinMode::Inherit | StdinMode::Fd(_) => None,
    };
    let stdin_fd = match io.stdin {
        StdinMode::Fd(fd) => Some(fd),
        _ => None,
    };
    let status_raw = status_w.as_raw_fd();
    let net_raw = net_fd.map_or(-1, |f| f.as_raw_fd());
    let error_line = Status::Error {
        stage: "namespaces".into(),
        message: "cannot enter new user/mount/pid namespaces".into(),
    }
    .to_line();
    let pid = clone_pid_one(cgroup, &mut join).map_err(|e| {
        SandboxError::io("cloning the sandbox into new user/mount/pid namespaces", e)
    })?;
    if pid == 0 {
        // SAFETY: dup2 onto the standard descriptors of this (child) process, and
        // closing its copy of the cgroup directory (used by clone3 already).
        unsafe {
            if let Some(((_, out_w), (_, err_w))) = &relay {
                libc::dup2(out_w.as_raw_fd(), 1);
                libc::dup2(err_w.as_raw_fd(), 2);
            }
            if let Some(null) = &null {
                libc::dup2(null.as_raw_fd(), 0);
            }
            if let Some(fd) = stdin_fd {
                libc::dup2(fd, 0);
            }
            if let Join::CloneInto(dir) = &join {
                libc::close(dir.as_raw_fd());
            }
            libc::close(netns_send.as_raw_fd());
        }
        let fds = Inherit {
            status: status_raw,
            plan: -1,
            net: net_raw,
            ctl: -1,
        };
        let join_fd = match &join {
            Join::Write(fd) => Some(fd.as_raw_fd()),
            Join::None | Join::CloneInto(_) => None,
        };
        let mut times = [0u64; 2];
        let code = match child_setup(
            join_fd,
            Parent::Pidfd(parent.as_raw_fd()),
            libc::CLONE_NEWCGROUP,
            uid_map.as_bytes(),
            gid_map.as_bytes(),
            fds,
            &mut times,
        ) {
            Ok(()) => {
                init::stage_at(plan, "init: cgroup joined", times[0]);
                init::stage_at(plan, "init: namespaces, id maps", times[1]);
                init::run_as_pid_one(plan, netns_recv.as_raw_fd())
            }
            Err(_) => {
                // SAFETY: writing our own buffer to the status pipe.
                unsafe { libc::write(status_raw, error_line.as_ptr().cast(), error_line.len()) };
                125
            }
        };
        // SAFETY: leave the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    drop(join);
    drop(parent);
    drop(status_w);
    drop(netns_recv);
    let (stdout, stderr) = match relay {
        Some(((out_r, out_w), (err_r, err_w))) => {
            drop(out_w);
            drop(err_w);
            (Some(out_r), Some(err_r))
        }
        None => (None, None),
    };
    // A helper that fails sends nothing: PID 1 reads the end of the socket and fails
    // ("network"), and says so on the status pipe.
    let _ = netns_helper(pid, netns_send.as_raw_fd());
    drop(netns_send);
    let pipes = Pipes {
        stdout,
        stderr,
        status: Some(status_r),
    };
    crate::stages::mark("host: forked");
    let _root = crate::interrupt::Registered::new(pid);
    let mut killer = PidKiller { pid };
    let result = supervise::supervise(
        pipes,
        io,
        timeout,
        &mut killer,
        supervise::parse_status,
        warnings,
    );
    if result.is_err() {
        killer.kill(None);
    }
    wait_pid(pid);
    crate::stages::mark("host: init reaped");
    result
}

/// Run the helper that makes the sandbox's network and IPC namespaces while PID 1
/// (`pid_one`) builds the root: it joins PID 1's user namespace (so the new namespaces
/// are the sandbox's, as if PID 1 had made them), makes them, brings up `lo` and sends
/// both to PID 1 over `sock`. It shares this process's memory and this
/// process waits until it has exited (CLONE_VM | CLONE_VFORK): no page tables to copy
/// and no memory of ours touched while it runs, only its own stack. Returns the
/// helper's exit code (0: sent), None if it could not be started.
fn netns_helper(pid_one: libc::pid_t, sock: RawFd) -> Option<i32> {
    struct Args {
        user_ns: CString,
        sock: RawFd,
    }
    extern "C" fn helper(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` points at the Args below, alive until this process has exited
        // (the parent is suspended meanwhile); only system calls follow, no allocation.
        unsafe {
            let args = &*arg.cast::<Args>();
            let user = libc::open(args.user_ns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if user < 0
                || libc::setns(user, libc::CLONE_NEWUSER) != 0
                || libc::unshare(HELPER_NAMESPACES) != 0
                || init::loopback_up().is_err()
            {
                return 1;
            }
            let flags = libc::O_RDONLY | libc::O_CLOEXEC;
            let net = libc::open(c"/proc/self/ns/net".as_ptr(), flags);
            let ipc = libc::open(c"/proc/self/ns/ipc".as_ptr(), flags);
            if net < 0
                || ipc < 0
                || crate::proxy::sys::send_fds(args.sock, b"n", &[net, ipc]).is_err()
            {
                return 1;
            }
            0
        }
    }
    let args = Args {
        user_ns: CString::new(format!("/proc/{pid_one}/ns/user")).ok()?,
        sock,
    };
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: the helper runs on `stack` (it grows down from its end, 16-byte aligned)
    // with `args`, both alive until it has exited: CLONE_VFORK returns only then.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(stack.len());
        let top = top.sub(top as usize % 16);
        libc::clone(
            helper,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::addr_of!(args).cast_mut().cast(),
        )
    };
    if pid < 0 {
        return None;
    }
    let mut status = 0;
    // SAFETY: waitpid writes into our integer; the helper is our own child.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
    {}
    drop(stack);
    Some(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    })
}

/// Descriptors the init inherits on fixed numbers (`net` is -1 without a proxy).
#[derive(Clone, Copy)]
struct Inherit {
    status: i32,
    plan: i32,
    net: i32,
    /// The session's control socket (-1 for a one-shot run).
    ctl: i32,
}

/// How the child checks, once it has asked to die with its parent, that the parent
/// has not died already.
#[derive(Clone, Copy)]
enum Parent {
    /// Its pid is still our parent's.
    Pid(libc::pid_t),
    /// This pidfd of the parent is not readable yet (a cloned PID 1 cannot see its
    /// parent's pid).
    Pidfd(RawFd),
}

/// Runs in the forked child before exec: join the cgroup (writing "0" to `join`, which
/// it closes), die with the parent, enter the namespaces `flags` names, map our uid/gid
/// to root inside, and put the status pipe, the plan and the proxy handoff socket (when
/// `net_fd` is not -1) on fixed descriptor numbers. `times` gets when the cgroup was
/// joined and when the namespaces were ready.
fn child_setup(
    join: Option<RawFd>,
    parent: Parent,
    flags: libc::c_int,
    uid_map: &[u8],
    gid_map: &[u8],
    fds: Inherit,
    times: &mut [u64; 2],
) -> std::io::Result<()> {
    let Inherit {
        status: status_fd,
        plan: plan_fd,
        net: net_fd,
        ctl: ctl_fd,
    } = fds;
    if let Some(fd) = join {
        // SAFETY: writing two bytes we own to a descriptor we own, then closing it.
        let written = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        let err = std::io::Error::last_os_error();
        // SAFETY: as above.
        unsafe { libc::close(fd) };
        if written != 1 {
            return Err(err);
        }
    }
    times[0] = crate::stages::now_ns();
    // SAFETY: plain system calls; poll reads and writes the one pollfd we own.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let gone = match parent {
            Parent::Pid(pid) => libc::getppid() != pid,
            Parent::Pidfd(fd) => {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ready = libc::poll(&mut pfd, 1, 0);
                libc::close(fd);
                ready != 0
            }
        };
        if gone {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        if libc::unshare(flags) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    write_file(c"/proc/self/setgroups", b"deny")?;
    write_file(c"/proc/self/uid_map", uid_map)?;
    write_file(c"/proc/self/gid_map", gid_map)?;
    times[1] = crate::stages::now_ns();
    // Move the descriptors out of the way first, so placing one cannot clobber another.
    // SAFETY: fcntl/dup2/close on descriptors this process owns.
    unsafe {
        let s = libc::fcntl(status_fd, libc::F_DUPFD_CLOEXEC, 10);
        // No plan descriptor in the fork path: the plan is already in memory.
        let p = if plan_fd >= 0 {
            libc::fcntl(plan_fd, libc::F_DUPFD_CLOEXEC, 10)
        } else {
            0
        };
        let n = if net_fd >= 0 {
            libc::fcntl(net_fd, libc::F_DUPFD_CLOEXEC, 10)
        } else {
            0
        };
        let c = if ctl_fd >= 0 {
            libc::fcntl(ctl_fd, libc::F_DUPFD_CLOEXEC, 10)
        } else {
            0
        };
        if s < 0 || p < 0 || n < 0 || c < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if ctl_fd >= 0 && libc::dup2(c, session::CTL_FD) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::dup2(s, STATUS_FD) < 0 || (plan_fd >= 0 && libc::dup2(p, PLAN_FD) < 0) {
            return Err(std::io::Error::last_os_error());
        }
        if net_fd >= 0 && libc::dup2(n, NET_FD) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::close(s);
        if plan_fd >= 0 {
            libc::close(p);
        }
        if net_fd >= 0 {
            libc::close(n);
        }
        if ctl_fd >= 0 {
            libc::close(c);
        }
    }
    Ok(())
}

/// open + write + close, async-signal-safe.
fn write_file(path: &std::ffi::CStr, data: &[u8]) -> std::io::Result<()> {
    // SAFETY: path is NUL-terminated; data is a valid slice; fd is closed before return.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = libc::write(fd, data.as_ptr().cast(), data.len());
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n != data.len() as isize {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's own directory in a cgroup v2 hierarchy, if one is mounted and
    /// writable (pure v2 at /sys/fs/cgroup, or the unified one of a hybrid host).
    fn own_cgroup2_dir() -> Result<PathBuf, String> {
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
        let mount = mountinfo
            .lines()
            .find_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                (right.split_whitespace().next()? == "cgroup2")
                    .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                    .flatten()
            })
            .ok_or("no cgroup2 file system is mounted")?;
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("this process is in no cgroup v2")?;
        let dir = mount.join(rel.trim_start_matches('/'));
        let probe = dir.join(format!("mxc-vm-probe-{}", std::process::id()));
        std::fs::create_dir(&probe)
            .and_then(|()| std::fs::remove_dir(&probe))
            .map_err(|e| format!("cannot make a cgroup under {}: {e}", dir.display()))?;
        Ok(dir)
    }

    /// The fast path's clone3 starts PID 1 of a new PID namespace inside the sandbox's
    /// v2 cgroup (CLONE_INTO_CGROUP), with no write to `cgroup.procs`.
    #[test]
    fn a_cloned_pid_one_starts_in_its_v2_cgroup() {
        let parent = match own_cgroup2_dir() {
            Ok(dir) => dir,
            Err(why) => {
                eprintln!("SKIPPED a_cloned_pid_one_starts_in_its_v2_cgroup: {why}");
                return;
            }
        };
        let id = format!("{}-clone-test", std::process::id());
        let cgroup =
            SandboxCgroup::create(&parent, &id, &policy::Limits::default()).expect("a test cgroup");
        let expected = format!("0::/mxc-vm-{id}\n");
        let mut join = Join::CloneInto(OwnedFd::from(
            std::fs::File::open(cgroup.path()).expect("open the cgroup"),
        ));

        let pid = clone_pid_one(Some(&cgroup), &mut join).expect("clone3");
        if pid == 0 {
            // The test harness has other threads: only system calls on our own stack.
            let mut buf = [0u8; 4096];
            // SAFETY: open/read/close into our own buffer, getpid and _exit.
            unsafe {
                let fd = libc::open(c"/proc/self/cgroup".as_ptr(), libc::O_RDONLY);
                let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                libc::close(fd);
                let text = &buf[..n.max(0) as usize];
                let in_cgroup = text
                    .windows(expected.len())
                    .any(|w| w == expected.as_bytes());
                let code = match (in_cgroup, libc::getpid()) {
                    (true, 1) => 0,
                    (false, _) => 1,
                    (true, _) => 2,
                };
                libc::_exit(code);
            }
        }
        let mut status = 0;
        // SAFETY: waitpid writes into our integer.
        let reaped = unsafe { libc::waitpid(pid, &mut status, 0) };

        assert_eq!(reaped, pid);
        assert!(
            matches!(join, Join::CloneInto(_)),
            "clone3 fell back to clone"
        );
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "1: not in {expected:?}; 2: not PID 1"
        );
    }

    /// Where clone3 is refused, plain clone starts PID 1 and it joins the v2 cgroup by
    /// the `cgroup.procs` the fallback opened for it.
    #[test]
    fn without_clone3_pid_one_joins_its_v2_cgroup_by_cgroup_procs() {
        let parent = match own_cgroup2_dir() {
            Ok(dir) => dir,
            Err(why) => {
                eprintln!("SKIPPED without_clone3_pid_one_joins_its_v2_cgroup: {why}");
                return;
            }
        };
        let id = format!("{}-clone-fallback-test", std::process::id());
        let cgroup =
            SandboxCgroup::create(&parent, &id, &policy::Limits::default()).expect("a test cgroup");
        let expected = format!("0::/mxc-vm-{id}\n");
        let mut join = Join::CloneInto(OwnedFd::from(
            std::fs::File::open(cgroup.path()).expect("open the cgroup"),
        ));

        let pid = clone_pid_one_plain(Some(&cgroup), &mut join).expect("clone");
        if pid == 0 {
            let fd = match &join {
                Join::Write(fd) => fd.as_raw_fd(),
                // SAFETY: leaving the child.
                _ => unsafe { libc::_exit(3) },
            };
            let mut buf = [0u8; 4096];
            // SAFETY: write/open/read/close into our own buffer, getpid and _exit.
            unsafe {
                let joined = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                let cg = libc::open(c"/proc/self/cgroup".as_ptr(), libc::O_RDONLY);
                let n = libc::read(cg, buf.as_mut_ptr().cast(), buf.len());
                libc::close(cg);
                let text = &buf[..n.max(0) as usize];
                let in_cgroup = text
                    .windows(expected.len())
                    .any(|w| w == expected.as_bytes());
                let code = match (joined && in_cgroup, libc::getpid()) {
                    (true, 1) => 0,
                    (false, _) => 1,
                    (true, _) => 2,
                };
                libc::_exit(code);
            }
        }
        let mut status = 0;
        // SAFETY: waitpid writes into our integer.
        let reaped = unsafe { libc::waitpid(pid, &mut status, 0) };

        assert_eq!(reaped, pid);
        assert!(matches!(join, Join::Write(_)));
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "1: not joined {expected:?}; 2: not PID 1; 3: no cgroup.procs"
        );
    }
}
