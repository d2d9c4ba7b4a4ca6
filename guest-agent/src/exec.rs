//! One exec: turning an [`proto::Exec`] into a child process, and the state of that
//! process until its [`proto::Exit`] is sent.
//!
//! The child gets exactly the requested environment, working directory and rlimits,
//! a session (and process group) of its own, its own cgroup when the agent has a cgroup
//! root, and pipes for stdout and stderr (and stdin when asked for; otherwise stdin
//! reads end-of-file). When the leader exits, the rest of its process group (and
//! cgroup) is killed too: an exec leaves nothing running behind it.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use proto::{Control, Exec, Exit, STDIN_WINDOW};

use crate::cgroup::{CgroupError, CgroupRoot, ExecCgroup};
use crate::registry::{Registry, Source, Watched};
use crate::sys::{self, ChildSpec, WaitStatus};

/// The search path when the exec's environment has no `PATH`.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long output may keep flowing after the leader exits, once nothing holds it back;
/// only processes that escaped the group and the cgroup can hold the pipes that long.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Starting an exec failed before a child existed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// A string holds a NUL byte (validation normally catches this first).
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    /// A process limit was asked for but cannot be enforced here.
    #[error("rlimits.nproc cannot be enforced: no pids cgroup and the agent runs as root")]
    NprocUnenforceable,
    /// The exec's cgroup could not be created.
    #[error("cannot create the exec's cgroup")]
    Cgroup(#[source] CgroupError),
    /// Pipes could not be created.
    #[error("cannot create pipes")]
    Pipe(#[source] io::Error),
    /// `fork` failed.
    #[error("cannot fork")]
    Fork(#[source] io::Error),
}

/// What all execs share.
#[derive(Debug)]
pub struct SpawnContext {
    /// Per-exec cgroups live under this root, when there is one.
    pub cgroups: Option<CgroupRoot>,
    /// Reset the child's OOM score (as PID 1 the agent protects itself).
    pub reset_oom_score: bool,
    /// Whether the agent runs as root (then `RLIMIT_NPROC` is not enforced).
    pub is_root: bool,
    /// Variables every exec gets on top of its own ([`hypervisor_env`]).
    pub extra_env: Vec<(String, String)>,
    /// Busybox applets a command name may fall back to ([`image_applets`]).
    pub applets: Vec<String>,
}

/// Variables the host's kernel command line hands to `/init` for programs in the guest
/// (see `guest_image::KERNEL_CMDLINE_PVM`): under kvm_pvm the guest kernel cannot save
/// AVX state, so glibc and OpenSSL are told not to use it.
pub const HYPERVISOR_ENV: &[&str] = &["GLIBC_TUNABLES", "OPENSSL_ia32cap"];

/// The [`HYPERVISOR_ENV`] variables present in the agent's own environment.
pub fn hypervisor_env() -> Vec<(String, String)> {
    HYPERVISOR_ENV
        .iter()
        .filter_map(|name| Some(((*name).to_owned(), std::env::var(name).ok()?)))
        .collect()
}

/// Adds `extra` to an exec's environment: a `GLIBC_TUNABLES` the exec sets keeps its
/// tunables and gets ours after them (the later setting wins); other names are ours.
fn add_extra_env(env: &mut std::collections::BTreeMap<String, String>, extra: &[(String, String)]) {
    for (name, value) in extra {
        let merged = match env.get(name) {
            Some(own) if name == "GLIBC_TUNABLES" && !own.is_empty() => format!("{own}:{value}"),
            _ => value.clone(),
        };
        env.insert(name.clone(), merged);
    }
}

/// The program paths to try for `program`, like `execvp`: as given when it contains a
/// `/`, otherwise each `PATH` entry in order (an empty entry is the working directory),
/// then busybox when `program` is one of its `applets` (the image links only a few; see
/// [`image_applets`]). Busybox runs the applet its `argv[0]` names.
pub fn path_candidates(program: &str, path_var: Option<&str>, applets: &[String]) -> Vec<String> {
    if program.contains('/') {
        return vec![program.to_owned()];
    }
    let mut candidates: Vec<String> = path_var
        .unwrap_or(DEFAULT_PATH)
        .split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            format!("{}/{program}", dir.trim_end_matches('/'))
        })
        .collect();
    if applets.iter().any(|applet| applet == program) {
        candidates.push(proto::BUSYBOX_PATH.to_owned());
    }
    candidates
}

/// The guest image's busybox applets ([`proto::APPLET_LIST_PATH`]), read once as PID 1
/// starts (before Ready, so a restored VM has them already); none where there is no such
/// list.
pub fn image_applets() -> Vec<String> {
    std::fs::read_to_string(proto::APPLET_LIST_PATH)
        .map(|list| {
            list.lines()
                .filter(|name| !name.is_empty() && !name.contains('/'))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn cstring(s: String, field: &'static str) -> Result<CString, ExecError> {
    CString::new(s).map_err(|_| ExecError::Nul(field))
}

/// Builds everything the child needs, before the fork.
pub fn child_spec(exec: &Exec, is_root: bool, applets: &[String]) -> Result<ChildSpec, ExecError> {
    let program = exec.argv.first().map(String::as_str).unwrap_or_default();
    let path_var = exec.env.get("PATH").map(String::as_str);
    let programs = path_candidates(program, path_var, applets)
        .into_iter()
        .map(|p| cstring(p, "exec.argv"))
        .collect::<Result<_, _>>()?;
    let argv_storage = exec
        .argv
        .iter()
        .map(|a| cstring(a.clone(), "exec.argv"))
        .collect::<Result<_, _>>()?;
    let envp_storage = exec
        .env
        .iter()
        .map(|(k, v)| cstring(format!("{k}={v}"), "exec.env"))
        .collect::<Result<_, _>>()?;
    let cwd = cstring(exec.cwd.clone().unwrap_or_else(|| "/".into()), "exec.cwd")?;
    let r = &exec.rlimits;
    let mut rlimits = Vec::new();
    for (resource, value) in [
        (libc::RLIMIT_AS, r.as_bytes),
        (libc::RLIMIT_NOFILE, r.nofile),
        (libc::RLIMIT_FSIZE, r.fsize),
        (libc::RLIMIT_CPU, r.cpu_s),
    ] {
        if let Some(v) = value {
            rlimits.push((resource, v));
        }
    }
    if let (Some(n), false) = (r.nproc, is_root) {
        rlimits.push((libc::RLIMIT_NPROC, n));
    }
    Ok(ChildSpec {
        programs,
        argv_storage,
        envp_storage,
        cwd,
        rlimits,
        cgroup_procs: None,
        reset_oom_score: false,
        identity: (is_root && !exec.root).then_some((NOBODY, NOBODY)),
    })
}

/// The unprivileged user and group commands run as unless the host asks for root.
pub const NOBODY: u32 = proto::GUEST_USER;

/// Turns the child's 8-byte failure report into a message for the host.
pub fn describe_failure(report: &[u8], exec: &Exec) -> String {
    let step = report
        .first_chunk::<4>()
        .map_or(0, |b| u32::from_ne_bytes(*b));
    let errno = report
        .get(4..8)
        .and_then(|b| b.first_chunk::<4>())
        .map_or(0, |b| i32::from_ne_bytes(*b));
    let err = io::Error::from_raw_os_error(errno);
    let program = exec.argv.first().map(String::as_str).unwrap_or_default();
    match step {
        sys::STEP_SETSID => format!("cannot start a session: {err}"),
        sys::STEP_CGROUP => format!("cannot join the exec's cgroup: {err}"),
        sys::STEP_DUP => format!("cannot set up stdio: {err}"),
        sys::STEP_CHDIR => format!(
            "cannot change to {}: {err}",
            exec.cwd.as_deref().unwrap_or("/")
        ),
        sys::STEP_RLIMIT => format!("cannot apply rlimits: {err}"),
        sys::STEP_EXEC => format!("cannot execute {program:?}: {err}"),
        sys::STEP_IDENTITY => format!(
            "cannot switch to the unprivileged user {NOBODY}:{NOBODY}: {err} (ask for root \
             in the guest to run as root)"
        ),
        _ => format!("the child failed to start: {err}"),
    }
}

/// The write end of a child's stdin, with what the host sent that the child has not
/// read yet.
#[derive(Debug)]
pub struct StdinPipe {
    /// The pipe (non-blocking).
    pub pipe: Watched,
    buf: Vec<u8>,
    start: usize,
    close_requested: bool,
    /// Bytes written to the child and not yet credited back to the host.
    uncredited: usize,
}

/// What became of stdin bytes from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdinAccept {
    /// Buffered for the child.
    Buffered,
    /// Dropped (stdin is closed); credit them back at once.
    Discarded(usize),
    /// The host sent more than [`STDIN_WINDOW`] uncredited bytes.
    Overrun,
}

impl StdinPipe {
    /// Bytes waiting for the child.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether the pipe can be closed now (the host is done and all was written).
    pub fn can_close(&self) -> bool {
        self.close_requested && self.pending() == 0
    }

    /// Writes what the pipe takes; `Err` means the child closed its end.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.pending() > 0 {
            match sys::write(&self.pipe, &self.buf[self.start..]) {
                Ok(n) => {
                    self.start += n;
                    self.uncredited += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(())
    }
}

/// A running (or finishing) exec.
#[derive(Debug)]
pub struct Running {
    /// The exec's request.
    pub exec: Exec,
    /// Process id of the leader, which is also its process group id.
    pub pid: libc::pid_t,
    started: Instant,
    ended: Option<Instant>,
    /// When `timeout_ms` runs out.
    pub deadline: Option<Instant>,
    /// Stdin, while open.
    pub stdin: Option<StdinPipe>,
    /// Stdout read end, until end-of-file.
    pub stdout: Option<Watched>,
    /// Stderr read end, until end-of-file.
    pub stderr: Option<Watched>,
    /// The child's setup report, until end-of-file.
    pub report: Option<Watched>,
    report_bytes: Vec<u8>,
    /// The leader's end, once reaped.
    pub status: Option<WaitStatus>,
    /// Whether the timeout killed it.
    pub timed_out: bool,
    /// After the leader is reaped: when to stop waiting for the pipes.
    pub drain_deadline: Option<Instant>,
    /// The exec's cgroup, if any.
    pub cgroup: Option<ExecCgroup>,
}

impl Running {
    /// Forks the child for `exec` and registers its pipes (not yet watched).
    pub fn spawn(
        mut exec: Exec,
        conn: u32,
        ctx: &mut SpawnContext,
        reg: &mut Registry,
    ) -> Result<Self, ExecError> {
        add_extra_env(&mut exec.env, &ctx.extra_env);
        let mut spec = child_spec(&exec, ctx.is_root, &ctx.applets)?;
        spec.reset_oom_score = ctx.reset_oom_score;
        let cgroup = match (&mut ctx.cgroups, exec.rlimits.nproc) {
            (Some(root), nproc) => Some(root.create(nproc).map_err(ExecError::Cgroup)?),
            (None, Some(_)) if ctx.is_root => return Err(ExecError::NprocUnenforceable),
            (None, _) => None,
        };
        let result = Self::fork(exec, conn, spec, cgroup.as_ref(), reg);
        match result {
            Ok(mut running) => {
                running.cgroup = cgroup.map(|mut c| {
                    c.close_procs();
                    c
                });
                Ok(running)
            }
            Err(e) => {
                if let Some(c) = cgroup {
                    c.try_remove();
                }
                Err(e)
            }
        }
    }

    fn fork(
        exec: Exec,
        conn: u32,
        mut spec: ChildSpec,
        cgroup: Option<&ExecCgroup>,
        reg: &mut Registry,
    ) -> Result<Self, ExecError> {
        spec.cgroup_procs = cgroup.and_then(ExecCgroup::procs_fd);
        let (stdin_r, stdin_w) = sys::pipe().map_err(ExecError::Pipe)?;
        let (stdout_r, stdout_w) = sys::pipe().map_err(ExecError::Pipe)?;
        let (stderr_r, stderr_w) = sys::pipe().map_err(ExecError::Pipe)?;
        let (report_r, report_w) = sys::pipe().map_err(ExecError::Pipe)?;
        for fd in [&stdin_w, &stdout_r, &stderr_r, &report_r] {
            sys::set_nonblocking(fd).map_err(ExecError::Pipe)?;
        }
        let stdio = [
            stdin_r.as_raw_fd(),
            stdout_w.as_raw_fd(),
            stderr_w.as_raw_fd(),
        ];
        let started = Instant::now();
        let pid = sys::spawn(&spec, stdio, report_w.as_raw_fd()).map_err(ExecError::Fork)?;
        drop((stdin_r, stdout_w, stderr_w, report_w));
        let id = exec.id;
        let stdin = exec.stdin.then(|| StdinPipe {
            pipe: reg.watch(stdin_w, Source::Stdin(conn, id)),
            buf: Vec::new(),
            start: 0,
            close_requested: false,
            uncredited: 0,
        });
        Ok(Self {
            // A timeout beyond what the clock can represent is no timeout.
            deadline: exec
                .timeout_ms
                .and_then(|ms| started.checked_add(Duration::from_millis(ms))),
            stdin,
            stdout: Some(reg.watch(stdout_r, Source::Stdout(conn, id))),
            stderr: Some(reg.watch(stderr_r, Source::Stderr(conn, id))),
            report: Some(reg.watch(report_r, Source::Report(conn, id))),
            report_bytes: Vec::new(),
            exec,
            pid,
            started,
            ended: None,
            status: None,
            timed_out: false,
            drain_deadline: None,
            cgroup: None,
        })
    }

    /// The exec id.
    pub fn id(&self) -> u32 {
        self.exec.id
    }

    /// Takes stdin bytes from the host, within the stdin window.
    pub fn accept_stdin(&mut self, data: &[u8]) -> StdinAccept {
        match &mut self.stdin {
            Some(stdin) if !stdin.close_requested => {
                if stdin.pending() + data.len() > STDIN_WINDOW {
                    return StdinAccept::Overrun;
                }
                stdin.buf.extend_from_slice(data);
                StdinAccept::Buffered
            }
            _ => StdinAccept::Discarded(data.len()),
        }
    }

    /// The host sent `StdinClose`.
    pub fn request_stdin_close(&mut self) {
        if let Some(stdin) = &mut self.stdin {
            stdin.close_requested = true;
        }
    }

    /// Credit to give back now: in batches of a quarter window, or all of it once the
    /// child has taken everything buffered.
    pub fn take_stdin_credit(&mut self) -> usize {
        let Some(stdin) = &mut self.stdin else {
            return 0;
        };
        if stdin.uncredited >= STDIN_WINDOW / 4 || stdin.pending() == 0 {
            std::mem::take(&mut stdin.uncredited)
        } else {
            0
        }
    }

    /// Closes stdin (child closed it, or all is written and the host is done); returns
    /// the bytes the host is owed credit for (written or dropped, not yet credited).
    pub fn close_stdin(&mut self, reg: &mut Registry) -> usize {
        let owed = self
            .stdin
            .as_ref()
            .map_or(0, |s| s.uncredited + s.pending());
        if let Some(stdin) = self.stdin.take() {
            reg.unwatch(stdin.pipe);
        }
        owed
    }

    /// Sends `signo` to the exec's process group (or the leader, if it has not made
    /// its group yet). Nothing once the leader is reaped.
    pub fn signal(&self, signo: i32) {
        if self.status.is_some() {
            return;
        }
        if sys::kill(-self.pid, signo).is_err() {
            let _ = sys::kill(self.pid, signo);
        }
    }

    /// Kills the whole exec: process group and cgroup.
    pub fn kill_all(&self) {
        self.signal(libc::SIGKILL);
        if self.status.is_some() {
            // The leader is reaped; its group may live on without it.
            let _ = sys::kill(-self.pid, libc::SIGKILL);
        }
        if let Some(c) = &self.cgroup {
            c.kill();
        }
    }

    /// The timeout passed: kill everything and remember why.
    pub fn time_out(&mut self) {
        self.deadline = None;
        self.timed_out = true;
        self.kill_all();
    }

    /// The leader was reaped (the caller killed the rest of its group before reaping).
    pub fn reaped(&mut self, status: WaitStatus, now: Instant) {
        self.status = Some(status);
        self.ended = Some(now);
        self.deadline = None;
        self.drain_deadline = Some(now + DRAIN_GRACE);
        if let Some(c) = &self.cgroup {
            c.kill();
        }
    }

    /// Reads the child's setup report; closes it at end-of-file.
    pub fn read_report(&mut self, reg: &mut Registry) {
        let Some(pipe) = &self.report else {
            return;
        };
        let mut buf = [0u8; 8];
        match sys::read(pipe, &mut buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Ok(n) if n > 0 => {
                let room = 8usize.saturating_sub(self.report_bytes.len());
                self.report_bytes.extend_from_slice(&buf[..n.min(room)]);
            }
            _ => {
                if let Some(pipe) = self.report.take() {
                    reg.unwatch(pipe);
                }
            }
        }
    }

    /// Whether everything is over: leader reaped, report and output pipes closed.
    pub fn is_finished(&self) -> bool {
        self.status.is_some()
            && self.stdout.is_none()
            && self.stderr.is_none()
            && self.report.is_none()
    }

    /// The message that ends the exec: `Exit`, or `Error` when it never started.
    pub fn final_message(&self) -> Control {
        if !self.report_bytes.is_empty() {
            return Control::error(
                Some(self.id()),
                describe_failure(&self.report_bytes, &self.exec),
            );
        }
        let (code, signal) = match self.status {
            Some(WaitStatus::Exited(c)) => (Some(c), None),
            Some(WaitStatus::Signaled(s)) => (None, Some(s)),
            None => (None, Some(libc::SIGKILL)),
        };
        Control::Exit(Exit {
            id: self.id(),
            code,
            signal,
            timed_out: self.timed_out,
            duration_ms: self
                .ended
                .unwrap_or_else(Instant::now)
                .saturating_duration_since(self.started)
                .as_millis() as u64,
        })
    }

    /// Releases every descriptor; the cgroup (if any) is handed back for removal.
    pub fn teardown(mut self, reg: &mut Registry) -> Option<ExecCgroup> {
        let _ = self.close_stdin(reg);
        for pipe in [self.stdout.take(), self.stderr.take(), self.report.take()]
            .into_iter()
            .flatten()
        {
            reg.unwatch(pipe);
        }
        self.cgroup.take()
    }
}

/// Reads a child's output pipe without blocking.
pub enum PipeRead {
    /// Some bytes.
    Data(usize),
    /// Nothing now.
    Empty,
    /// End-of-file (or an error, which ends the stream the same way).
    Closed,
}

/// Reads at most `buf.len()` bytes from `pipe`.
pub fn read_pipe(pipe: &impl AsRawFd, buf: &mut [u8]) -> PipeRead {
    match sys::read(pipe, buf) {
        Ok(0) => PipeRead::Closed,
        Ok(n) => PipeRead::Data(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => PipeRead::Empty,
        Err(_) => PipeRead::Closed,
    }
}

impl std::fmt::Debug for PipeRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Data(n) => write!(f, "Data({n})"),
            Self::Empty => f.write_str("Empty"),
            Self::Closed => f.write_str("Closed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(argv: &[&str]) -> Exec {
        Exec {
            id: 1,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Exec::default()
        }
    }

    #[test]
    fn program_with_slash_is_used_as_is() {
        let c = path_candidates("./run.sh", Some("/bin"), &["run.sh".into()]);

        assert_eq!(c, ["./run.sh"]);
    }

    #[test]
    fn bare_program_is_searched_in_path_order() {
        let c = path_candidates("ls", Some("/usr/bin:/bin/::rel"), &[]);

        assert_eq!(c, ["/usr/bin/ls", "/bin/ls", "./ls", "rel/ls"]);
    }

    #[test]
    fn a_busybox_applet_is_tried_last_through_busybox() {
        let applets = ["awk".to_owned(), "wget".to_owned()];

        let found = path_candidates("wget", Some("/usr/bin:/bin"), &applets);
        let other = path_candidates("curl", Some("/usr/bin"), &applets);

        assert_eq!(found, ["/usr/bin/wget", "/bin/wget", "/.mxc/bin/busybox"]);
        assert_eq!(other, ["/usr/bin/curl"]);
    }

    #[test]
    fn missing_path_uses_the_default() {
        let c = path_candidates("sh", None, &[]);

        assert_eq!(c.last().unwrap(), "/bin/sh");
        assert_eq!(c.len(), DEFAULT_PATH.split(':').count());
    }

    #[test]
    fn child_spec_has_exactly_the_given_environment() {
        let mut e = exec(&["env"]);
        e.env.insert("A".into(), "1".into());
        e.env.insert("B".into(), "x=y".into());

        let spec = child_spec(&e, true, &[]).unwrap();

        let env: Vec<_> = spec
            .envp_storage
            .iter()
            .map(|c| c.to_str().unwrap())
            .collect();
        assert_eq!(env, ["A=1", "B=x=y"]);
        assert_eq!(spec.cwd.to_str().unwrap(), "/");
    }

    #[test]
    fn extra_env_is_added_and_glibc_tunables_are_appended() {
        let extra = [
            (
                "GLIBC_TUNABLES".to_owned(),
                "glibc.cpu.hwcaps=-AVX".to_owned(),
            ),
            ("OPENSSL_ia32cap".to_owned(), "~0x1".to_owned()),
        ];
        let mut own = std::collections::BTreeMap::from([
            (
                "GLIBC_TUNABLES".to_owned(),
                "glibc.malloc.check=3".to_owned(),
            ),
            ("OPENSSL_ia32cap".to_owned(), "0x0".to_owned()),
            ("A".to_owned(), "1".to_owned()),
        ]);
        let mut none = std::collections::BTreeMap::new();

        add_extra_env(&mut own, &extra);
        add_extra_env(&mut none, &extra);

        assert_eq!(
            own["GLIBC_TUNABLES"],
            "glibc.malloc.check=3:glibc.cpu.hwcaps=-AVX"
        );
        assert_eq!(
            (own["OPENSSL_ia32cap"].as_str(), own["A"].as_str()),
            ("~0x1", "1")
        );
        assert_eq!(none.into_iter().collect::<Vec<_>>(), extra);
    }

    #[test]
    fn child_spec_maps_rlimits_and_skips_nproc_for_root() {
        let mut e = exec(&["true"]);
        e.rlimits.nofile = Some(32);
        e.rlimits.cpu_s = Some(5);
        e.rlimits.nproc = Some(10);

        let spec = child_spec(&e, true, &[]).unwrap();

        assert_eq!(
            spec.rlimits,
            [(libc::RLIMIT_NOFILE, 32), (libc::RLIMIT_CPU, 5)]
        );
    }

    #[test]
    fn child_spec_applies_nproc_for_non_root() {
        let mut e = exec(&["true"]);
        e.rlimits.nproc = Some(10);

        let spec = child_spec(&e, false, &[]).unwrap();

        assert_eq!(spec.rlimits, [(libc::RLIMIT_NPROC, 10)]);
    }

    #[test]
    fn exec_failure_report_names_the_program_and_error() {
        let mut report = sys::STEP_EXEC.to_ne_bytes().to_vec();
        report.extend(libc::ENOENT.to_ne_bytes());

        let msg = describe_failure(&report, &exec(&["nope"]));

        assert!(msg.starts_with("cannot execute \"nope\": No such file or directory"));
    }

    #[test]
    fn chdir_failure_report_names_the_directory() {
        let mut report = sys::STEP_CHDIR.to_ne_bytes().to_vec();
        report.extend(libc::ENOENT.to_ne_bytes());
        let mut e = exec(&["true"]);
        e.cwd = Some("/missing".into());

        let msg = describe_failure(&report, &e);

        assert!(msg.starts_with("cannot change to /missing:"));
    }
}
