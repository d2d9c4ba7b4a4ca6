//! Kernel command lines for the guest. The VMM joins [`KERNEL_CMDLINE_BASE`] (or
//! [`KERNEL_CMDLINE_CONSOLE`] when the user asked for a console) with
//! [`KERNEL_CMDLINE_PVM`] when it runs on the `kvm_pvm` hypervisor, then appends its
//! own `virtio_mmio.device=` entries. [`kernel_cmdline`] does the joining.

/// Shared part: reboot and power-off leave through the keyboard controller's reset
/// (port 0x64, which the VMM handles; power-off through our patch 0004, since without
/// ACPI the stock kernel halts forever), a panic reboots at once, no timer or
/// mitigation work the guest does not need, no PS/2 probing, and the unpacked
/// initramfs's memory kept (`retain_initrd`: freeing its ~3.4 MB — remapping the pages,
/// filling them with a poison pattern, handing them back — cost ~0.35 s of each cold
/// boot's emulated kernel work under kvm_pvm).
macro_rules! common {
    () => {
        "reboot=k mxc_poweroff=kbd panic=-1 tsc=reliable no_timer_check mitigations=off \
         i8042.noaux i8042.nomux i8042.dumbkbd retain_initrd"
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

/// The value of [`PVM_USER_ENV`] (a macro so that `concat!` can use it).
macro_rules! pvm_user_env {
    () => {
        concat!(
            "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,\
             -AVX512DQ,-AVX512CD,-AVX512ER,-AVX512PF,-FMA,-FMA4,-AVX_Fast_Unaligned_Load",
            " OPENSSL_ia32cap=~0x3800100000000000:~0x00005e42dc230020"
        )
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

/// The console kept for error reports: on the first (only) 8250 UART, but only the
/// kernel's warnings and worse (`loglevel=5`) and the guest agent's own lines, so a
/// healthy boot writes a few lines (each byte is a VM exit) and a failing one says why
/// ("Kernel panic", "APIC timer disabled", "No working init found").
pub const KERNEL_CMDLINE_LOGGED: &str =
    concat!(common!(), " console=ttyS0 8250.nr_uarts=1 loglevel=5");

/// What the guest's serial console is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestConsole {
    /// No console at all (benchmarks: nothing but the boot itself).
    Off,
    /// Warnings and errors only, kept by the VMM for error messages.
    Logged,
    /// Everything the kernel prints (`--console`, debugging).
    Shown,
}

/// Passed to `/init` as environment variables under `kvm_pvm` (the kernel hands
/// unknown `NAME=value` words to init), and by the guest agent to every command: guest
/// user code runs natively there and sees the host CPU's AVX, but the guest kernel
/// cannot use XSAVE, so its context switches keep only the SSE part of the vector
/// registers and two processes using AVX corrupt each other's data. glibc's string
/// functions and OpenSSL then stay on SSE; a program that picks AVX code by itself
/// still can (documented in the README).
pub const PVM_USER_ENV: &str = pvm_user_env!();

/// Added under the `kvm_pvm` hypervisor only: hide what its emulator cannot run, turn
/// on our three compatibility patches, keep user programs off AVX ([`PVM_USER_ENV`]) and
/// time with kvmclock: a restored guest's TSC does not go back to its saved value there,
/// so with the TSC as clock source the time its snapshot lay on disk would pass at once
/// (kvmclock is restored). On hardware KVM pass none of this.
pub const KERNEL_CMDLINE_PVM: &str = concat!(
    "clearcpuid=",
    clearcpuid!(),
    " mxc_pvm_syscall mxc_pvm_nofwait mxc_pvm_noint3test clocksource=kvm-clock ",
    pvm_user_env!()
);

/// The guest command line for a VM with or without a console, on `kvm_pvm` or not.
pub fn kernel_cmdline(console: GuestConsole, pvm: bool) -> String {
    let base = match console {
        GuestConsole::Off => KERNEL_CMDLINE_BASE,
        GuestConsole::Logged => KERNEL_CMDLINE_LOGGED,
        GuestConsole::Shown => KERNEL_CMDLINE_CONSOLE,
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
        assert!(base.contains(&"mxc_poweroff=kbd"));
        assert!(base.contains(&"panic=-1"));
        assert!(base.contains(&"quiet"));
        assert!(!base.iter().any(|w| w.starts_with("console=")));
    }

    #[test]
    fn the_logged_console_keeps_warnings_on_one_uart() {
        let logged = words(KERNEL_CMDLINE_LOGGED);

        assert!(logged.contains(&"console=ttyS0"));
        assert!(logged.contains(&"loglevel=5"));
        assert!(logged.contains(&"8250.nr_uarts=1"));
        assert!(!logged.contains(&"quiet"));
        assert_eq!(
            kernel_cmdline(GuestConsole::Logged, false),
            KERNEL_CMDLINE_LOGGED
        );
    }

    #[test]
    fn pvm_line_carries_the_three_patch_flags() {
        let pvm = words(KERNEL_CMDLINE_PVM);

        let flags =
            [PVM_FLAG_SYSCALL, PVM_FLAG_NOFWAIT, PVM_FLAG_NOINT3TEST].map(|f| pvm.contains(&f));

        assert_eq!(flags, [true, true, true]);
        assert!(pvm.contains(&concat!("clearcpuid=", clearcpuid!())));
        assert!(pvm.contains(&"clocksource=kvm-clock"));
    }

    #[test]
    fn pvm_line_keeps_user_programs_off_avx() {
        let pvm = words(KERNEL_CMDLINE_PVM);
        let env = words(PVM_USER_ENV);

        assert!(env.iter().all(|w| pvm.contains(w)));
        let tunables = env.iter().find_map(|w| w.strip_prefix("GLIBC_TUNABLES="));
        let masked: Vec<&str> = tunables
            .and_then(|t| t.strip_prefix("glibc.cpu.hwcaps="))
            .map(|list| list.split(',').collect())
            .unwrap_or_default();
        assert!(["-AVX", "-AVX2", "-AVX512F", "-AVX_Fast_Unaligned_Load"]
            .iter()
            .all(|f| masked.contains(f)));
        // The kernel passes a word to init as a variable only when its name has no dot.
        assert!(env
            .iter()
            .all(|w| !w.split('=').next().unwrap_or(".").contains('.')));
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
        let line = kernel_cmdline(GuestConsole::Shown, true);

        assert!(line.starts_with(KERNEL_CMDLINE_CONSOLE));
        assert!(line.ends_with(KERNEL_CMDLINE_PVM));
        assert_eq!(
            kernel_cmdline(GuestConsole::Off, false),
            KERNEL_CMDLINE_BASE
        );
    }
}
