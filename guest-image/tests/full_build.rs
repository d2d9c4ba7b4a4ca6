//! Full image build and boot: builds the kernel from Debian's source (minutes), writes
//! an initramfs whose `/init` is our C self-test (kernel/test/pvm-selftest.c), and
//! boots it in QEMU: under TCG without the PVM flags (the patches must be inert), and
//! under /dev/kvm with the flags when the host's KVM is kvm_pvm.
//!
//! Run with `cargo test -p guest-image --test full_build -- --ignored --nocapture`.
//! The cache lives under the target directory so a second run reuses the kernel.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;

use guest_image::{build, kernel_cmdline, BuildOptions, Progress};

/// CPU features QEMU must hide under kvm_pvm (its emulator lacks their instructions).
const PVM_QEMU_CPU: &str = "host,-arch-capabilities,-xsave,-xsaveopt,-xsavec,-xsaves,-popcnt,\
    -cx16,-avx,-avx2,-f16c,-fma,-rdrand,-rdseed,-rdpid,-smap,-smep,-umip,-pku,-fsgsbase,-erms,\
    -fsrm,-aes,-pclmulqdq,-sse4.2,-pcid,-invpcid,-clflushopt,-clwb,-sha-ni,-vaes,-vpclmulqdq,\
    -movbe,-bmi1,-bmi2,-adx,-abm";

type TestResult = Result<(), Box<dyn Error>>;

fn compile_selftest(out_dir: &Path) -> Result<PathBuf, Box<dyn Error>> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel/test/pvm-selftest.c");
    let binary = out_dir.join("pvm-selftest");
    let status = Command::new("cc")
        .args(["-O2", "-static", "-Wall", "-o"])
        .arg(&binary)
        .arg(&source)
        .status()?;
    if !status.success() {
        return Err(format!("cc {} failed ({status})", source.display()).into());
    }
    Ok(binary)
}

struct Qemu<'a> {
    accel: &'a [&'a str],
    cpu: &'a str,
    machine: &'a str,
}

impl Qemu<'_> {
    fn boot(&self, kernel: &Path, initrd: &Path, cmdline: &str) -> Result<String, Box<dyn Error>> {
        let output = Command::new("timeout")
            .arg("600")
            .arg("qemu-system-x86_64")
            .args(["-M", self.machine])
            .args(self.accel)
            .args(["-cpu", self.cpu, "-m", "128", "-smp", "1"])
            // microvm has no keyboard controller; reboot=k resets through its port 0x64
            // (without it the kernel falls back to a triple fault through INT3, which
            // the kvm_pvm emulator cannot run).
            .args(["-device", "i8042", "-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(cmdline)
            .output()?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        println!("{text}");
        if !output.status.success() {
            return Err(format!("qemu ended with {}", output.status).into());
        }
        Ok(text)
    }
}

#[test]
#[ignore = "builds a Linux kernel from source (5-15 minutes) and boots it in QEMU (about 2 minutes under kvm_pvm)"]
fn build_and_boot_the_image() -> TestResult {
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest-image-full-build");
    std::fs::create_dir_all(&work)?;
    let agent = compile_selftest(&work)?;
    let opts = BuildOptions {
        cache_dir: Some(work.join("cache")),
        agent: Some(agent),
        ..BuildOptions::default()
    };
    let mut last_stage = None;
    let mut report = |p: Progress| {
        if last_stage != Some(p.stage) {
            println!("stage {:?}: {}", p.stage, p.message);
            last_stage = Some(p.stage);
        }
    };

    let image = build(&opts, &mut report)?;
    let again = guest_image::cached(&opts);
    let tcg = Qemu {
        accel: &["-accel", "tcg"],
        cpu: "max",
        machine: "microvm,acpi=off",
    }
    .boot(
        &image.vmlinux,
        &image.initramfs,
        &kernel_cmdline(true, false),
    )?;

    assert_eq!(again.as_ref(), Some(&image));
    assert!(
        tcg.contains("ALL OK"),
        "self-test under TCG without PVM flags failed"
    );
    assert!(
        !tcg.contains("mxc_pvm"),
        "a PVM patch announced itself without its flag"
    );
    Ok(())
}

#[test]
#[ignore = "boots the image built by build_and_boot_the_image under /dev/kvm (kvm_pvm: about 2 minutes)"]
fn boots_under_kvm_pvm_with_the_flags() -> TestResult {
    assert!(
        Path::new("/sys/module/kvm_pvm").exists(),
        "this host's /dev/kvm is not kvm_pvm; the PVM flags are for kvm_pvm only"
    );
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest-image-full-build");
    let opts = BuildOptions {
        cache_dir: Some(work.join("cache")),
        agent: Some(work.join("pvm-selftest")),
        ..BuildOptions::default()
    };
    let image = guest_image::cached(&opts).ok_or("run build_and_boot_the_image first")?;

    let output = Qemu {
        accel: &["-enable-kvm"],
        cpu: PVM_QEMU_CPU,
        machine: "microvm,acpi=off,pit=off,pic=off,rtc=off",
    }
    .boot(
        &image.vmlinux,
        &image.initramfs,
        &kernel_cmdline(true, true),
    )?;

    assert!(
        output.contains("ALL OK"),
        "self-test under kvm_pvm with PVM flags failed"
    );
    assert!(output.contains("mxc_pvm_syscall: finishing SYSCALL from page faults"));
    Ok(())
}
