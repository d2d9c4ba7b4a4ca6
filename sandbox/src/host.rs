//! What this host can do: which backends are available, and for each that is not, why.

use serde::Serialize;

use crate::limits;

#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    pub name: &'static str,
    pub available: bool,
    /// Why it is unavailable, or `None`.
    pub reason: Option<String>,
    /// Facts about how it enforces the policy here.
    pub details: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub process: BackendStatus,
    pub bubblewrap: BackendStatus,
    pub microvm: BackendStatus,
    pub hyperlight: BackendStatus,
}

impl HostReport {
    pub fn all(&self) -> [&BackendStatus; 4] {
        [
            &self.process,
            &self.bubblewrap,
            &self.microvm,
            &self.hyperlight,
        ]
    }
}

/// Try to create the namespaces the process backend needs, in a throw-away child.
fn can_unshare() -> Result<(), String> {
    let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWNET;
    // SAFETY: the child only calls unshare and _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: async-signal-safe calls only.
        unsafe {
            let rc = libc::unshare(flags);
            let errno = if rc == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            libc::_exit(errno.clamp(0, 255));
        }
    }
    let mut status = 0;
    // SAFETY: waitpid writes into our integer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    match libc::WEXITSTATUS(status) {
        0 => Ok(()),
        errno => Err(format!(
            "cannot create user/mount/pid/net namespaces: {} (check \
             /proc/sys/user/max_user_namespaces and kernel.unprivileged_userns_clone)",
            std::io::Error::from_raw_os_error(errno)
        )),
    }
}

fn process_status() -> BackendStatus {
    let mut details = vec![format!("limits: {}", limits::detect().describe())];
    let abi = crate::process::landlock_abi();
    details.push(if abi > 0 {
        format!("landlock ABI {abi}")
    } else {
        "landlock unavailable (mount namespace only)".into()
    });
    match can_unshare() {
        Ok(()) => BackendStatus {
            name: "process",
            available: true,
            reason: None,
            details,
        },
        Err(reason) => BackendStatus {
            name: "process",
            available: false,
            reason: Some(reason),
            details,
        },
    }
}

fn bubblewrap_status() -> BackendStatus {
    match crate::bubblewrap::version() {
        Ok(v) => BackendStatus {
            name: "bubblewrap",
            available: true,
            reason: None,
            details: vec![
                v,
                format!("limits: {}", limits::detect().describe()),
                match crate::landlock::kernel_abi() {
                    0 => "landlock unavailable (mount namespace only)".into(),
                    abi => {
                        format!("landlock ABI {abi}, applied by mxc-vm's exec helper inside bwrap")
                    }
                },
            ],
        },
        Err(reason) => BackendStatus {
            name: "bubblewrap",
            available: false,
            reason: Some(reason),
            details: vec![],
        },
    }
}

/// Whether /dev/kvm can be opened, and what kind of KVM it is ([`vmm::detect`]).
pub fn kvm_kind() -> Result<String, String> {
    match vmm::detect() {
        vmm::HostKind::NoKvm(why) => Err(why),
        kind => Ok(kind.label()),
    }
}

/// Whether `auto` may pick the microVM backend: /dev/kvm opens. (The guest image is
/// built on first use when it is missing.)
pub fn microvm_usable() -> bool {
    kvm_kind().is_ok()
}

/// The environment variable that, set to `0`, starts VMMs run as root unjailed.
pub const JAIL_ENV: &str = "MXC_VM_JAIL";

/// Whether the VMMs this process starts jail themselves (`vmm::jail`): when it runs as
/// root (a VMM can make a mount namespace only with CAP_SYS_ADMIN), unless
/// `MXC_VM_JAIL=0`.
pub fn vmm_jailed() -> bool {
    // SAFETY: geteuid() has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::env::var_os(JAIL_ENV).is_none_or(|v| v != "0")
}

fn microvm_status() -> BackendStatus {
    let mut details = Vec::new();
    let kind = vmm::detect();
    let (available, reason) = match &kind {
        vmm::HostKind::HardwareKvm { .. } => {
            details.push(format!(
                "hypervisor: {kind}; the guest kernel runs as stock, its timer is the \
                 LAPIC in TSC-deadline mode with kvmclock"
            ));
            (true, None)
        }
        vmm::HostKind::Pvm => {
            details.push(
                "hypervisor: kvm_pvm (nested, no VMX/SVM): guest kernel code is emulated, a \
                 boot takes about a minute; mxc-vm filters the guest CPUID and turns on its \
                 PVM kernel patches"
                    .into(),
            );
            (true, None)
        }
        vmm::HostKind::NoKvm(why) => (false, Some(format!("no usable KVM: {why}"))),
    };
    details.push(
        "hypervisors: KVM (Linux, run by CI on kvm_pvm and nested hardware KVM); the \
         Windows Hypervisor Platform backend is compiled by CI but never run (no Windows \
         machine), and the device model is Linux-only"
            .into(),
    );
    details.push(if vmm_jailed() {
        "vmm: jailed (a mount namespace of its own; its root holds only /dev/kvm, its \
         runtime directory, kernel, initramfs, snapshot and shares), empty network, IPC \
         and UTS namespaces, seccomp per thread kind, no capabilities in the threads the \
         guest reaches"
            .into()
    } else {
        // SAFETY: geteuid() has no preconditions.
        let why = if unsafe { libc::geteuid() } == 0 {
            "MXC_VM_JAIL=0"
        } else {
            "not run as root"
        };
        let files = if crate::landlock::kernel_abi() >= 1 {
            "Landlock allows it only its runtime directory, kernel, initramfs, snapshot and \
             shares (a warm pool's VMM: the host's file system as this user has it)"
        } else {
            "it sees the host's file system as this user does (no Landlock on this kernel)"
        };
        format!("vmm: not jailed ({why}): {files}; seccomp per thread kind")
    });
    details.push(
        match guest_image::cached(&guest_image::BuildOptions::default()) {
            Some(image) => format!("guest image: {}", image.key),
            None => {
                "guest image: not built yet (`mxc-vm image build`, or built on first use)".into()
            }
        },
    );
    BackendStatus {
        name: "microvm",
        available,
        reason,
        details,
    }
}

fn hyperlight_status() -> BackendStatus {
    BackendStatus {
        name: "hyperlight",
        available: false,
        reason: Some(
            "not built into this version: Hyperlight guests run at CPL0, which needs hardware \
             KVM, and need a Hyperlight guest binary"
                .into(),
        ),
        details: vec![],
    }
}

/// Probe the host.
pub fn probe() -> HostReport {
    HostReport {
        process: process_status(),
        bubblewrap: bubblewrap_status(),
        microvm: microvm_status(),
        hyperlight: hyperlight_status(),
    }
}
