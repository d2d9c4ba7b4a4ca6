//! Kernel command lines for the guest. The VMM joins [`KERNEL_CMDLINE_BASE`] (or
//! [`KERNEL_CMDLINE_CONSOLE`] when the user asked for a console) with
//! [`KERNEL_CMDLINE_PVM`] when it runs on the `kvm_pvm` hypervisor, then appends its
//! own `virtio_mmio.device=` entries. [`kernel_cmdline`] does the joining.

/// Shared part: reboot and power-off leave through the keyboard controller's reset
/// (port 0x64, which the VMM handles), a panic reboots at once, no timer or
/// mitigation work the guest does not need, no PS/2 probing.
macro_rules! common {
    () => {
        "reboot=k panic=-1 tsc=reliable no_timer_check mitigations=off \
         i8042.noaux i8042.nomux i8042.dumbkbd"
    };
}

/// CPU features whose instructions the `kvm_pvm` emulator cannot run in guest kernel
/// mode (or that make the kernel use such instructions); the kernel must not see them.
/// Kept under 128 characters: the kernel copies the `clearcpuid=` value into a
/// 128-byte buffer. `xsave` here does what `noxsave` does (clearing XSAVE, and with
/// it AVX and AVX-512), without `noxsave`'s side effect: 6.1 does not register that
/// word as a parameter, so it would reach `/init` as an argument.
macro_rules! clearcpuid {
    () => {
        "xsave,popcnt,cx16,sse4_2,aes,avx,avx2,rdrand,rdseed,rdpid,smap,smep,umip,pku,\
         fsgsbase,erms,fsrm,pcid,invpcid,clflushopt,clwb"
    };
}

/// Boot flag of patch 0001: finish a user SYSCALL from the page fault `kvm_pvm` delivers.
pub const PVM_FLAG_SYSCALL: &str = "mxc_pvm_syscall";
/// Boot flag of patch 0002: no `FWAIT` in `fpu__drop()`.
pub const PVM_FLAG_NOFWAIT: &str = "mxc_pvm_nofwait";
/// Boot flag of patch 0003: skip the early INT3 self-test.
pub const PVM_FLAG_NOINT3TEST: &str = "mxc_pvm_noint3test";

/// The `clearcpuid=` value used under `kvm_pvm`.
pub const PVM_CLEARCPUID: &str = clearcpuid!();

/// Default guest command line: no console (`8250.nr_uarts=0` also spares the UART
/// probe, every port access being a VM exit) and `quiet`.
pub const KERNEL_CMDLINE_BASE: &str = concat!(common!(), " 8250.nr_uarts=0 quiet");

/// Like [`KERNEL_CMDLINE_BASE`] but with the kernel console on the first 8250 UART.
pub const KERNEL_CMDLINE_CONSOLE: &str = concat!(common!(), " console=ttyS0");

/// Added under the `kvm_pvm` hypervisor only: hide what its emulator cannot run and
/// turn on our three compatibility patches. On hardware KVM pass none of this.
pub const KERNEL_CMDLINE_PVM: &str = concat!(
    "clearcpuid=",
    clearcpuid!(),
    " mxc_pvm_syscall mxc_pvm_nofwait mxc_pvm_noint3test"
);

/// The guest command line for a VM with or without a console, on `kvm_pvm` or not.
pub fn kernel_cmdline(console: bool, pvm: bool) -> String {
    let base = if console {
        KERNEL_CMDLINE_CONSOLE
    } else {
        KERNEL_CMDLINE_BASE
    };
    if pvm {
        format!("{base} {KERNEL_CMDLINE_PVM}")
    } else {
        base.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<&str> {
        line.split_whitespace().collect()
    }

    #[test]
    fn base_has_no_console_and_resets_through_the_keyboard_controller() {
        let base = words(KERNEL_CMDLINE_BASE);

        assert!(base.contains(&"reboot=k"));
        assert!(base.contains(&"panic=-1"));
        assert!(base.contains(&"quiet"));
        assert!(!base.iter().any(|w| w.starts_with("console=")));
    }

    #[test]
    fn pvm_line_carries_the_three_patch_flags() {
        let pvm = words(KERNEL_CMDLINE_PVM);

        let flags =
            [PVM_FLAG_SYSCALL, PVM_FLAG_NOFWAIT, PVM_FLAG_NOINT3TEST].map(|f| pvm.contains(&f));

        assert_eq!(flags, [true, true, true]);
        assert!(pvm.contains(&concat!("clearcpuid=", clearcpuid!())));
    }

    #[test]
    fn clearcpuid_fits_the_kernel_buffer() {
        let len = PVM_CLEARCPUID.len();

        assert!(len < 128, "clearcpuid value is {len} bytes");
        assert!(!PVM_CLEARCPUID.contains(' '));
    }

    #[test]
    fn clearcpuid_hides_what_the_emulator_lacks() {
        let features: Vec<&str> = PVM_CLEARCPUID.split(',').collect();

        let missing: Vec<&str> = [
            "popcnt", "cx16", "sse4_2", "aes", "avx", "rdrand", "rdseed", "rdpid", "smap", "smep",
            "umip", "pku", "fsgsbase", "erms", "fsrm",
        ]
        .into_iter()
        .filter(|f| !features.contains(f))
        .collect();

        assert!(missing.is_empty(), "not cleared: {missing:?}");
    }

    #[test]
    fn console_and_pvm_compose() {
        let line = kernel_cmdline(true, true);

        assert!(line.starts_with(KERNEL_CMDLINE_CONSOLE));
        assert!(line.ends_with(KERNEL_CMDLINE_PVM));
        assert_eq!(kernel_cmdline(false, false), KERNEL_CMDLINE_BASE);
    }
}
