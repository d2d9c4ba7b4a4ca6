//! Helpers for the end-to-end tests: find the `mxc-vm` binary, run it, make temp dirs.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! (Test support code: panicking on a broken test environment is the point.)

pub mod escape;
pub mod leaks;
pub mod net;
pub mod serve;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Fails the test, saying why, when /dev/kvm cannot be opened: the microVM tests never
/// skip.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("/dev/kvm is not usable ({e}): the microVM tests need KVM");
    }
}

/// The `mxc-vm` binary under test: `$MXC_VM_BIN`, else the one cargo built next to this
/// test executable (`cargo test --workspace` builds it).
pub fn mxc_vm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MXC_VM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("mxc-vm");
    assert!(
        bin.is_file(),
        "{} does not exist: run the tests with `cargo test --workspace` (which builds the \
         mxc-vm binary) or set MXC_VM_BIN",
        bin.display()
    );
    bin
}

/// Run `mxc-vm ARGS`, with stdin closed, and capture everything.
pub fn mxc_vm(args: &[&str]) -> Output {
    Command::new(mxc_vm_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn mxc-vm")
}

/// Like [`mxc_vm`] from a given working directory.
pub fn mxc_vm_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(mxc_vm_bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("spawn mxc-vm")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit code, or -1 when killed by a signal.
pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// A directory removed (recursively) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path =
            std::env::temp_dir().join(format!("mxcvm-test-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }

    /// The path as a &str (test paths are ASCII).
    pub fn s(&self, p: &str) -> String {
        self.join(p).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Host PIDs whose command line contains `marker`.
pub fn pids_with(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(marker) {
                out.push(pid);
            }
        }
    }
    out
}

/// The mount table of this process, for before/after comparisons.
pub fn mount_table() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()
}

/// What a run stopped by a signal left: its exit code, stderr, the pid `mxc-vm` had, and
/// the seconds from the signal to its exit.
#[derive(Debug)]
pub struct Signalled {
    pub code: i32,
    pub stderr: String,
    pub pid: u32,
    pub after_signal: f64,
}

/// Have `cmd` inherit `file` as descriptor `target`, without close-on-exec: what a shell
/// or a careless service leaves open for the programs it starts.
pub fn leave_open(cmd: &mut Command, target: i32, file: std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: dup2() is async-signal-safe; `file` moves into the closure and outlives
    // every fork the closure runs in (dup2 onto the same number clears nothing: the
    // numbers differ, `file` is opened close-on-exec by std).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            if libc::dup2(file.as_raw_fd(), target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Run `mxc-vm ARGS`; once its stdout has printed a line equal to `ready` (or at once
/// when `ready` is `None`, after `delay`), call `before` with its pid, send it `signal`,
/// and wait for it to exit.
/// Panics when it does not print `ready` within `limit`, or outlives the signal by
/// `limit` (it is then killed).
pub fn signal_a_run(
    args: &[&str],
    ready: Option<&str>,
    delay: std::time::Duration,
    signal: i32,
    limit: std::time::Duration,
    before: &dyn Fn(u32),
) -> Signalled {
    use std::io::{BufRead, BufReader, Read};
    use std::sync::mpsc;
    use std::time::Instant;

    let mut cmd = Command::new(mxc_vm_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // As a terminal's foreground job has them: a harness run in the background (the
    // nested lane's init script) would pass SIGINT on ignored, and mxc-vm keeps an
    // inherited ignore.
    // SAFETY: signal() is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            libc::signal(signal, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn mxc-vm");
    let pid = child.id();
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stderr_pipe = child.stderr.take().expect("stderr");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s);
        s
    });
    if let Some(ready) = ready {
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line == ready => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "mxc-vm {args:?} never printed {ready:?}: {}",
                        err_reader.join().unwrap_or_default()
                    );
                }
            }
        }
    }
    std::thread::sleep(delay);
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| before(pid))) {
        let _ = child.kill();
        let _ = child.wait();
        std::panic::resume_unwind(panic);
    }
    // SAFETY: kill() has no memory effects; the pid is our child, not yet reaped.
    unsafe { libc::kill(pid as i32, signal) };
    let sent = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if sent.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mxc-vm {args:?} still ran {limit:?} after signal {signal}: {}",
                err_reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let after_signal = sent.elapsed().as_secs_f64();
    Signalled {
        code: status.code().unwrap_or(-1),
        stderr: err_reader.join().unwrap_or_default(),
        pid,
        after_signal,
    }
}

/// Entries of the system temp dir whose names start with `mxc-vm-<pid>-` (the runtime
/// directories of the mxc-vm process `pid`).
pub fn runtime_dirs_of(pid: u32) -> Vec<String> {
    let prefix = format!("mxc-vm-{pid}-");
    std::fs::read_dir(std::env::temp_dir())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}
