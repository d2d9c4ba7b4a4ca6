//! What to boot and how: the VMM's whole input, serializable so that a parent process can
//! hand it to `mxc-vm __vmm --config JSON`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::devices::fs::{FsShareConfig, RunAs};
use crate::layout::{MAX_VCPUS, MIN_MEM_MIB};
pub use crate::pvm::PvmMode;
use crate::timeline::Stage;

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleMode {
    /// No serial device at all (every console byte would be a VM exit).
    #[default]
    Off,
    /// The VMM's standard output.
    Stdout,
    /// Append to this file (created if missing).
    File(PathBuf),
}

/// A virtio-vsock device with a Firecracker-style hybrid vsock Unix socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub guest_cid: u32,
    /// Host Unix socket path.
    pub uds_path: PathBuf,
}

/// Saving a snapshot of the VM, or starting from one (see `crate::snapshot`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// Boot; when the guest agent reports ready (boot stage `agent_ready`), save the VM
    /// into this directory and end it (`ExitReason::Saved`).
    SaveAtReady(PathBuf),
    /// Start from the snapshot in this directory instead of booting. The rest of the
    /// config must describe the VM the snapshot was made of (kernel, initrd, command
    /// line, memory, vCPUs); the restore refuses it otherwise, naming what differs.
    Restore(PathBuf),
}

/// A VM to boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image: an ELF `vmlinux` (booted through its PVH entry point when it has one)
    /// or a `bzImage`; the format is detected from the file.
    pub kernel: PathBuf,
    /// Initial ramdisk (cpio), if any.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Appended to the command line the VMM builds.
    #[serde(default)]
    pub cmdline_extra: String,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Serial console.
    #[serde(default)]
    pub console: ConsoleMode,
    /// A virtio-vsock device, if any.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Host directories shared over virtio-fs, one device per share, in this order after
    /// the vsock device. The VMM only serves them; telling the guest where to mount each
    /// tag is the caller's business (`mxc.mounts=` in `cmdline_extra` for our agent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<FsShareConfig>,
    /// Serve the shares as this user and group (the VMM must run as root); `None`: as the
    /// VMM's own user, without capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_run_as: Option<RunAs>,
    /// The uid and gid the guest's commands run as: files the shares' server owns are
    /// shown to the guest as theirs. `None`: ownership is shown as it is on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_guest_owner: Option<u32>,
    /// Virtio-fs device slots for snapshots. With N > 0 the VM has exactly N fs devices,
    /// tags `mxcfs0`…: slot i serves `shares[i]` (whose tag must be `mxcfs<i>`), every
    /// other slot `share_placeholder` read-only. A ready snapshot is made with every slot
    /// a placeholder and restored with the policy's shares in the slots, which the guest
    /// agent mounts after the restore (`Control::Setup`). 0: one device per share.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub share_slots: u8,
    /// The directory unused slots serve (read-only; it should be empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_placeholder: Option<PathBuf>,
    /// The most bytes the guest may write into all shares together (`ENOSPC` past it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_write_limit: Option<u64>,
    /// Whether to apply the `kvm_pvm` changes.
    #[serde(default)]
    pub pvm: PvmMode,
    /// Kernel flags appended only when the PVM changes apply (the guest kernel's PVM
    /// boot flags, e.g. `guest_image::KERNEL_CMDLINE_PVM`).
    #[serde(default)]
    pub pvm_cmdline: String,
    /// When the VMM process was started, as CLOCK_MONOTONIC nanoseconds (the parent
    /// takes it just before spawning). `None`: read from `/proc/self/stat` (10 ms
    /// resolution).
    #[serde(default)]
    pub start_monotonic_ns: Option<u64>,
    /// For benchmarks: end the VM at this stage instead of running the guest.
    /// [`Stage::FirstVcpuEntry`] stops just before the boot vCPU's first `KVM_RUN` (VM
    /// setup only, no guest code runs); [`Stage::FirstGuestExit`] stops when the boot
    /// vCPU first leaves guest code. Other stages are refused.
    #[serde(default)]
    pub stop_at: Option<Stage>,
    /// Listen here for the host's requests while the VM runs ([`crate::control`]):
    /// binding the share slots of a VM restored before its policy was known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
    /// Save a snapshot when the guest is ready, or start from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotMode>,
    /// The VMM's parent passes it empty network, IPC and UTS namespaces on its standard
    /// input (ones it made for all its VMMs, [`crate::privileges::EmptyNamespaces::send`]),
    /// which the VMM joins first ([`crate::privileges::join_passed`]) instead of making
    /// its own ([`crate::privileges::leave_host_namespaces`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub namespaces_joined: bool,
    /// The process that started the VMM: the VMM dies with it, and ends at once when it
    /// is no longer its parent (it died before the VMM could ask to die with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_pid: Option<u32>,
    /// Jail the VMM ([`crate::jail`]): the empty directory, inside its runtime
    /// directory, on which it mounts the root of its own mount namespace, which holds
    /// only what the VM needs. Needs CAP_SYS_ADMIN (its parent asks for it when it runs
    /// as root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<PathBuf>,
    /// The file through which the VMM joins the cgroup its parent made for it, opened
    /// before its jail: `tasks` of a cgroup v1 pids cgroup (its main thread writes `0`
    /// at once), else `cgroup.procs` (written its pid just before it creates the VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

/// A configuration value the VMM refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("mem_mib {0} is below the minimum of {MIN_MEM_MIB}")]
    MemoryTooSmall(u32),
    #[error("mem_mib {0} is more than this VMM supports (1 TiB)")]
    MemoryTooLarge(u32),
    #[error("vcpus must be between 1 and {MAX_VCPUS}, not {0}")]
    VcpuCount(u8),
    #[error("vsock guest_cid {0} is reserved (use 3 or more)")]
    ReservedCid(u32),
    #[error("cmdline_extra contains a control character or NUL")]
    CmdlineCharacters,
    #[error("stop_at must be first_vcpu_entry or first_guest_exit, not {0:?}")]
    StopAt(Stage),
    #[error("a VM with shared directories is snapshotted or restored only with share_slots")]
    SnapshotWithShares,
    #[error("{shares} shares do not fit in {slots} share slots")]
    TooManyShares { shares: usize, slots: u8 },
    #[error("share_slots needs a share_placeholder directory")]
    NoSharePlaceholder,
    #[error("share {index} must have the tag of its slot, {expected:?}")]
    SlotTag { index: usize, expected: String },
    #[error("stop_at cannot be combined with saving a snapshot")]
    SnapshotWithStopAt,
}

/// Largest RAM size accepted (1 TiB).
pub const MAX_MEM_MIB: u32 = 1 << 20;

impl VmConfig {
    /// A config with defaults for everything but the kernel, memory and vCPUs.
    pub fn new(kernel: impl Into<PathBuf>, mem_mib: u32, vcpus: u8) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline_extra: String::new(),
            mem_mib,
            vcpus,
            console: ConsoleMode::Off,
            vsock: None,
            shares: Vec::new(),
            share_run_as: None,
            share_guest_owner: None,
            share_slots: 0,
            share_placeholder: None,
            control_socket: None,
            share_write_limit: None,
            pvm: PvmMode::Auto,
            pvm_cmdline: String::new(),
            start_monotonic_ns: None,
            stop_at: None,
            snapshot: None,
            namespaces_joined: false,
            parent_pid: None,
            jail: None,
            cgroup: None,
        }
    }

    /// Check the values that do not need the filesystem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemoryTooSmall(self.mem_mib));
        }
        if self.mem_mib > MAX_MEM_MIB {
            return Err(ConfigError::MemoryTooLarge(self.mem_mib));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(self.vcpus));
        }
        if let Some(vsock) = &self.vsock {
            if vsock.guest_cid < 3 {
                return Err(ConfigError::ReservedCid(vsock.guest_cid));
            }
        }
        let bad_char = |s: &str| s.chars().any(|c| c.is_control());
        if bad_char(&self.cmdline_extra) || bad_char(&self.pvm_cmdline) {
            return Err(ConfigError::CmdlineCharacters);
        }
        match self.stop_at {
            None | Some(Stage::FirstVcpuEntry | Stage::FirstGuestExit) => {}
            Some(other) => return Err(ConfigError::StopAt(other)),
        }
        if self.share_slots > 0 {
            if self.shares.len() > usize::from(self.share_slots) {
                return Err(ConfigError::TooManyShares {
                    shares: self.shares.len(),
                    slots: self.share_slots,
                });
            }
            if self.share_placeholder.is_none() {
                return Err(ConfigError::NoSharePlaceholder);
            }
            for (index, share) in self.shares.iter().enumerate() {
                let expected = crate::devices::fs::share_tag(index);
                if share.tag != expected {
                    return Err(ConfigError::SlotTag { index, expected });
                }
            }
        }
        if self.snapshot.is_some() {
            if !self.shares.is_empty() && self.share_slots == 0 {
                return Err(ConfigError::SnapshotWithShares);
            }
            // A restore may stop early (benchmarks time the restore alone); a save waits
            // for the guest's Ready.
            let saving = matches!(self.snapshot, Some(SnapshotMode::SaveAtReady(_)));
            if saving && self.stop_at.is_some() {
                return Err(ConfigError::SnapshotWithStopAt);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_round_trips_through_json() {
        let mut config = VmConfig::new("/k/vmlinux", 128, 2);
        config.console = ConsoleMode::File("/tmp/console.log".into());
        config.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: "/tmp/v.sock".into(),
        });

        let json = serde_json::to_string(&config).unwrap();
        let back: VmConfig = serde_json::from_str(&json).unwrap();

        assert_eq!(back, config);
    }

    #[test]
    fn minimal_json_takes_defaults() {
        let json = r#"{"kernel":"/k","mem_mib":64,"vcpus":1}"#;

        let config: VmConfig = serde_json::from_str(json).unwrap();

        assert_eq!(config, VmConfig::new("/k", 64, 1));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let json = r#"{"kernel":"/k","mem_mib":64,"vcpus":1,"memory":5}"#;

        let result = serde_json::from_str::<VmConfig>(json);

        assert!(result.is_err());
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let mut vsock = VmConfig::new("/k", 64, 1);
        vsock.vsock = Some(VsockConfig {
            guest_cid: 2,
            uds_path: "/s".into(),
        });
        let mut newline = VmConfig::new("/k", 64, 1);
        newline.cmdline_extra = "a\nb".into();

        assert_eq!(
            VmConfig::new("/k", 8, 1).validate(),
            Err(ConfigError::MemoryTooSmall(8))
        );
        assert_eq!(
            VmConfig::new("/k", 64, 0).validate(),
            Err(ConfigError::VcpuCount(0))
        );
        assert_eq!(
            VmConfig::new("/k", 64, 65).validate(),
            Err(ConfigError::VcpuCount(65))
        );
        assert_eq!(vsock.validate(), Err(ConfigError::ReservedCid(2)));
        assert_eq!(newline.validate(), Err(ConfigError::CmdlineCharacters));
        assert_eq!(VmConfig::new("/k", 64, 1).validate(), Ok(()));
    }

    #[test]
    fn only_vcpu_stages_are_stop_points() {
        let mut entry = VmConfig::new("/k", 64, 1);
        entry.stop_at = Some(Stage::FirstVcpuEntry);
        let mut ready = VmConfig::new("/k", 64, 1);
        ready.stop_at = Some(Stage::AgentReady);

        assert_eq!(entry.validate(), Ok(()));
        assert_eq!(
            ready.validate(),
            Err(ConfigError::StopAt(Stage::AgentReady))
        );
    }

    #[test]
    fn share_slots_hold_the_shares_in_order_and_snapshots_need_them() {
        let share = |tag: &str| FsShareConfig {
            tag: tag.into(),
            host_path: "/srv".into(),
            guest_path: format!("/{tag}").into(),
            readonly: true,
            denied: Vec::new(),
            root_allowlist: None,
            hidden_inodes: Vec::new(),
        };
        let mut config = VmConfig::new("/k", 64, 1);
        config.shares = vec![share("mxcfs0")];
        config.snapshot = Some(SnapshotMode::Restore("/snap".into()));
        assert_eq!(config.validate(), Err(ConfigError::SnapshotWithShares));

        config.share_slots = 2;
        assert_eq!(config.validate(), Err(ConfigError::NoSharePlaceholder));
        config.share_placeholder = Some("/empty".into());
        assert_eq!(config.validate(), Ok(()));

        config.shares = vec![share("mxcfs1")];
        assert_eq!(
            config.validate(),
            Err(ConfigError::SlotTag {
                index: 0,
                expected: "mxcfs0".into()
            })
        );
        config.shares = vec![share("mxcfs0"), share("mxcfs1"), share("mxcfs2")];
        assert_eq!(
            config.validate(),
            Err(ConfigError::TooManyShares {
                shares: 3,
                slots: 2
            })
        );
        let mut stop = VmConfig::new("/k", 64, 1);
        stop.stop_at = Some(Stage::FirstVcpuEntry);
        stop.snapshot = Some(SnapshotMode::SaveAtReady("/snap".into()));
        assert_eq!(stop.validate(), Err(ConfigError::SnapshotWithStopAt));
        stop.snapshot = Some(SnapshotMode::Restore("/snap".into()));
        assert_eq!(stop.validate(), Ok(()));
    }
}
