//! Which kind of KVM this host has, and what the VMM changes for the `kvm_pvm`
//! hypervisor (see `docs/pvm.md`): a filtered CPUID, no MSR 0x10a, and the
//! kernel's PVM boot flags on the command line.

use serde::{Deserialize, Serialize};

use crate::hypervisor::Flavour;

/// Where `kvm_pvm` announces itself.
pub const KVM_PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// The virtualization this host offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostKind {
    /// `/dev/kvm` backed by VMX or SVM.
    HardwareKvm {
        /// VMX or SVM.
        flavour: Flavour,
        /// The host is itself a VM (its CPUID has the hypervisor bit): nested hardware
        /// KVM, as in a cloud VM or our QEMU test lane, not bare metal.
        nested: bool,
    },
    /// `/dev/kvm` backed by the `kvm_pvm` pagetable-based hypervisor (guest kernel code
    /// is emulated).
    Pvm,
    /// No usable `/dev/kvm`; the reason says why.
    NoKvm(String),
}

impl HostKind {
    /// Hardware KVM, bare metal or nested.
    pub fn is_hardware(&self) -> bool {
        matches!(self, Self::HardwareKvm { .. })
    }

    /// A short label for figures measured on this host.
    pub fn label(&self) -> String {
        match self {
            Self::HardwareKvm {
                flavour,
                nested: false,
            } => format!("{flavour}, bare metal"),
            Self::HardwareKvm {
                flavour,
                nested: true,
            } => format!("nested {flavour}: the host is itself a VM"),
            Self::Pvm => "KVM on kvm_pvm (guest kernel emulated)".into(),
            Self::NoKvm(reason) => format!("no KVM: {reason}"),
        }
    }
}

impl std::fmt::Display for HostKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
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
    /// Resolve the mode against the host's KVM flavour.
    pub fn enabled(self) -> bool {
        self.enabled_for(crate::hypervisor::kvm::detect_flavour())
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

/// Find out what this host offers: open `/dev/kvm`, then tell its flavour and whether
/// the host itself runs under a hypervisor.
pub fn detect() -> HostKind {
    use crate::hypervisor::kvm;
    if let Err(e) = kvm::probe() {
        return HostKind::NoKvm(format!("{}: {e}", kvm::KVM_PATH));
    }
    match kvm::detect_flavour() {
        Flavour::Pvm => HostKind::Pvm,
        flavour => HostKind::HardwareKvm {
            flavour,
            nested: kvm::host_is_virtual(),
        },
    }
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
