//! The whole VMM (`Vm::new` → `Vm::run`) on real KVM with tiny hand-made kernels: an ELF
//! with a PVH note (32-bit entry) and one without (64-bit Linux boot protocol entry).
//! Each guest prints "OK" on the serial port, marks boot-timer stages 1 and 2, and
//! resets through the i8042. Fast: a handful of exits.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::{ConsoleMode, ExitReason, Stage, Vm, VmConfig};

use vmm::boot::tiny::{elf_kernel, program};

fn polite_guest() -> Vec<u8> {
    program(&[
        0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8
        0xb0, b'O', 0xee, // mov al, 'O' ; out dx, al
        0xb0, b'K', 0xee, // mov al, 'K' ; out dx, al
        0xba, 0x00, 0x00, 0x00, 0xd0, // mov edx, 0xd0000000 (boot timer)
        0xc6, 0x02, 0x01, // mov byte [edx], 1
        0xc6, 0x02, 0x02, // mov byte [edx], 2
        0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe ; out 0x64, al (i8042 reset)
    ])
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mxc-tiny-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(kernel: &Path, vcpus: u8) -> VmConfig {
    VmConfig::new(kernel, 32, vcpus)
}

fn stages(report: &vmm::VmExitReport) -> Vec<Stage> {
    report.boot_timeline.iter().map(|(s, _)| *s).collect()
}

#[test]
fn a_pvh_guest_prints_marks_its_stages_and_resets() {
    let dir = TempDir::new("pvh");
    let kernel = dir.file("vmlinux", &elf_kernel(&polite_guest(), true));
    let mut config = config(&kernel, 1);
    config.console = ConsoleMode::File(dir.path("console.log"));

    let report = Vm::new(config).unwrap().run().unwrap();

    // VM creation and kernel loading run in parallel; everything else is sequential.
    let mut stages = stages(&report);
    stages[2..4].sort_by_key(|s| format!("{s:?}"));
    assert_eq!(report.reason, ExitReason::GuestReset);
    assert_eq!(
        stages,
        vec![
            Stage::ProcessStart,
            Stage::SetupStart,
            Stage::KernelLoaded,
            Stage::VmCreated,
            Stage::FirstVcpuEntry,
            Stage::FirstGuestExit,
            Stage::AgentStarted,
            Stage::AgentReady,
            Stage::VmGone,
        ]
    );
    assert!(report.boot_timeline.windows(2).all(|w| w[0].1 <= w[1].1));
    assert_eq!(std::fs::read(dir.path("console.log")).unwrap(), b"OK");
    assert!(
        report.cmdline.contains("console=ttyS0"),
        "{}",
        report.cmdline
    );
}

#[test]
fn a_64_bit_entry_guest_with_an_initrd_boots_the_same_way() {
    let dir = TempDir::new("linux64");
    let kernel = dir.file("vmlinux", &elf_kernel(&polite_guest(), false));
    let initrd = dir.file("initrd", &[0x55; 5000]);
    let mut config = config(&kernel, 1);
    config.initrd = Some(initrd);

    let report = Vm::new(config).unwrap().run().unwrap();

    assert_eq!(report.reason, ExitReason::GuestReset);
    assert!(stages(&report).contains(&Stage::AgentReady));
    assert!(!report.cmdline.contains("console="), "{}", report.cmdline);
}

#[test]
fn a_triple_fault_ends_the_vm_cleanly() {
    let dir = TempDir::new("triple");
    // ud2 with an empty IDT: #UD -> #GP -> #DF -> shutdown.
    let kernel = dir.file(
        "vmlinux",
        &elf_kernel(&vmm::boot::tiny::triple_fault(), true),
    );

    let report = Vm::new(config(&kernel, 1)).unwrap().run().unwrap();

    assert_eq!(report.reason, ExitReason::TripleFault { vcpu: 0 });
}

#[test]
fn kill_stops_a_spinning_smp_guest() {
    let dir = TempDir::new("kill");
    // jmp $ on the boot vCPU; the second vCPU waits for a SIPI that never comes.
    let kernel = dir.file("vmlinux", &elf_kernel(&[0xeb, 0xfe], true));
    let vm = Vm::new(config(&kernel, 2)).unwrap();
    let handle = vm.handle();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        handle.kill();
    });

    let report = vm.run().unwrap();
    killer.join().unwrap();

    assert_eq!(report.reason, ExitReason::Killed);
    assert_eq!(stages(&report).last(), Some(&Stage::VmGone));
}

#[test]
fn a_stop_point_ends_the_vm_at_the_first_entry_or_exit() {
    let dir = TempDir::new("stop");
    // jmp $: without a stop point this guest would spin until killed.
    let kernel = dir.file("vmlinux", &elf_kernel(&[0xeb, 0xfe], true));
    let mut at_entry = config(&kernel, 1);
    at_entry.stop_at = Some(Stage::FirstVcpuEntry);
    let polite = dir.file("polite", &elf_kernel(&polite_guest(), true));
    let mut at_exit = config(&polite, 1);
    at_exit.stop_at = Some(Stage::FirstGuestExit);

    let entry = Vm::new(at_entry).unwrap().run().unwrap();
    let exit = Vm::new(at_exit).unwrap().run().unwrap();

    assert_eq!(entry.reason, ExitReason::Killed);
    assert!(stages(&entry).ends_with(&[Stage::FirstVcpuEntry, Stage::VmGone]));
    assert_eq!(exit.reason, ExitReason::Killed);
    assert!(stages(&exit).ends_with(&[
        Stage::FirstVcpuEntry,
        Stage::FirstGuestExit,
        Stage::VmGone
    ]));
}

#[test]
fn a_missing_kernel_is_an_error_naming_it() {
    let err = Vm::new(config(Path::new("/nonexistent/kernel"), 1)).unwrap_err();

    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert_eq!(
        chain,
        "cannot boot the kernel: cannot open kernel /nonexistent/kernel"
    );
}
