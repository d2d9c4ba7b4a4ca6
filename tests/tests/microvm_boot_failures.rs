//! A microVM boot that fails ends with one clear line on stderr — what happened, the
//! boot stage reached, the last lines of the guest console — exit 125, and nothing left
//! behind (no VMM process, no runtime directory with its sockets).
//!
//! Three broken guests: a kernel that triple-faults at its first instruction, our kernel
//! with an initramfs that has no agent (no init at all), and one whose init never sends
//! Ready. They run on whatever KVM the host has (kvm_pvm here, SVM in the nested lane).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use guest_image::cpio::{CpioWriter, Meta};
use tests::{code, mxc_vm_bin, pids_with, require_kvm, stderr, TempDir};

/// The built guest image's kernel (built by `mxc-vm image build`, which test.sh runs).
fn guest_kernel() -> PathBuf {
    let image = guest_image::cached(&guest_image::BuildOptions::default())
        .expect("the guest image is built (run `mxc-vm image build`)");
    image.vmlinux
}

fn under_pvm() -> bool {
    !vmm::hypervisor::host_flavour().is_hardware()
}

const DIR: Meta = Meta {
    mode: 0o755,
    uid: 0,
    gid: 0,
    mtime: 0,
};

/// An initramfs with `/dev/console` and, when given, an executable `/init` and
/// `/bin/busybox` (the host's static busybox).
fn initramfs(path: &Path, init: Option<&str>) {
    let mut w = CpioWriter::new(Vec::new());
    w.directory("dev", DIR).unwrap();
    w.char_device("dev/console", Meta { mode: 0o600, ..DIR }, 5, 1)
        .unwrap();
    if let Some(script) = init {
        w.directory("bin", DIR).unwrap();
        let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed");
        w.file("bin/busybox", DIR, &busybox).unwrap();
        w.file("init", DIR, script.as_bytes()).unwrap();
    }
    std::fs::write(path, w.finish().unwrap()).unwrap();
}

/// Run `mxc-vm run --backend microvm ARGS -- /bin/true`, expecting a boot failure; check
/// exit 125 and that nothing of the run is left. Returns stderr.
fn failing_run(args: &[&str]) -> String {
    require_kvm();
    let child = Command::new(mxc_vm_bin())
        .args(["run", "--backend", "microvm", "--guest-system", "none"])
        .args(args)
        .args(["--", "/bin/true"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mxc-vm");
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(code(&out), 125, "stderr: {err}");
    // The runtime directory is /tmp/mxc-vm-<pid>-<nanos>: gone, and no VMM runs from it.
    let prefix = format!("mxc-vm-{pid}-");
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(pids_with(&prefix).is_empty(), "a VMM of the run survived");
    err
}

/// A boot of `kernel` and `initrd` that ends before the agent answers: one line naming
/// that, and the kernel running as the stage reached. Returns stderr.
fn failing_boot(kernel: &Path, initrd: &Path) -> String {
    let err = failing_run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
    ]);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("the VM ended before the agent answered"),
        "{err}"
    );
    assert!(err.contains("boot reached first_guest_exit"), "{err}");
    err
}

#[test]
fn a_triple_faulting_kernel_is_reported_with_its_stage() {
    let dir = TempDir::new("triple");
    let kernel = dir.join("vmlinux");
    std::fs::write(
        &kernel,
        vmm::boot::tiny::elf_kernel(&vmm::boot::tiny::triple_fault(), true),
    )
    .unwrap();
    let initrd = dir.join("initrd");
    initramfs(&initrd, None);

    let err = failing_boot(&kernel, &initrd);

    assert!(err.contains("triple fault"), "{err}");
}

#[test]
fn a_kernel_without_the_agent_shows_the_guest_panic() {
    let dir = TempDir::new("noagent");
    let initrd = dir.join("initrd");
    initramfs(&initrd, None);
    let kernel = guest_kernel();

    let err = failing_boot(&kernel, &initrd);

    assert!(err.contains("Kernel panic"), "the console tail: {err}");
}

#[test]
fn a_guest_that_never_sends_ready_times_out_with_its_console() {
    let dir = TempDir::new("noready");
    let initrd = dir.join("initrd");
    initramfs(
        &initrd,
        Some(
            "#!/bin/busybox sh\n\
             echo 'test-init: up, and never ready'\n\
             exec /bin/busybox sleep 100000\n",
        ),
    );
    let kernel = guest_kernel();
    // Long enough for the kernel to reach /init (20-30 s under kvm_pvm, 3-4x that here).
    let timeout = if under_pvm() { "90s" } else { "30s" };

    let quiet = failing_run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--boot-timeout",
        timeout,
    ]);
    assert_eq!(quiet.trim_end().lines().count(), 1, "one line: {quiet}");
    assert!(quiet.contains("did not send Ready within "), "{quiet}");
    assert!(quiet.contains("boot reached first_guest_exit"), "{quiet}");
    assert!(quiet.contains("test-init: up, and never ready"), "{quiet}");

    let verbose = failing_run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--boot-timeout",
        timeout,
        "--verbose",
    ]);
    assert!(verbose.contains("guest console:\n"), "{verbose}");
    assert!(
        verbose.contains("test-init: up, and never ready"),
        "{verbose}"
    );
}
