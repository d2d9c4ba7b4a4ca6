//! Which kind of KVM this host has, and what the VMM changes for the `kvm_pvm`
//! hypervisor (see the crate's PVM notes): a filtered CPUID, no MSR 0x10a, and the
//! kernel's PVM boot flags on the command line.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Where `kvm_pvm` announces itself.
pub const KVM_PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// The virtualization this host offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostKind {
    /// `/dev/kvm` backed by VMX or SVM.
    HardwareKvm,
    /// `/dev/kvm` backed by the `kvm_pvm` pagetable-based hypervisor (guest kernel code
    /// is emulated).
    Pvm,
    /// No usable `/dev/kvm`; the reason says why.
    NoKvm(String),
}

impl std::fmt::Display for HostKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostKind::HardwareKvm => write!(f, "hardware KVM"),
            HostKind::Pvm => write!(f, "KVM on kvm_pvm (guest kernel emulated)"),
            HostKind::NoKvm(reason) => write!(f, "no KVM: {reason}"),
        }
    }
}

/// Whether to apply the PVM changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PvmMode {
    /// Apply them when `kvm_pvm` is detected.
    #[default]
    Auto,
    /// Always apply them.
    On,
    /// Never apply them.
    Off,
}

impl PvmMode {
    /// Resolve the mode against the host.
    pub fn enabled(self) -> bool {
        match self {
            PvmMode::Auto => Path::new(KVM_PVM_MODULE).exists(),
            PvmMode::On => true,
            PvmMode::Off => false,
        }
    }
}

/// Find out what this host offers: open `/dev/kvm`, then look for `kvm_pvm`.
pub fn detect() -> HostKind {
    if let Err(e) = crate::hypervisor::kvm::probe() {
        return HostKind::NoKvm(format!("{}: {e}", crate::hypervisor::kvm::KVM_PATH));
    }
    if Path::new(KVM_PVM_MODULE).exists() {
        HostKind::Pvm
    } else {
        HostKind::HardwareKvm
    }
}

/// MSR that `kvm_pvm` refuses to set (IA32_ARCH_CAPABILITIES).
pub const MSR_ARCH_CAPABILITIES: u32 = 0x10a;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_modes_ignore_the_host() {
        assert!(PvmMode::On.enabled());
        assert!(!PvmMode::Off.enabled());
    }

    #[test]
    fn detection_agrees_with_the_module_directory() {
        let kind = detect();

        let expected_pvm = Path::new(KVM_PVM_MODULE).exists();
        assert_eq!(kind == HostKind::Pvm, expected_pvm, "{kind}");
    }
}
