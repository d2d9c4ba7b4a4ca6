//! Helpers for the end-to-end tests: find the `mxc-vm` binary, run it, make temp dirs.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! (Test support code: panicking on a broken test environment is the point.)

pub mod net;

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
