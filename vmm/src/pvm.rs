//! Which kind of KVM this host has, and what the VMM changes for the `kvm_pvm`
//! hypervisor (see `docs/pvm.md`): a filtered CPUID, no MSR 0x10a, and the
//! kernel's PVM boot flags on the command line.

use serde::{Deserialize, Serialize};

use crate::hypervisor::Flavour;
pub use crate::hypervisor::HostKind;

/// Where `kvm_pvm` announces itself.
pub const KVM_PVM_MODULE: &str = "/sys/module/kvm_pvm";

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
    /// Resolve the mode against the host's KVM flavour.
    pub fn enabled(self) -> bool {
        self.enabled_for(crate::hypervisor::host_flavour())
    }

    /// Resolve the mode against a known flavour.
    pub fn enabled_for(self, flavour: Flavour) -> bool {
        match self {
            PvmMode::Auto => flavour == Flavour::Pvm,
            PvmMode::On => true,
            PvmMode::Off => false,
        }
    }
}

/// Find out what this host offers (see [`crate::hypervisor::detect_host`]).
pub fn detect() -> HostKind {
    crate::hypervisor::detect_host()
}

/// MSR that `kvm_pvm` refuses to set (IA32_ARCH_CAPABILITIES).
pub const MSR_ARCH_CAPABILITIES: u32 = 0x10a;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_flavour() {
        assert!(PvmMode::Auto.enabled_for(Flavour::Pvm));
        assert!(!PvmMode::Auto.enabled_for(Flavour::HardwareSvm));
        assert!(!PvmMode::Auto.enabled_for(Flavour::HardwareVmx));
        assert!(!PvmMode::Off.enabled_for(Flavour::Pvm));
    }

    #[test]
    fn labels_tell_bare_metal_from_nested() {
        let bare = HostKind::HardwareKvm {
            flavour: Flavour::HardwareVmx,
            nested: false,
        };
        let nested = HostKind::HardwareKvm {
            flavour: Flavour::HardwareSvm,
            nested: true,
        };
        assert_eq!(bare.label(), "hardware KVM (Intel VMX), bare metal");
        assert!(nested.label().starts_with("nested hardware KVM (AMD SVM)"));
        assert!(HostKind::Pvm.label().contains("kvm_pvm"));
    }

    #[test]
    fn explicit_modes_ignore_the_host() {
        assert!(PvmMode::On.enabled());
        assert!(!PvmMode::Off.enabled());
    }

    #[test]
    fn detection_agrees_with_the_module_directory() {
        let kind = detect();

        let expected_pvm = std::path::Path::new(KVM_PVM_MODULE).exists();
        assert_eq!(kind == HostKind::Pvm, expected_pvm, "{kind}");
    }
}
