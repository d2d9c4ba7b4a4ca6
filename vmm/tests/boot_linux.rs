//! Boots of the real guest kernel (the cached `mxc-vm image build` kernel) through our
//! VMM, with an initramfs whose `/init` is the C self-test of our PVM kernel patches
//! (`guest-image/kernel/test/pvm-selftest.c`: raw SYSCALL return registers, syscall
//! restart, signals, fork+exec, ptrace-visible registers, seccomp, AF_VSOCK, /dev/mem
//! MMIO, busybox). It prints `ALL OK` and reboots, which the VMM sees as a guest reset.
//!
//! Each boot takes minutes under kvm_pvm (guest kernel code is emulated), the bzImage
//! one longer (its decompressor runs emulated too). They never skip: without /dev/kvm
//! or a built image they fail and say why.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use vmm::{ConsoleMode, ExitReason, PvmMode, Stage, Vm, VmConfig};

/// Far above what a boot takes on a busy kvm_pvm host.
const BOOT_LIMIT: Duration = Duration::from_secs(1500);

fn image() -> guest_image::Image {
    guest_image::cached(&guest_image::BuildOptions::default())
        .expect("no guest image is cached: run `mxc-vm image build` (scripts/test.sh does) first")
}

/// An initramfs with the self-test as /init and busybox, in the test's temp dir.
fn selftest_initramfs(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("selftest-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let source =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-image/kernel/test/pvm-selftest.c");
    let binary = dir.join("pvm-selftest");
    let status = Command::new("cc")
        .args(["-O2", "-static", "-Wall", "-o"])
        .arg(&binary)
        .arg(&source)
        .status()
        .expect("cc");
    assert!(status.success(), "compiling {} failed", source.display());
    let init = std::fs::read(&binary).unwrap();
    let busybox_path = Path::new(guest_image::DEFAULT_BUSYBOX);
    let busybox = std::fs::read(busybox_path).expect("busybox-static is installed");
    let contents = guest_image::initramfs::InitramfsContents {
        init: &init,
        busybox: Some(&busybox),
        applets: guest_image::initramfs::busybox_applets(busybox_path).unwrap(),
        extra_files: vec![],
    };
    let out = dir.join("initramfs.cpio");
    let file = std::fs::File::create(&out).unwrap();
    guest_image::initramfs::write_initramfs(file, &contents).unwrap();
    out
}

/// Boot `kernel` with the self-test initramfs and the console in a file.
fn boot(kernel: &Path, name: &str) -> (vmm::VmExitReport, String) {
    assert!(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
        "/dev/kvm is not usable: these tests boot a real kernel"
    );
    let console = std::env::temp_dir().join(format!("mxc-boot-{name}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&console);
    let mut config = VmConfig::new(kernel, 128, 1);
    config.initrd = Some(selftest_initramfs(name));
    config.console = ConsoleMode::File(console.clone());
    config.cmdline_extra = guest_image::kernel_cmdline(guest_image::GuestConsole::Shown, false);
    config.pvm = PvmMode::Auto;
    config.pvm_cmdline = guest_image::KERNEL_CMDLINE_PVM.into();
    let vm = Vm::new(config).unwrap();
    let handle = vm.handle();
    let (done, finished) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(BOOT_LIMIT) {
            handle.kill();
        }
    });
    let report = vm.run().unwrap();
    drop(done);
    watchdog.join().unwrap();
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let _ = std::fs::remove_file(&console);
    eprintln!("{text}\n{report:#?}");
    (report, text)
}

#[test]
fn vmlinux_boots_through_pvh_and_the_pvm_selftest_passes() {
    let (report, console) = boot(&image().vmlinux, "pvh");

    assert_eq!(report.reason, ExitReason::GuestReset);
    assert!(console.contains("Run /init as init process"), "no /init");
    assert!(console.contains("ALL OK"), "the self-test's checks failed");
    let stages: Vec<Stage> = report.boot_timeline.iter().map(|(s, _)| *s).collect();
    assert!(stages.contains(&Stage::FirstGuestExit));
    assert_eq!(stages.last(), Some(&Stage::VmGone));
}

#[test]
fn bzimage_boots_through_the_64_bit_entry() {
    let bzimage = image().bzimage.expect("the image has a bzImage");
    let (report, console) = boot(&bzimage, "bzimage");

    assert!(
        console.contains("Linux version"),
        "the kernel did not start"
    );
    assert!(console.contains("ALL OK"), "the self-test's checks failed");
    assert_eq!(report.reason, ExitReason::GuestReset);
}
