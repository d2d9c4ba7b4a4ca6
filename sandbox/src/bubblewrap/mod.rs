//! The `bubblewrap` backend: Debian's `bwrap`, driven by the same [`SandboxView`] and the
//! same seccomp filters as the native backend; our exec helper (`helper`) runs in front
//! of the command inside bwrap for what bwrap cannot do (Landlock, the proxy port).

pub(crate) mod helper;

use std::ffi::{CString, OsString};
use std::io::{Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::egress::{net_mode, SandboxNet};
use crate::env::{compose_env, with_proxy_env};
use crate::limits::{self, Enforcement, SandboxCgroup};
use crate::output::ExecIo;
use crate::supervise::{self, Pipes, Status};
use crate::view::{MountOp, NetMode, SandboxView, SANDBOX_HOSTNAME};
use crate::{Backend, ExecOutcome, ExecRequest, SandboxError, SandboxSpec};

/// Where to find bwrap: `$MXC_VM_BWRAP` or `bwrap` in PATH.
pub fn bwrap_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MXC_VM_BWRAP") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|d| d.join("bwrap"))
        .find(|p| p.is_file())
}

/// `bwrap --version`, or why it cannot be run.
pub fn version() -> Result<String, String> {
    let path = bwrap_path().ok_or("bwrap is not installed (apt-get install bubblewrap)")?;
    let out = Command::new(&path)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!("{} --version failed", path.display()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Where the mxc-vm binary is bound inside the sandbox to run the exec helper.
const HELPER_PATH: &str = "/.mxc-vm-helper";
/// `argv[1]` of the exec helper.
pub(crate) const EXEC_HELPER_ARG: &str = "__bwrap-exec";

#[derive(Debug, Default)]
pub struct BubblewrapBackend {
    spec: Option<SandboxSpec>,
    view: Option<SandboxView>,
    net: Option<NetMode>,
    network: SandboxNet,
    /// The mxc-vm binary, for the exec helper.
    helper: Option<PathBuf>,
    bwrap: Option<PathBuf>,
    enforcement: Option<Enforcement>,
    started: bool,
    pub warnings: Vec<String>,
}

impl BubblewrapBackend {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Descriptors that must stay open in bwrap (seccomp programs, small files).
struct Inherited {
    fds: Vec<OwnedFd>,
}

impl Inherited {
    fn memfd(&mut self, name: &str, data: &[u8]) -> Result<i32, SandboxError> {
        let cname = CString::new(name).unwrap_or_default();
        // SAFETY: memfd_create reads the NUL-terminated name. No CLOEXEC: bwrap reads it.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), 0) };
        if fd < 0 {
            return Err(SandboxError::io(
                "memfd_create",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.write_all(data)
            .and_then(|()| file.rewind())
            .map_err(|e| SandboxError::io("writing a bwrap input", e))?;
        let owned = OwnedFd::from(file);
        let raw = owned.as_raw_fd();
        self.fds.push(owned);
        Ok(raw)
    }
}

/// The exec helper of a bwrap command line: the mxc-vm binary to bind, and the handoff
/// descriptor it sends the proxy listener over (proxied network only).
struct Helper<'a> {
    exe: &'a Path,
    proxy_fd: Option<i32>,
}

/// Translate the view into bwrap arguments.
fn build_args(
    view: &SandboxView,
    net: NetMode,
    req: &ExecRequest,
    inherited: &mut Inherited,
    helper: Helper<'_>,
) -> Result<Vec<OsString>, SandboxError> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&dyn AsRef<std::ffi::OsStr>]| {
        for i in items {
            a.push(i.as_ref().to_os_string());
        }
    };
    push(&[&"--new-session", &"--die-with-parent", &"--unshare-all"]);
    push(&[&"--cap-drop", &"ALL", &"--hostname", &SANDBOX_HOSTNAME]);
    let mut remount_ro: Vec<PathBuf> = Vec::new();
    for op in &view.ops {
        match op {
            MountOp::Bind {
                src, dst, readonly, ..
            } => {
                let flag = if *readonly { "--ro-bind" } else { "--bind" };
                push(&[&flag, src, dst]);
            }
            MountOp::Mask { dst, dir: true } => {
                push(&[&"--perms", &"0000", &"--tmpfs", dst]);
                remount_ro.push(dst.clone());
            }
            MountOp::Mask { dst, dir: false } => push(&[&"--ro-bind", &"/dev/null", dst]),
            MountOp::Symlink { target, dst } => push(&[&"--symlink", target, dst]),
            MountOp::Tmpfs {
                dst,
                mode,
                readonly,
                size,
            } => {
                if *readonly {
                    remount_ro.push(dst.clone());
                }
                let perms = format!("{mode:04o}");
                if let Some(bytes) = size {
                    push(&[&"--size", &bytes.to_string()]);
                }
                push(&[&"--perms", &perms, &"--tmpfs", dst]);
            }
            MountOp::File { dst, contents } => {
                let fd = inherited
                    .memfd("mxc-vm-file", contents.as_bytes())?
                    .to_string();
                push(&[&"--ro-bind-data", &fd, dst]);
            }
            MountOp::Dev => push(&[&"--dev", &"/dev"]),
            MountOp::Proc => {
                // Read-only, as Landlock keeps it on the process tier: a sandbox of root's
                // runs as the host's uid 0, and /proc/sys holds settings of the whole
                // host (kernel.core_pattern among them).
                push(&[&"--proc", &"/proc"]);
                remount_ro.push("/proc".into());
            }
        }
    }
    push(&[&"--ro-bind", &helper.exe, &HELPER_PATH]);
    for dst in &remount_ro {
        push(&[&"--remount-ro", dst]);
    }
    push(&[&"--remount-ro", &"/"]);
    for prog in crate::seccomp::filters().map_err(|e| SandboxError::setup("seccomp", e))? {
        let fd = inherited
            .memfd("mxc-vm-seccomp", &crate::seccomp::to_bytes(&prog))?
            .to_string();
        push(&[&"--add-seccomp-fd", &fd]);
    }
    push(&[&"--clearenv"]);
    for (k, v) in with_proxy_env(compose_env(&req.env), net) {
        push(&[&"--setenv", &k, &v]);
    }
    let cwd = req.cwd.clone().unwrap_or_else(|| view.default_cwd.clone());
    push(&[&"--chdir", &cwd]);
    push(&[&"--"]);
    // The helper opens the proxy port inside bwrap's network namespace, restricts
    // itself with Landlock, then execs the command in its own place.
    let plan = helper::HelperPlan {
        proxy: match (net, helper.proxy_fd) {
            (NetMode::Proxied { port }, Some(fd)) => Some((port, fd)),
            _ => None,
        },
        ro: view.landlock_ro.clone(),
        rw: view.landlock_rw.clone(),
        private: view.landlock_private.clone(),
    };
    let plan = serde_json::to_string(&plan).map_err(|e| SandboxError::setup("helper plan", e))?;
    push(&[&HELPER_PATH, &EXEC_HELPER_ARG, &plan, &"--"]);
    for arg in &req.argv {
        push(&[arg]);
    }
    Ok(a)
}

/// bwrap reports a missing program as a generic failure (exit 1); find it first, the way
/// the sandbox will (PATH from the request's environment, looking only at paths the view
/// binds from the host), so a missing command gets the conventional 127.
fn program_missing(view: &SandboxView, req: &ExecRequest) -> Option<String> {
    let name = req.argv.first()?;
    let visible = |p: &Path| {
        view.ops.iter().any(|op| match op {
            MountOp::Bind { dst, .. } => p.starts_with(dst),
            MountOp::Symlink { dst, .. } => p.starts_with(dst),
            _ => false,
        })
    };
    if name.contains('/') {
        // Relative or absolute paths are left to the sandbox.
        return None;
    }
    let env = compose_env(&req.env);
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or("/usr/bin:/bin", |(_, v)| v.as_str());
    let found = path
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .any(|c| visible(&c) && c.is_file());
    (!found).then(|| format!("{name}: command not found in the sandbox (PATH={path})"))
}

/// bwrap's `--json-status-fd` lines: `{ "child-pid": N }` and `{ "exit-code": N }`.
fn parse_bwrap_status(line: &[u8]) -> Option<Status> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    if let Some(pid) = v.get("child-pid").and_then(|p| p.as_i64()) {
        return Some(Status::Child { pid: pid as i32 });
    }
    let code = v.get("exit-code").and_then(|c| c.as_i64())? as i32;
    if code > 128 && code < 128 + 65 {
        return Some(Status::Signal { signal: code - 128 });
    }
    Some(Status::Exit { code })
}

/// Makes this process the reaper of its orphaned descendants. bwrap's outer process
/// exits as soon as the command's status is known, before its child -- the sandbox's
/// PID 1 -- has exited; that child would otherwise go to the host's init, which may
/// leave it a zombie for a long time.
/// The flag is process-wide: set once.
fn become_subreaper() -> bool {
    static SET: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes a flag and touches no memory.
    *SET.get_or_init(|| unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0 })
}

/// In a child between fork and exec, once its parent-death signal is set: whether the
/// parent already died (before the signal could be set), seen as the end of a pipe
/// whose write end only the parent holds (`w`, the child's copy, is closed here).
/// Only async-signal-safe calls.
fn parent_gone(r: RawFd, w: RawFd) -> bool {
    // SAFETY: closing the child's copy of a descriptor and polling one descriptor.
    unsafe {
        libc::close(w);
        let mut pfd = libc::pollfd {
            fd: r,
            events: libc::POLLIN,
            revents: 0,
        };
        libc::poll(&mut pfd, 1, 0) == 1 && pfd.revents & libc::POLLHUP != 0
    }
}

/// Makes the next process the calling thread starts the init of a new PID namespace,
/// until dropped (the thread's namespace for children is then set back). Needs
/// CAP_SYS_ADMIN: without it there is none, and bwrap's `--die-with-parent` alone ends
/// the sandbox with us (which leaves a window while bwrap sets the sandbox up).
struct OwnPidNs {
    previous: OwnedFd,
}

impl OwnPidNs {
    fn enter() -> Option<Self> {
        let previous = std::fs::File::open("/proc/thread-self/ns/pid_for_children").ok()?;
        // SAFETY: unshare() changes only this thread's namespace for its children.
        if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
            return None;
        }
        Some(Self {
            previous: previous.into(),
        })
    }
}

impl Drop for OwnPidNs {
    fn drop(&mut self) {
        // SAFETY: setns() to the namespace this thread had; allowed (we could unshare,
        // so we hold CAP_SYS_ADMIN, and it is the thread's own active PID namespace).
        // Were it refused, this thread's later children would fail to start (ENOMEM:
        // the new namespace dies with its init) -- an error, never a silent escape.
        unsafe { libc::setns(self.previous.as_raw_fd(), libc::CLONE_NEWPID) };
    }
}

/// Kills and reaps the sandbox's PID 1 once bwrap's outer process is gone (it is then
/// our child, as we are a subreaper): the whole PID namespace ends with it. Nothing is
/// done when it is not our child (bwrap reaped it): its pid may be another process's now.
fn reap_init(init: i32) {
    // SAFETY: a zeroed siginfo_t is a valid out-parameter; waitid with WNOWAIT only
    // asks whether `init` is our child, reaping nothing. Once it says so, `init` stays
    // our child until waitpid reaps it, so kill cannot reach a reused pid.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        if libc::waitid(libc::P_PID, init as libc::id_t, &mut info, flags) != 0 {
            return;
        }
        libc::kill(init, libc::SIGKILL);
        let mut status = 0;
        while libc::waitpid(init, &mut status, 0) < 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
    }
}

impl Backend for BubblewrapBackend {
    fn name(&self) -> &'static str {
        "bubblewrap"
    }

    fn provision(&mut self, spec: &SandboxSpec) -> Result<(), SandboxError> {
        let net = net_mode(&spec.policy, &spec.net);
        self.helper = Some(helper_exe()?);
        if crate::landlock::kernel_abi() < 1 {
            self.warnings.push(
                "Landlock is not available on this kernel; the mount namespace is the only \
                 file-system boundary"
                    .into(),
            );
        }
        let bwrap = bwrap_path().ok_or(SandboxError::Unavailable {
            backend: "bubblewrap",
            reason: "bwrap is not installed (apt-get install bubblewrap)".into(),
        })?;
        let cwd = std::env::current_dir().ok();
        let mut view = SandboxView::build(&spec.view, net, cwd.as_deref());
        view.refuse_unenforceable(spec, "bubblewrap")?;
        self.network = SandboxNet::provision(spec, net)?;
        view.limit_tmp(spec.policy.limits.memory_mib);
        self.view = Some(view);
        self.net = Some(net);
        self.bwrap = Some(bwrap);
        self.enforcement = Some(limits::detect());
        self.spec = Some(spec.clone());
        Ok(())
    }

    fn start(&mut self) -> Result<(), SandboxError> {
        if self.spec.is_none() {
            return Err(SandboxError::Lifecycle("start before provision"));
        }
        self.network.start()?;
        self.started = true;
        Ok(())
    }

    fn exec(
        &mut self,
        req: &ExecRequest,
        io: &mut ExecIo<'_>,
    ) -> Result<ExecOutcome, SandboxError> {
        let (Some(spec), Some(view), Some(net), Some(bwrap), Some(enforcement)) = (
            &self.spec,
            &self.view,
            self.net,
            &self.bwrap,
            &self.enforcement,
        ) else {
            return Err(SandboxError::Lifecycle("exec before provision"));
        };
        if !self.started {
            return Err(SandboxError::Lifecycle("exec before start"));
        }
        if req.argv.is_empty() {
            return Err(SandboxError::NoCommand);
        }
        if let Some(message) = program_missing(view, req) {
            let text = format!("mxc-vm: {message}\n");
            match io.sink.as_deref_mut() {
                Some(sink) => {
                    let _ = sink.chunk(crate::StreamKind::Stderr, text.as_bytes());
                }
                None => {
                    let _ = std::io::stderr().write_all(text.as_bytes());
                }
            }
            return Ok(ExecOutcome {
                exit: crate::ExitKind::Code(127),
                timed_out: false,
                duration: std::time::Duration::ZERO,
                output_truncated: false,
            });
        }
        let cgroup = SandboxCgroup::for_sandbox(enforcement, &spec.id, &spec.policy.limits)
            .map_err(|e| SandboxError::setup("cgroup", e))?;
        let rlimits = limits::rlimits(&spec.policy.limits, enforcement, cgroup.is_some());
        let handoff = self.network.begin_exec()?;
        let net_raw = handoff.as_ref().map_or(-1, |(fd, _)| fd.as_raw_fd());
        let Some(exe) = &self.helper else {
            return Err(SandboxError::Lifecycle("exec before provision"));
        };
        let helper = Helper {
            exe,
            proxy_fd: handoff.as_ref().map(|_| net_raw),
        };
        let mut inherited = Inherited { fds: Vec::new() };
        let mut args = build_args(view, net, req, &mut inherited, helper)?;

        let mut status_fds = [0i32; 2];
        // SAFETY: pipe2 writes two descriptors into our array.
        if unsafe { libc::pipe2(status_fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(SandboxError::io("pipe", std::io::Error::last_os_error()));
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (status_r, status_w) = unsafe {
            (
                OwnedFd::from_raw_fd(status_fds[0]),
                OwnedFd::from_raw_fd(status_fds[1]),
            )
        };
        let status_raw = status_w.as_raw_fd();
        args.insert(0, OsString::from(status_raw.to_string()));
        args.insert(0, OsString::from("--json-status-fd"));

        let procs = cgroup
            .as_ref()
            .map(|c| CString::new(c.join_file().into_os_string().into_encoded_bytes()))
            .transpose()
            .map_err(|_| SandboxError::Lifecycle("cgroup path contains NUL"))?;
        // Our end of the liveness pipe: bwrap's process checks we are still there once
        // its parent-death signal is set (we may have died before it was).
        let (alive_r, alive_w) =
            crate::output::pipe().map_err(|e| SandboxError::io("creating a pipe", e))?;
        let (alive_r_raw, alive_w_raw) = (alive_r.as_raw_fd(), alive_w.as_raw_fd());
        let mut cmd = Command::new(bwrap);
        cmd.args(&args).env_clear();
        cmd.stdin(
            io.stdin
                .stdio()
                .map_err(|e| SandboxError::io("duplicating stdin", e))?,
        );
        if io.sink.is_some() {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        // SAFETY: only async-signal-safe calls (open/write/close, fcntl, setrlimit, prctl).
        unsafe {
            cmd.pre_exec(move || {
                if let Some(p) = &procs {
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
                if libc::fcntl(status_raw, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if net_raw >= 0 && libc::fcntl(net_raw, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for l in &rlimits {
                    let rl = libc::rlimit {
                        rlim_cur: l.value,
                        rlim_max: l.value,
                    };
                    if libc::setrlimit(l.resource as _, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if parent_gone(alive_r_raw, alive_w_raw) {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let reaper = become_subreaper();
        // bwrap's process is the init of a PID namespace of its own where we can make
        // one: when it dies (with us, by its parent-death signal) the kernel kills every
        // process of the sandbox, whatever bwrap's children had set up by then.
        let own_ns = OwnPidNs::enter();
        let spawned = cmd.spawn();
        let own_pid_ns = own_ns.is_some();
        drop(own_ns);
        drop((alive_r, alive_w));
        let mut child =
            spawned.map_err(|e| SandboxError::io(format!("starting {}", bwrap.display()), e))?;
        let root = crate::interrupt::Registered::new(child.id() as i32);
        drop(status_w);
        drop(inherited);
        // bwrap and the helper hold the sandbox end now.
        let server = handoff.map(|(fd, server)| {
            drop(fd);
            server
        });
        let pipes = Pipes {
            stdout: child.stdout.take().map(OwnedFd::from),
            stderr: child.stderr.take().map(OwnedFd::from),
            status: Some(status_r),
        };
        let mut killer = if own_pid_ns {
            supervise::ChildKiller::of_pid_ns_init(&mut child)
        } else {
            supervise::ChildKiller::new(&mut child)
        };
        let result = supervise::supervise(
            pipes,
            io,
            req.timeout,
            &mut killer,
            parse_bwrap_status,
            &mut self.warnings,
        );
        let init = killer.init;
        let waited = child.wait();
        if let (true, Some(init)) = (reaper, init) {
            reap_init(init);
        }
        drop(root);
        // The sandbox is gone: stop accepting (open connections end with `stop`).
        drop(server);
        drop(cgroup);
        match result {
            Err(SandboxError::Setup { stage, .. }) if stage == "supervise" => {
                let code = waited.ok().and_then(|s| s.code()).unwrap_or(-1);
                Err(SandboxError::Setup {
                    stage: "bwrap".into(),
                    message: format!(
                        "bwrap failed before running the command (exit status {code}; its \
                         message is above)"
                    ),
                })
            }
            other => other,
        }
    }

    fn stop(&mut self) -> Result<(), SandboxError> {
        self.network.stop();
        self.started = false;
        Ok(())
    }

    fn deprovision(&mut self) -> Result<(), SandboxError> {
        self.network.stop();
        self.network = SandboxNet::default();
        self.spec = None;
        self.view = None;
        Ok(())
    }
}

/// The mxc-vm binary itself, bound into the sandbox to run the exec helper.
fn helper_exe() -> Result<PathBuf, SandboxError> {
    std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .map_err(|e| SandboxError::Unavailable {
            backend: "bubblewrap",
            reason: format!(
                "cannot find the mxc-vm binary to run the exec helper inside bwrap: {e}"
            ),
        })
}

/// The bwrap command line for a spec and request, for `--dry-run`-style inspection and tests.
/// A proxied network shows the handoff descriptor as -1.
pub fn command_line(spec: &SandboxSpec, req: &ExecRequest) -> Result<Vec<OsString>, SandboxError> {
    let net = net_mode(&spec.policy, &spec.net);
    let view = SandboxView::build(&spec.view, net, Some(Path::new("/")));
    let mut inherited = Inherited { fds: Vec::new() };
    let exe = helper_exe()?;
    let helper = Helper {
        exe: &exe,
        proxy_fd: matches!(net, NetMode::Proxied { .. }).then_some(-1),
    };
    build_args(&view, net, req, &mut inherited, helper)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bwrap_status_lines_parse() {
        assert_eq!(
            parse_bwrap_status(br#"{ "child-pid": 42 }"#),
            Some(Status::Child { pid: 42 })
        );
        assert_eq!(
            parse_bwrap_status(br#"{ "exit-code": 3 }"#),
            Some(Status::Exit { code: 3 })
        );
        assert_eq!(
            parse_bwrap_status(br#"{ "exit-code": 137 }"#),
            Some(Status::Signal { signal: 9 })
        );
    }
}
