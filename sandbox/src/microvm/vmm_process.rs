//! The VMM as a child process: `mxc-vmm __vmm CONFIG REPORT` (or `mxc-vm __vmm ...`, the
//! same code) boots the VM described by the JSON file CONFIG and, when the VM ends, writes
//! its [`vmm::VmExitReport`] to REPORT.
//!
//! A separate process keeps the VMM's threads, memory and file descriptors away from
//! the caller, lets the caller kill it outright, and gives the boot benchmark a real
//! "process start".

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::SandboxError;

/// `argv[1]` that makes the binary run as the VMM.
pub const VMM_ARG: &str = "__vmm";

/// The VMM-only executable, installed beside `mxc-vm` (the `host-cli` package builds
/// both): it holds the VMM and nothing of the CLI, the policy proxy or the process
/// sandbox, so it has fewer pages to fault in and relocate when it starts (~0.4-0.6 ms
/// sooner to the VM's setup under kvm_pvm than `mxc-vm __vmm`, measured with
/// `bench boot --snapshot --until first-entry`) and carries less code into the process
/// that faces the guest.
pub const VMM_BINARY: &str = "mxc-vmm";

/// The program that runs a VMM: [`VMM_BINARY`] beside `exe` (an mxc-vm executable;
/// default this process's) when it is there, else `exe` itself.
pub fn vmm_program(exe: Option<&Path>) -> PathBuf {
    let exe = exe
        .map(Path::to_path_buf)
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
    let lean = exe.with_file_name(VMM_BINARY);
    if lean.is_file() {
        lean
    } else {
        exe
    }
}

/// A VMM that exited while the guest was booting.
#[derive(Debug)]
pub(crate) struct EarlyExit {
    /// Why, in words (the exit reason and the VMM log's last lines).
    pub what: String,
    /// The VMM's report, when it wrote one.
    pub report: Option<vmm::VmExitReport>,
}

#[derive(Debug)]
pub(crate) struct VmmProcess {
    child: Child,
    report_path: PathBuf,
    log_path: PathBuf,
    /// The VMM jailed itself ([`vmm::jail`]).
    jailed: bool,
    /// Its cgroup, removed once the VMM is gone (fields drop after `drop`).
    _cgroup: Option<std::sync::Arc<crate::limits::SandboxCgroup>>,
    /// A signal to mxc-vm kills the VMM, and with it the VM ([`crate::interrupt`]).
    _root: crate::interrupt::Registered,
}

/// The files of one VMM run, in its runtime directory.
#[derive(Debug, Clone)]
pub struct VmmFiles {
    /// The VM's configuration (JSON), the VMM's first argument.
    pub config: PathBuf,
    /// Where the VMM writes its [`vmm::VmExitReport`] when the VM ends.
    pub report: PathBuf,
    /// The VMM's own log (its stderr) unless the console is shown.
    pub log: PathBuf,
    /// Whether the VMM jails itself ([`vmm::VmConfig::jail`]).
    pub jailed: bool,
    /// The pids cgroup a jailed VMM joins (v1 first thing, v2 as it creates its VM:
    /// `vmm_main`); removed when dropped.
    pub cgroup: Option<std::sync::Arc<crate::limits::SandboxCgroup>>,
}

/// The one way to launch the VMM: writes `config` (with the start clock read now) into
/// `runtime` and returns the command that boots it ([`vmm_program`] of `binary`, with
/// [`VMM_ARG`]): stdout and stderr to the terminal with `console`, else stderr to
/// the log. Its standard input is a socket that carries the VMM's namespaces
/// ([`vmm::privileges::EmptyNamespaces::send`]) when this process has them, else
/// nothing. The command runs no code of ours between fork and exec, so the standard
/// library starts it with `posix_spawn` (no copy of this process's page tables: about
/// 0.2–0.4 ms of a VMM's setup here, more from a larger process); the VMM itself asks to be killed when its parent dies and
/// checks it still has the parent that started it. The caller spawns it.
pub fn vmm_command(
    config: &vmm::VmConfig,
    runtime: &Path,
    console: bool,
    binary: Option<&Path>,
) -> Result<(Command, VmmFiles), SandboxError> {
    let mut files = VmmFiles {
        config: runtime.join("vmm.json"),
        report: runtime.join("report.json"),
        log: runtime.join("vmm.log"),
        jailed: crate::host::vmm_jailed(),
        cgroup: None,
    };
    let stdin = match vmm_namespaces() {
        Some(namespaces) => {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair()
                .map_err(|e| SandboxError::io("a socket for the VMM's namespaces", e))?;
            namespaces
                .send(&ours)
                .map_err(|e| SandboxError::io("passing the VMM its namespaces", e))?;
            Some(theirs)
        }
        None => None,
    };
    let mut config = config.clone();
    config.namespaces_joined = stdin.is_some();
    config.parent_pid = Some(std::process::id());
    config.start_monotonic_ns = Some(crate::stages::now_ns());
    if files.jailed {
        let root = runtime.join(JAIL_DIR);
        std::fs::create_dir(&root)
            .map_err(|e| SandboxError::io(format!("creating {}", root.display()), e))?;
        config.jail = Some(root);
        // The jail binds each file at its path, which must be absolute (`--kernel
        // ./vmlinux` is relative to our working directory, not the jail's root).
        config.kernel = absolute(&config.kernel)?;
        if let Some(initrd) = &config.initrd {
            config.initrd = Some(absolute(initrd)?);
        }
        if let Some(vmm::SnapshotMode::SaveAtReady(dir) | vmm::SnapshotMode::Restore(dir)) =
            &mut config.snapshot
        {
            *dir = absolute(dir)?;
        }
        files.cgroup = vmm_cgroup(runtime)?.map(std::sync::Arc::new);
        config.cgroup = files.cgroup.as_ref().map(|c| c.join_file());
    }
    // A restoring VMM may not write its snapshot (its jail binds it read-only; Landlock
    // grants it only reading): the record of the memory's check, which spares each
    // restore a read of the whole file, is left here. A failure is the VMM's to report
    // (it checks again, in full).
    if let Some(vmm::SnapshotMode::Restore(dir)) = &config.snapshot {
        let _ = vmm::snapshot::verify_memory(dir);
    }
    let json = serde_json::to_vec(&config).map_err(|e| SandboxError::setup("vmm config", e))?;
    std::fs::write(&files.config, json)
        .map_err(|e| SandboxError::io(format!("writing {}", files.config.display()), e))?;
    let log = std::fs::File::create(&files.log)
        .map_err(|e| SandboxError::io(format!("creating {}", files.log.display()), e))?;
    let mut cmd = Command::new(vmm_program(binary));
    // The VMM reads nothing from its environment: it gets none of ours (a token in the
    // environment of whoever ran mxc-vm is no VMM's to hold).
    cmd.arg(VMM_ARG)
        .arg(&files.config)
        .arg(&files.report)
        .env_clear();
    match stdin {
        Some(socket) => cmd.stdin(Stdio::from(std::os::fd::OwnedFd::from(socket))),
        None => cmd.stdin(Stdio::null()),
    };
    if console {
        cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
    } else {
        cmd.stdout(Stdio::null()).stderr(log);
    }
    Ok((cmd, files))
}

/// The directory of a runtime directory on which a jailed VMM mounts its root.
const JAIL_DIR: &str = "jail";

/// `path` made absolute against our working directory, symbolic links kept (a VM's
/// snapshot names its kernel and initramfs by the paths its configuration gave).
fn absolute(path: &Path) -> Result<PathBuf, SandboxError> {
    std::path::absolute(path)
        .map_err(|e| SandboxError::io(format!("resolving {}", path.display()), e))
}

/// How many tasks (threads) a jailed VMM's cgroup holds at most: its main thread, one
/// per vCPU (64 at most), the device loop, one fs worker per share, the control thread,
/// with room to spare. A VMM a guest drove to start more gets `EAGAIN`.
pub const VMM_TASKS: u32 = 256;

/// A pids cgroup of its own for the VMM of `runtime` (`mxc-vm-<id>-vmm`, at most
/// [`VMM_TASKS`] tasks), where this host lets mxc-vm make cgroups (`None` where only
/// rlimits are available: `backends` says which).
fn vmm_cgroup(runtime: &Path) -> Result<Option<crate::limits::SandboxCgroup>, SandboxError> {
    static ENFORCEMENT: std::sync::OnceLock<crate::limits::Enforcement> =
        std::sync::OnceLock::new();
    let enforcement = ENFORCEMENT.get_or_init(crate::limits::detect);
    // `mxc-vm-<pid>-<tag>` like the runtime directory (which a sandbox's is), so that a
    // later run removes it if this process dies without doing so.
    let dir = runtime.file_name().and_then(|n| n.to_str()).unwrap_or("vm");
    let name = match dir.strip_prefix("mxc-vm-") {
        Some(name) => name.to_owned(),
        None => format!("{}-{dir}", std::process::id()),
    };
    let limits = policy::Limits {
        pids: Some(VMM_TASKS),
        ..Default::default()
    };
    crate::limits::SandboxCgroup::for_sandbox(enforcement, &format!("{name}-vmm"), &limits)
        .map_err(|e| SandboxError::setup("the VMM's cgroup", e))
}

/// The empty network, IPC and UTS namespaces this process starts its VMMs in, made on
/// first use (run as root; `None` otherwise, or when they cannot be made: then each VMM
/// makes its own). One set for all the VMMs of this process: making and tearing down a
/// network and an IPC namespace per VMM cost about 4 ms of each VMM run here (0.5 ms of
/// its setup, the rest at its exit); joining them costs almost nothing.
/// [`prepare_vmm_namespaces`] makes them ahead, beside other work.
fn vmm_namespaces() -> Option<&'static vmm::privileges::EmptyNamespaces> {
    static NAMESPACES: std::sync::OnceLock<Option<vmm::privileges::EmptyNamespaces>> =
        std::sync::OnceLock::new();
    NAMESPACES
        .get_or_init(|| {
            // SAFETY: geteuid() has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                return None;
            }
            match vmm::privileges::EmptyNamespaces::new() {
                Ok(namespaces) => Some(namespaces),
                Err(e) => {
                    tracing::debug!("no shared namespaces for the VMMs: {e}");
                    None
                }
            }
        })
        .as_ref()
}

/// Make the VMMs' namespaces on a thread of its own now, so that the first VMM started
/// finds them made.
pub(crate) fn prepare_vmm_namespaces() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let _ = std::thread::Builder::new()
            .name("mxc-ns-prep".into())
            .spawn(|| {
                vmm_namespaces();
            });
    });
}

impl VmmProcess {
    pub(crate) fn spawn(
        config: &vmm::VmConfig,
        runtime: &Path,
        console: bool,
        binary: Option<&Path>,
    ) -> Result<Self, SandboxError> {
        let (mut cmd, files) = vmm_command(config, runtime, console, binary)?;
        let child = cmd
            .spawn()
            .map_err(|e| SandboxError::io("starting the VMM process", e))?;
        Ok(Self {
            _root: crate::interrupt::Registered::new(child.id() as i32),
            child,
            report_path: files.report,
            log_path: files.log,
            jailed: files.jailed,
            _cgroup: files.cgroup,
        })
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Whether the VMM jailed itself: a share it serves must be mounted into its jail.
    pub(crate) fn jailed(&self) -> bool {
        self.jailed
    }

    /// `Some` when the VMM has already exited (during boot that is a failure): why, and
    /// its report when it wrote one.
    pub(crate) fn exited_early(&mut self) -> Option<EarlyExit> {
        let status = self.child.try_wait().ok().flatten()?;
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let report = self.read_report();
        let reason = report
            .as_ref()
            .map(|r| r.reason.to_string())
            .unwrap_or_else(|| format!("VMM {status}"));
        Some(EarlyExit {
            what: format!(
                "the VM ended before the agent answered ({reason}){}{}",
                if tail.is_empty() { "" } else { "; VMM log: " },
                tail.join(" | ")
            ),
            report,
        })
    }

    /// Ask the VMM to stop (SIGTERM: it ends the VM and writes its report), kill it if
    /// it has not exited within `grace`, and return the report.
    pub(crate) fn terminate(&mut self, grace: Duration) -> Option<vmm::VmExitReport> {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own, not yet reaped child: the pid cannot have been
            // reused.
            unsafe {
                libc::kill(self.pid(), libc::SIGTERM);
            }
        }
        self.wait_or_kill(grace)
    }

    fn read_report(&self) -> Option<vmm::VmExitReport> {
        let bytes = std::fs::read(&self.report_path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Wait up to `grace` for the VMM to exit on its own, then kill it. Returns its report.
    pub(crate) fn wait_or_kill(&mut self, grace: Duration) -> Option<vmm::VmExitReport> {
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        self.read_report()
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Be killed when the parent dies, and make sure it has not died already: `parent` is
/// the process that started us (the one whose death should end us).
fn stay_with_parent(parent: Option<u32>) -> Result<(), String> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes integers and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(format!(
            "cannot ask to die with the parent: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: getppid() has no preconditions.
    let now = unsafe { libc::getppid() };
    match parent {
        Some(parent) if u32::try_from(now).ok() != Some(parent) => Err(format!(
            "the process that started this VMM ({parent}) is gone"
        )),
        _ => Ok(()),
    }
}

/// [`vmm::privileges::join_passed`] on standard input, then standard input from
/// /dev/null.
fn join_passed_namespaces() -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: fd 0 is the socket our parent gave us as standard input; the ManuallyDrop
    // keeps it from being closed here (it is replaced below).
    let socket =
        std::mem::ManuallyDrop::new(unsafe { std::os::unix::net::UnixStream::from_raw_fd(0) });
    vmm::privileges::join_passed(&socket)?;
    let null = std::fs::File::open("/dev/null")?;
    // SAFETY: dup2 onto fd 0 replaces the socket; both descriptors are valid.
    if unsafe { libc::dup2(null.as_raw_fd(), 0) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Entry point of `mxc-vm __vmm CONFIG REPORT`. Returns the process exit code.
pub fn vmm_main(args: &[std::ffi::OsString]) -> i32 {
    // Nothing it inherited beyond 0, 1 and 2 stays open (crate::fds): a VMM taken over by
    // its guest finds no descriptor its parent's parent left open.
    if let Err(e) = crate::fds::close_from_3() {
        eprintln!("mxc-vm vmm: cannot close inherited descriptors: {e}");
        return 1;
    }
    let (Some(config_path), Some(report_path)) = (args.first(), args.get(1)) else {
        eprintln!("usage: mxc-vm {VMM_ARG} CONFIG REPORT");
        return 2;
    };
    let mut config: vmm::VmConfig = match std::fs::read(config_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "mxc-vm vmm: bad config {}: {e}",
                Path::new(config_path).display()
            );
            return 2;
        }
    };
    if let Err(e) = stay_with_parent(config.parent_pid) {
        eprintln!("mxc-vm vmm: {e}");
        return 1;
    }
    // The namespaces our parent made for its VMMs come on standard input, which then
    // reads from /dev/null.
    if config.namespaces_joined {
        if let Err(e) = join_passed_namespaces() {
            eprintln!("mxc-vm vmm: cannot join the namespaces passed on standard input: {e}");
            return 1;
        }
    }
    // Run as root, the VMM leaves the host's network, IPC and UTS namespaces before it
    // has a thread or a guest (vmm::privileges).
    if let Err(e) = vmm::privileges::leave_host_namespaces(config.namespaces_joined) {
        eprintln!("mxc-vm vmm: cannot leave the host's network, IPC and UTS namespaces: {e}");
        return 1;
    }
    // Its cgroup (made by its parent), while it sees /sys. A cgroup v1 `tasks` file moves
    // the thread that writes `0` to it without taking the global lock that moving a whole
    // process takes: it joins now, while it is one thread (every thread it starts later
    // is in the cgroup too). A v2 `cgroup.procs` file is joined below, meanwhile.
    let cgroup = match &config.cgroup {
        Some(path) => {
            let v1 = path.file_name() == Some(std::ffi::OsStr::new("tasks"));
            let opened = std::fs::OpenOptions::new().write(true).open(path);
            let joined = opened.and_then(|file| {
                if v1 {
                    use std::io::Write;
                    (&file).write_all(b"0").map(|()| None)
                } else {
                    Ok(Some((file, path.clone())))
                }
            });
            match joined {
                Ok(later) => later,
                Err(e) => {
                    eprintln!("mxc-vm vmm: cannot join its cgroup {}: {e}", path.display());
                    return 1;
                }
            }
        }
        None => None,
    };
    // While this thread confines the process (jail or Landlock, seccomp), another joins
    // a v2 cgroup and creates the (empty) VM: both wait in the kernel, mostly for RCU
    // grace periods (moving a process into a cgroup waits for one; so does KVM when it
    // puts the VM's worker thread into its creator's cgroups, unless it comes right
    // after), which this overlaps with the confinement's work (in the nested
    // hardware-KVM lane they were ~20 ms of each VMM's setup, one after the other). That
    // thread runs nothing but this, and has ended before the VM is built further.
    let creating = match create_vm_meanwhile(cgroup, config.start_monotonic_ns) {
        Ok(thread) => thread,
        Err(e) => {
            eprintln!("mxc-vm vmm: cannot start a thread: {e}");
            return 1;
        }
    };
    // What its VM needs of the host's files (vmm::jail::plan): its runtime directory
    // (where its report goes), and what the configuration names.
    let report_dir = Path::new(report_path).parent().unwrap_or(Path::new("/"));
    let runtime = config
        .jail
        .as_deref()
        .and_then(Path::parent)
        .unwrap_or(report_dir);
    let binds = vmm::jail::plan(&config, &[runtime, report_dir]);
    let pooled = config.control_socket.is_some();
    let slots = if pooled {
        usize::from(config.share_slots)
    } else {
        0
    };
    // Asked to (run as root), it moves into a root that holds only that (vmm::jail),
    // while it can still mount.
    if let Some(root) = &config.jail {
        match vmm::jail::enter(root, &binds, slots) {
            // What the jail covered of each share stays hidden from its guest by inode.
            Ok(hidden) => {
                for share in &mut config.shares {
                    if let Some(covered) = hidden.iter().find(|c| c.path == share.host_path) {
                        share.hidden_inodes.extend_from_slice(&covered.inodes);
                    }
                }
            }
            Err(e) => {
                eprintln!("mxc-vm vmm: {}", crate::error_chain(&e));
                return 1;
            }
        }
    }
    // Not jailed (not run as root), Landlock allows it only that: its file boundary.
    // (A warm pool's VMM is told its shares' host paths only later: it stays without.)
    if config.jail.is_none() && !pooled {
        if let Err(e) = vmm::jail::make_writable_dirs(&binds) {
            eprintln!("mxc-vm vmm: {}", crate::error_chain(&e));
            return 1;
        }
        match crate::landlock::restrict_vmm(&binds) {
            Ok(None) => {}
            Ok(Some(warning)) => {
                eprintln!("mxc-vm vmm: {warning}: its file access is not confined")
            }
            Err(e) => {
                eprintln!("mxc-vm vmm: landlock: {}", crate::error_chain(&e));
                return 1;
            }
        }
    }
    // No program, mount, namespace, BPF, ... from this process from here on
    // (vmm::seccomp), before the VM exists and starts threads: every thread inherits
    // it. Each VMM thread then confines itself to the calls its kind needs once it
    // starts its work (vmm::seccomp::threads); the report file is opened now, as the
    // boot vCPU's thread, which ends the VM, may not open files.
    if let Err(e) = vmm::seccomp::install() {
        eprintln!("mxc-vm vmm: {}", crate::error_chain(&e));
        return 1;
    }
    vmm::seccomp::threads::enable();
    let mut report_file = match std::fs::File::create(report_path) {
        Ok(file) => file,
        Err(e) => {
            eprintln!(
                "mxc-vm vmm: cannot create {}: {e}",
                Path::new(report_path).display()
            );
            return 1;
        }
    };
    let created = match creating.join() {
        Ok(Ok(created)) => created,
        Ok(Err(e)) => {
            eprintln!("mxc-vm vmm: {e}");
            return 1;
        }
        Err(_) => {
            eprintln!("mxc-vm vmm: the thread creating the VM panicked");
            return 1;
        }
    };
    let vm = match vmm::Vm::build(config, created) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("mxc-vm vmm: {}", crate::error_chain(&e));
            return 1;
        }
    };
    let handle = vm.handle();
    if let Err(e) = vmm::kill_on_termination_signals(&handle) {
        eprintln!("mxc-vm vmm: signal handlers: {e}");
    }
    match vm.run() {
        Ok(report) => {
            if let Ok(json) = serde_json::to_vec(&report) {
                use std::io::Write;
                let _ = report_file.write_all(&json);
            }
            0
        }
        Err(e) => {
            eprintln!("mxc-vm vmm: {}", crate::error_chain(&e));
            1
        }
    }
}

/// On a thread of its own: move this process into the cgroup whose `cgroup.procs` is
/// `cgroup` (all its threads), then create the VM ([`vmm::Vm::create`]; KVM's move of
/// its worker thread comes right after ours and does not wait for another grace period).
fn create_vm_meanwhile(
    cgroup: Option<(std::fs::File, PathBuf)>,
    start_monotonic_ns: Option<u64>,
) -> std::io::Result<std::thread::JoinHandle<Result<vmm::Created, String>>> {
    std::thread::Builder::new()
        .name("mxc-vm-create".into())
        .spawn(move || {
            if let Some((mut file, path)) = cgroup {
                use std::io::Write;
                file.write_all(std::process::id().to_string().as_bytes())
                    .map_err(|e| format!("cannot join its cgroup {}: {e}", path.display()))?;
            }
            vmm::Vm::create(start_monotonic_ns).map_err(|e| crate::error_chain(&e))
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_vmm_runs_as_the_mxc_vmm_beside_mxc_vm_when_there_is_one() {
        let dir = std::env::temp_dir().join(format!("mxc-vmm-program-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("mxc-vm");
        std::fs::write(&exe, b"").unwrap();

        assert_eq!(vmm_program(Some(&exe)), exe, "no mxc-vmm: mxc-vm __vmm");
        std::fs::write(dir.join(VMM_BINARY), b"").unwrap();
        assert_eq!(vmm_program(Some(&exe)), dir.join(VMM_BINARY));
        // A directory of that name is no program.
        std::fs::remove_file(dir.join(VMM_BINARY)).unwrap();
        std::fs::create_dir(dir.join(VMM_BINARY)).unwrap();
        assert_eq!(vmm_program(Some(&exe)), exe);

        std::fs::remove_dir_all(&dir).unwrap();
    }
}
