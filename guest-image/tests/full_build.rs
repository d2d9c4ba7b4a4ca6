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

use guest_image::{build, kernel_cmdline, BuildOptions, Image, Progress};

/// CPU features QEMU must hide under kvm_pvm (its emulator lacks their instructions).
const PVM_QEMU_CPU: &str = "host,-arch-capabilities,-xsave,-xsaveopt,-xsavec,-xsaves,-popcnt,\
    -cx16,-avx,-avx2,-f16c,-fma,-rdrand,-rdseed,-rdpid,-smap,-smep,-umip,-pku,-fsgsbase,-erms,\
    -fsrm,-aes,-pclmulqdq,-sse4.2,-pcid,-invpcid,-clflushopt,-clwb,-sha-ni,-vaes,-vpclmulqdq,\
    -movbe,-bmi1,-bmi2,-adx,-abm";

type TestResult = Result<(), Box<dyn Error>>;

fn compile_selftest(out_dir: &Path) -> Result<PathBuf, Box<dyn Error>> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel/test/pvm-selftest.c");
    let binary = out_dir.join("pvm-selftest");
    // Both tests compile it; each writes its own file and renames it into place.
    let staging = out_dir.join(format!("pvm-selftest.{:?}", std::thread::current().id()));
    let status = Command::new("cc")
        .args(["-O2", "-static", "-Wall", "-o"])
        .arg(&staging)
        .arg(&source)
        .status()?;
    if !status.success() {
        return Err(format!("cc {} failed ({status})", source.display()).into());
    }
    std::fs::rename(&staging, &binary)?;
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

/// Builds the image (or finds it built: [`build`] locks the cache, so a second test
/// running at the same time waits and then reuses the result).
fn image() -> Result<Image, Box<dyn Error>> {
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
    if guest_image::cached(&opts).as_ref() != Some(&image) {
        return Err("cached() does not return the image build() returned".into());
    }
    Ok(image)
}

#[test]
#[ignore = "builds a Linux kernel from source (5-25 minutes), then boots it in QEMU TCG"]
fn boots_under_tcg_without_the_pvm_flags() -> TestResult {
    let image = image()?;
    let qemu = Qemu {
        accel: &["-accel", "tcg"],
        cpu: "max",
        machine: "microvm,acpi=off",
    };

    let output = qemu.boot(
        &image.vmlinux,
        &image.initramfs,
        &kernel_cmdline(true, false),
    )?;

    assert!(
        output.contains("ALL OK"),
        "self-test under TCG without PVM flags failed"
    );
    assert!(
        !output.contains("mxc_pvm"),
        "a PVM patch acted without its flag"
    );
    Ok(())
}

#[test]
#[ignore = "builds a Linux kernel from source (5-25 minutes), then boots it on /dev/kvm (about 1-2 minutes under kvm_pvm)"]
fn boots_under_kvm_with_the_flags_it_needs() -> TestResult {
    let image = image()?;
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let qemu = Qemu {
        accel: &["-enable-kvm"],
        cpu: if pvm { PVM_QEMU_CPU } else { "host" },
        machine: "microvm,acpi=off,pit=off,pic=off,rtc=off",
    };

    let output = qemu.boot(&image.vmlinux, &image.initramfs, &kernel_cmdline(true, pvm))?;

    assert!(
        output.contains("ALL OK"),
        "self-test under KVM failed (kvm_pvm: {pvm})"
    );
    assert_eq!(output.contains("mxc_pvm_syscall: finishing SYSCALL"), pvm);
    Ok(())
}
