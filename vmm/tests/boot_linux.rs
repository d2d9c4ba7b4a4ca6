//! Boots of the real guest kernel. Each takes minutes under `kvm_pvm` (guest kernel code
//! is emulated there), so they are `#[ignore]`d here and run by hand:
//!
//! ```text
//! cargo test -p vmm --release --test boot_linux -- --ignored --nocapture
//! ```
//!
//! They need the kernel helper's artifacts (`vmlinux`, `bzImage`, `test-initramfs.cpio`)
//! in `$MXC_TEST_ARTIFACTS` (default `/work/artifacts`); the test init there runs its
//! self-checks, prints `ALL OK` and reboots, which the VMM sees as a guest reset.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use vmm::{ConsoleMode, ExitReason, PvmMode, Stage, Vm, VmConfig};

/// The kernel's command line under kvm_pvm (until `guest_image::KERNEL_CMDLINE_PVM`
/// lands on this branch: the artifacts' README gives the same flags).
const PVM_CMDLINE: &str = "clearcpuid=xsave,popcnt,cx16,sse4_2,aes,avx,avx2,rdrand,rdseed,\
rdpid,smap,smep,umip,pku,fsgsbase,erms,fsrm,pcid,invpcid,clflushopt,clwb \
mxc_pvm_syscall mxc_pvm_nofwait mxc_pvm_noint3test";
const BASE_CMDLINE: &str = "tsc=reliable no_timer_check mitigations=off";
/// Far above the ~2 minutes a boot takes on a busy kvm_pvm host.
const BOOT_LIMIT: Duration = Duration::from_secs(600);

fn artifact(name: &str) -> PathBuf {
    let dir = std::env::var_os("MXC_TEST_ARTIFACTS").unwrap_or_else(|| "/work/artifacts".into());
    let path = PathBuf::from(dir).join(name);
    assert!(
        path.exists(),
        "{} is missing: build the guest kernel artifacts first",
        path.display()
    );
    path
}

/// Boot `kernel` with the test initramfs and the console in a file; return the report
/// and the console text.
fn boot(kernel: &str, name: &str) -> (vmm::VmExitReport, String) {
    let console = std::env::temp_dir().join(format!("mxc-boot-{name}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&console);
    let mut config = VmConfig::new(artifact(kernel), 128, 1);
    config.initrd = Some(artifact("test-initramfs.cpio"));
    config.console = ConsoleMode::File(console.clone());
    config.cmdline_extra = BASE_CMDLINE.into();
    config.pvm = PvmMode::Auto;
    config.pvm_cmdline = PVM_CMDLINE.into();
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
#[ignore = "boots the real kernel: ~2 minutes under kvm_pvm; run by hand with --ignored"]
fn vmlinux_boots_through_pvh_to_init_and_resets() {
    let (report, console) = boot("vmlinux", "pvh");

    assert_eq!(report.reason, ExitReason::GuestReset);
    assert!(console.contains("Run /init as init process"), "no /init");
    assert!(console.contains("ALL OK"), "the test init's checks failed");
    let stages: Vec<Stage> = report.boot_timeline.iter().map(|(s, _)| *s).collect();
    assert!(stages.contains(&Stage::FirstGuestExit));
    assert_eq!(stages.last(), Some(&Stage::VmGone));
}

#[test]
#[ignore = "boots the real kernel from a bzImage: ~3 minutes under kvm_pvm (emulated decompressor)"]
fn bzimage_boots_through_the_64_bit_entry() {
    let (report, console) = boot("bzImage", "bzimage");

    assert!(
        console.contains("Linux version"),
        "the kernel did not start"
    );
    assert!(console.contains("Run /init as init process"), "no /init");
    assert_eq!(report.reason, ExitReason::GuestReset);
}
