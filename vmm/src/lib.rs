//! mxc-vm's virtual machine monitor: a small KVM VMM that boots a Linux guest from an
//! ELF `vmlinux` (PVH) or a `bzImage`, with a serial console, an i8042 reset line, a
//! boot-timer device and virtio-mmio devices.
//!
//! Threads: `Vm::run` runs the boot vCPU on the calling thread, each other vCPU on its
//! own thread, and the devices' `event-manager` loop on one more. Any of them (or a
//! `VmHandle::kill`, or SIGTERM/SIGINT after `kill_on_termination_signals`) ends the VM
//! through `exit::VmExit`, which kicks every vCPU out of guest code.
//!
//! Devices: the 8250 serial console, the i8042 reset line, the boot timer, and on
//! virtio-mmio the userspace virtio-vsock device (`devices::vsock`) and one virtio-fs
//! device per shared directory (`devices::fs`).
//!
//! ```no_run
//! use vmm::{Vm, VmConfig};
//! let config = VmConfig::new("/path/to/vmlinux", 128, 1);
//! let report = Vm::new(config)?.run()?;
//! println!("{}: {:?}", report.reason, report.boot_timeline);
//! # Ok::<(), vmm::VmmError>(())
//! ```
#![deny(clippy::indexing_slicing)]

pub mod logging;

// What every platform compiles: the hypervisor seam (KVM on Linux, WHP on Windows), the
// guest layout and the host/flavour detection.
pub mod hypervisor;
pub mod layout;
pub mod pvm;

// The VMM proper (devices, event loop, boot, vCPU loop) runs on Linux.
#[cfg(target_os = "linux")]
pub mod boot;
#[cfg(target_os = "linux")]
pub mod bus;
#[cfg(target_os = "linux")]
pub mod config;
#[cfg(target_os = "linux")]
pub mod control;
#[cfg(target_os = "linux")]
pub mod devices;
#[cfg(target_os = "linux")]
pub mod event_loop;
#[cfg(target_os = "linux")]
pub mod exit;
#[cfg(all(target_os = "linux", feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(target_os = "linux")]
pub mod jail;
#[cfg(target_os = "linux")]
pub mod memory;
#[cfg(target_os = "linux")]
pub mod privileges;
#[cfg(target_os = "linux")]
pub mod seccomp;
#[cfg(target_os = "linux")]
pub mod snapshot;
#[cfg(target_os = "linux")]
pub mod timeline;
#[cfg(target_os = "linux")]
pub mod vcpu;
#[cfg(target_os = "linux")]
pub mod vm;

pub use hypervisor::Flavour;
pub use pvm::{detect, HostKind};
#[cfg(target_os = "linux")]
pub use {
    config::{ConsoleMode, PvmMode, SnapshotMode, VmConfig, VsockConfig},
    exit::ExitReason,
    timeline::Stage,
    vm::{
        kill_on_termination_signals, snapshot_identity_for, Created, Vm, VmExitReport, VmHandle,
        VmmError,
    },
};
