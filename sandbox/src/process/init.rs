//! The sandbox init: runs as `mxc-vm __sandbox-init` inside the new namespaces, or (the
//! fast path) as PID 1 itself, cloned by the host.
//!
//! It builds the root (mounts.rs) and forks PID 1 of the new PID namespace, which mounts
//! /proc, pivots into the root and starts the command. The command then applies rlimits,
//! Landlock, drops every capability, sets no_new_privs, installs the seccomp filters and
//! execs. Every failure is reported on the status pipe (fd 3) as a `Status` line.
//! In a persistent sandbox (`session`), PID 1 instead serves exec requests from the
//! host, forking each command the same way.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::session::{Request, CTL_FD, MAX_MESSAGE};
use super::{mounts, InitPlan, INIT_ARG, NET_FD, PLAN_FD, STATUS_FD};
use crate::proxy::handoff;
use crate::proxy::sys::recv_fds;
use crate::supervise::Status;
use crate::view::{NetMode, SANDBOX_HOSTNAME};

/// Exit code of the init when setup failed.
const SETUP_FAILED: i32 = 125;

/// If this process was started as the sandbox init (or as bubblewrap's
/// exec helper, see `bubblewrap::helper`), run it and exit.
pub fn hook() {
    let mut args = std::env::args_os();
    let _argv0 = args.next();
    let first = args.next();
    if first.as_deref() == Some(std::ffi::OsStr::new(INIT_ARG)) {
        let code = run();
        std::process::exit(code);
    }
    if first.as_deref() == Some(std::ffi::OsStr::new(crate::bubblewrap::EXEC_HELPER_ARG)) {
        let rest: Vec<std::ffi::OsString> = args.collect();
        let code = crate::bubblewrap::helper::main(&rest);
        std::process::exit(code);
    }
}

pub(crate) fn report(status: &Status) {
    let line = status.to_line();
    // SAFETY: writing our own buffer to the inherited status descriptor.
    unsafe { libc::write(STATUS_FD, line.as_ptr().cast(), line.len()) };
}

/// Report the end of a setup stage, when the plan asks for stage times.
fn stage(plan: &InitPlan, name: &str) {
    stage_at(plan, name, crate::stages::now_ns());
}

/// Report a stage that ended at `at_ns`, when the plan asks for stage times.
pub(crate) fn stage_at(plan: &InitPlan, name: &str, at_ns: u64) {
    if plan.stages {
        report(&Status::Stage {
            name: name.into(),
            at_ns,
        });
    }
}

pub(crate) fn fail(stage: &str, message: impl std::fmt::Display) -> i32 {
    report(&Status::Error {
        stage: stage.into(),
        message: message.to_string(),
    });
    SETUP_FAILED
}

fn read_plan() -> Result<InitPlan, String> {
    // SAFETY: PLAN_FD was placed by the parent and is owned by nobody else here.
    let mut file = unsafe { std::fs::File::from_raw_fd(PLAN_FD) };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

fn run() -> i32 {
    let plan = match read_plan() {
        Ok(p) => p,
        Err(e) => return fail("plan", e),
    };
    run_plan(&plan)
}

/// The init's work, once its descriptors are in place and the plan is known: used after
/// the re-exec and, directly in the forked child, when the caller is single-threaded.
pub(crate) fn run_plan(plan: &InitPlan) -> i32 {
    if let Err(code) = build_root(plan) {
        return code;
    }
    let proxied = matches!(plan.net, NetMode::Proxied { .. });
    // SAFETY: fork in a single-threaded process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return fail("fork", std::io::Error::last_os_error());
    }
    if pid == 0 {
        let code = pid_one(plan, None);
        // SAFETY: leave the child without running the parent's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    if proxied {
        // Only PID 1 sends the listener; the host sees the end of the socket once it has.
        // SAFETY: closing our own copy of the handoff socket.
        unsafe { libc::close(NET_FD) };
    }
    if plan.session {
        // Only PID 1 talks to the host.
        // SAFETY: closing our own copy of the control socket.
        unsafe { libc::close(CTL_FD) };
    }
    report(&Status::Child { pid });
    wait_exit_code(pid)
}

/// The init's work when it was cloned as PID 1 of the sandbox's PID namespace (the
/// fast path): build the root and go on as PID 1, with no process in between. Its
/// network and IPC namespaces, made meanwhile by the host's helper
/// (`super::netns_helper`), arrive on `netns`.
pub(crate) fn run_as_pid_one(plan: &InitPlan, netns: RawFd) -> i32 {
    if let Err(code) = build_root(plan) {
        return code;
    }
    pid_one(plan, Some(netns))
}

/// Mark the inherited descriptors close-on-exec and build the sandbox's root under
/// /newroot. Err: the exit code, the failure already reported.
fn build_root(plan: &InitPlan) -> Result<(), i32> {
    // The status descriptor must not leak into the command.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    if matches!(plan.net, NetMode::Proxied { .. }) {
        // Never inherited by the command, whatever happens below.
        // SAFETY: fcntl on the descriptor the parent placed for us.
        unsafe { libc::fcntl(NET_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    mounts::enter_scratch_root().map_err(|e| fail("mount", e))?;
    mounts::build_root(&plan.view).map_err(|e| fail("mount", e))?;
    stage(plan, "root built");
    Ok(())
}

/// Wait for `pid` and turn its status into an exit code.
fn wait_exit_code(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into our integer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return SETUP_FAILED;
        }
    }
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

/// PID 1 of the sandbox's PID namespace. `netns`: the socket its network (with `lo`
/// up) and IPC namespaces arrive on (else it is in its own ones already, `lo` down).
fn pid_one(plan: &InitPlan, netns: Option<RawFd>) -> i32 {
    // SAFETY: prctl without memory arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if let Err(e) = mounts::finish_root() {
        return fail("mount", e);
    }
    stage(plan, "pid 1: /proc, pivot_root");
    // Every sandbox has its own network namespace (no tier shares the host's): no
    // command is forked before this succeeds.
    match netns {
        Some(sock) => {
            if let Err(e) = join_netns(sock) {
                return fail(
                    "network",
                    format!("entering the sandbox's network and IPC namespaces: {e}"),
                );
            }
        }
        None => {
            if let Err(e) = loopback_up() {
                return fail("network", format!("bringing up lo: {e}"));
            }
        }
    }
    if let NetMode::Proxied { port } = plan.net {
        let sent = handoff::bind_and_send(port, NET_FD);
        // SAFETY: closing the handoff socket before the command is forked.
        unsafe { libc::close(NET_FD) };
        if let Err(e) = sent {
            return fail(
                "network",
                format!("opening the proxy port 127.0.0.1:{port}: {e}"),
            );
        }
    }
    // SAFETY: sethostname reads the buffer of the given length.
    unsafe { libc::sethostname(SANDBOX_HOSTNAME.as_ptr().cast(), SANDBOX_HOSTNAME.len()) };
    stage(plan, "pid 1: network");
    if plan.session {
        return serve(plan);
    }

    let child = match spawn_command(plan) {
        Ok(pid) => pid,
        Err(e) => return fail("fork", e),
    };
    // Reap everything; return when the command itself exits. Leaving then tears the
    // namespace down, killing whatever the command left behind.
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes into our integer.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return fail("wait", std::io::Error::last_os_error());
        }
        if r != child {
            continue;
        }
        stage(plan, "command ran");
        if libc::WIFEXITED(status) {
            let code = libc::WEXITSTATUS(status);
            report(&Status::Exit { code });
            return code;
        }
        if libc::WIFSIGNALED(status) {
            let signal = libc::WTERMSIG(status);
            report(&Status::Signal { signal });
            return 128 + signal;
        }
    }
}

/// Start the command's process (`command`) as vfork would: it shares PID 1's memory and
/// PID 1 is suspended until it has exec'd (or exited), so there are no page tables to
/// copy (PID 1 is a copy of the whole mxc-vm) and none for the exec to tear down. It has
/// its own stack (with a guard page below), descriptor table, working directory,
/// signal handlers, credentials, rlimits and filters, as after fork; what it allocates
/// before the exec stays behind in PID 1's heap, unused. Returns its pid.
fn spawn_command(plan: &InitPlan) -> std::io::Result<libc::pid_t> {
    const STACK: usize = 512 * 1024;
    const GUARD: usize = 4096;
    extern "C" fn run(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the plan, alive until this process has exec'd or exited
        // (PID 1 is suspended meanwhile).
        let plan = unsafe { &*arg.cast::<InitPlan>() };
        let code = command(plan);
        // SAFETY: leave without running atexit handlers (they are PID 1's).
        unsafe { libc::_exit(code) }
    }
    // SAFETY: a fresh private anonymous mapping, its lowest page made inaccessible;
    // unmapped below once the child no longer uses it.
    let stack = unsafe {
        let base = libc::mmap(
            std::ptr::null_mut(),
            STACK + GUARD,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        );
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        if libc::mprotect(base, GUARD, libc::PROT_NONE) != 0 {
            let e = std::io::Error::last_os_error();
            libc::munmap(base, STACK + GUARD);
            return Err(e);
        }
        base
    };
    // SAFETY: the child runs `run` on the mapping's top (page-aligned) with the plan,
    // both alive until it has exec'd or exited: CLONE_VFORK returns only then.
    let pid = unsafe {
        libc::clone(
            run,
            stack.cast::<u8>().add(STACK + GUARD).cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::from_ref(plan).cast_mut().cast(),
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: the mapping made above; the child no longer runs on it.
    unsafe { libc::munmap(stack, STACK + GUARD) };
    if pid < 0 {
        return Err(err);
    }
    Ok(pid)
}

/// Receive the network and IPC namespaces the host's helper made (two descriptors on
/// `sock`, which is closed) and enter them.
fn join_netns(sock: RawFd) -> std::io::Result<()> {
    let mut byte = [0u8; 1];
    let received = recv_fds(sock, &mut byte);
    // SAFETY: closing the socket this process was given; nothing else uses it.
    unsafe { libc::close(sock) };
    let (_, fds) = received?;
    let [net, ipc] = fds.as_slice() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the helper sent no namespaces",
        ));
    };
    for (ns, kind) in [(net, libc::CLONE_NEWNET), (ipc, libc::CLONE_NEWIPC)] {
        // SAFETY: setns on a descriptor we own; the kernel checks that it is a
        // namespace of that kind (EINVAL otherwise) owned by our user namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), kind) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Bring up `lo` in the calling process's network namespace.
pub(crate) fn loopback_up() -> std::io::Result<()> {
    // SAFETY: socket/ioctl/close on our own descriptor with a zeroed ifreq we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut ifr);
        if rc == 0 {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &ifr);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// The command's own process: confine, then exec. Returns only on failure.
pub(crate) fn command(plan: &InitPlan) -> i32 {
    // A new session: no controlling terminal to inject input into.
    // SAFETY: setsid has no arguments.
    unsafe { libc::setsid() };
    if let Err(e) = crate::limits::apply_rlimits(&plan.rlimits) {
        return fail("rlimits", e);
    }
    if let Err(e) = std::env::set_current_dir(&plan.cwd) {
        return exec_failed(
            format!("cannot enter working directory {}: {e}", plan.cwd.display()),
            SETUP_FAILED,
        );
    }
    stage(plan, "command: forked, rlimits");
    let program = match resolve_program(plan) {
        Ok(p) => p,
        Err((message, code)) => return exec_failed(message, code),
    };
    let argv: Vec<CString> = plan
        .argv
        .iter()
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    let envp: Vec<CString> = plan
        .env
        .iter()
        .filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok())
        .collect();
    let Ok(prog) = CString::new(program.as_os_str().as_bytes()) else {
        return exec_failed("program path contains NUL".into(), 126);
    };
    // Nothing but 0, 1 and 2 reaches the command (the status pipe is close-on-exec
    // already): not what mxc-vm inherited (crate::fds).
    if let Err(e) = crate::fds::cloexec_from_3() {
        return fail("descriptors", e);
    }
    match crate::landlock::restrict(
        &plan.view.landlock_ro,
        &plan.view.landlock_rw,
        &plan.view.landlock_private,
    ) {
        Ok(Some(warning)) => report(&Status::Warning { message: warning }),
        Ok(None) => {}
        Err(e) => return fail("landlock", e),
    }
    stage(plan, "command: landlock");
    if let Err(e) = drop_capabilities() {
        return fail("capabilities", e);
    }
    // SAFETY: prctl without memory arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return fail("no_new_privs", std::io::Error::last_os_error());
    }
    stage(plan, "command: capabilities");
    if let Err(e) = crate::seccomp::install() {
        return fail("seccomp", e);
    }
    stage(plan, "command: seccomp");
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    // SAFETY: prog, argv and envp are NUL-terminated arrays of NUL-terminated strings that
    // live until execve returns (it only returns on failure).
    unsafe { libc::execve(prog.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr()) };
    let e = std::io::Error::last_os_error();
    let code = if e.raw_os_error() == Some(libc::ENOENT) {
        127
    } else {
        126
    };
    exec_failed(format!("cannot execute {}: {e}", program.display()), code)
}

fn exec_failed(message: String, code: i32) -> i32 {
    report(&Status::ExecFailed { message, code });
    code
}

/// argv[0] as a path: used as is when it contains a slash, else searched in PATH.
fn resolve_program(plan: &InitPlan) -> Result<PathBuf, (String, i32)> {
    let Some(name) = plan.argv.first() else {
        return Err(("empty command".into(), 127));
    };
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = plan
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or("/usr/bin:/bin", |(_, v)| v.as_str());
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err((
        format!("{name}: command not found in the sandbox (PATH={path})"),
        127,
    ))
}

/// Drop every capability: bounding set, ambient set, then effective/permitted/inheritable.
fn drop_capabilities() -> std::io::Result<()> {
    // SAFETY: prctl calls without memory arguments; capset reads the two structs we own.
    unsafe {
        // Capability numbers are dense: the first one the kernel calls invalid (EINVAL)
        // is past its last, and so is every one after it.
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(e);
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let header = Header {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

// ---- PID 1 of a persistent sandbox (see `session`) ----

fn write_status(fd: RawFd, status: &Status) {
    let line = status.to_line();
    // SAFETY: writing our own buffer to a descriptor we hold.
    unsafe { libc::write(fd, line.as_ptr().cast(), line.len()) };
}

/// PID 1's loop: run execs as they are asked for until the host closes the control
/// socket. Returns PID 1's exit code.
fn serve(plan: &InitPlan) -> i32 {
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
        return fail("session", std::io::Error::last_os_error());
    }
    // SAFETY: the signalfd was just created and is ours.
    let signals = unsafe { OwnedFd::from_raw_fd(signals) };
    // SAFETY: fcntl on the inherited control socket.
    unsafe { libc::fcntl(CTL_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    report(&Status::Ready);
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
            Ok(Request::Signal { pid, signo })
                if running.contains_key(&pid) && pid > 1 && (1..=64).contains(&signo) =>
            {
                // SAFETY: kill() has no memory effects; pid leads the process group of a
                // command we started and have not reaped.
                unsafe { libc::kill(-pid, signo) };
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
            libc::dup2(status, STATUS_FD);
            libc::fcntl(STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        let code = command(plan);
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
