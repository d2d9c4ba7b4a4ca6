//! The QEMU side of `--vs-qemu`: `qemu-system-x86_64 -M microvm` with KVM booting the
//! same kernel, initramfs and command line as our VMM, with the same RAM and vCPUs and
//! no devices but the i8042 that ends it (QEMU here has no vhost-vsock).

use std::ffi::OsString;
use std::path::Path;

/// CPU features QEMU must hide under kvm_pvm (its emulator lacks their instructions;
/// MSR 0x10a cannot be set). Our VMM filters the same CPUID bits itself.
pub const QEMU_PVM_CPU: &str = "host,-arch-capabilities,-xsave,-xsaveopt,-xsavec,-xsaves,\
    -popcnt,-cx16,-avx,-avx2,-f16c,-fma,-rdrand,-rdseed,-rdpid,-smap,-smep,-umip,-pku,\
    -fsgsbase,-erms,-fsrm,-aes,-pclmulqdq,-sse4.2,-pcid,-invpcid,-clflushopt,-clwb,-sha-ni,\
    -vaes,-vpclmulqdq,-movbe,-bmi1,-bmi2,-adx,-abm";

/// microvm without ACPI, PIT, PIC, RTC or serial port: our VMM has none of them either
/// (it uses KVM's in-kernel irqchip and no PIT).
pub const QEMU_MACHINE: &str = "microvm,acpi=off,pit=off,pic=off,rtc=off,isa-serial=off";

/// One QEMU boot.
#[derive(Debug, Clone)]
pub struct QemuBoot<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub mem_mib: u32,
    pub vcpus: u8,
    /// The host is kvm_pvm: hide what its emulator cannot run.
    pub pvm: bool,
}

impl QemuBoot<'_> {
    /// QEMU's arguments (without the program). `-no-reboot` turns the guest's reset
    /// through the i8042 (`reboot=k`) into QEMU's exit, as our VMM ends on it.
    pub fn args(&self) -> Vec<OsString> {
        let cpu = if self.pvm { QEMU_PVM_CPU } else { "host" };
        let mut args: Vec<OsString> = ["-M", QEMU_MACHINE, "-accel", "kvm", "-cpu", cpu, "-m"]
            .iter()
            .map(OsString::from)
            .collect();
        args.push(self.mem_mib.to_string().into());
        args.push("-smp".into());
        args.push(self.vcpus.to_string().into());
        for a in [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-device",
            "i8042",
            "-kernel",
        ] {
            args.push(a.into());
        }
        args.push(self.kernel.into());
        if let Some(initrd) = self.initrd {
            args.push("-initrd".into());
            args.push(initrd.into());
        }
        args.push("-append".into());
        args.push(self.cmdline.into());
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(pvm: bool) -> Vec<String> {
        QemuBoot {
            kernel: Path::new("/k/vmlinux"),
            initrd: Some(Path::new("/k/initramfs.cpio")),
            cmdline: "reboot=k quiet",
            mem_mib: 256,
            vcpus: 1,
            pvm,
        }
        .args()
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
        let i = args.iter().position(|a| a == flag)?;
        args.get(i + 1).map(String::as_str)
    }

    #[test]
    fn same_kernel_initrd_cmdline_memory_and_vcpus() {
        let args = boot(false);

        assert_eq!(after(&args, "-kernel"), Some("/k/vmlinux"));
        assert_eq!(after(&args, "-initrd"), Some("/k/initramfs.cpio"));
        assert_eq!(after(&args, "-append"), Some("reboot=k quiet"));
        assert_eq!(after(&args, "-m"), Some("256"));
        assert_eq!(after(&args, "-smp"), Some("1"));
        assert_eq!(after(&args, "-accel"), Some("kvm"));
        assert!(args.iter().any(|a| a == "-no-reboot"));
    }

    #[test]
    fn the_cpu_model_hides_features_only_under_pvm() {
        let hardware = boot(false);
        let pvm = boot(true);

        assert_eq!(after(&hardware, "-cpu"), Some("host"));
        let pvm_cpu = after(&pvm, "-cpu").unwrap();
        assert!(pvm_cpu.starts_with("host,-arch-capabilities,-xsave,"));
        assert!(!pvm_cpu.contains(' '));
    }
}
