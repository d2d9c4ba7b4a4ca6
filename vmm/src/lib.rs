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

pub mod boot;
pub mod bus;
pub mod config;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod hypervisor;
pub mod layout;
pub mod memory;
pub mod pvm;
pub mod seccomp;
pub mod timeline;
pub mod vcpu;
pub mod vm;

pub use config::{ConsoleMode, PvmMode, VmConfig, VsockConfig};
pub use exit::ExitReason;
pub use hypervisor::Flavour;
pub use pvm::{detect, HostKind};
pub use timeline::Stage;
pub use vm::{kill_on_termination_signals, Vm, VmExitReport, VmHandle, VmmError};
