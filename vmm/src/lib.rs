//! mxc-vm's virtual machine monitor.
#![deny(clippy::indexing_slicing)]

pub mod logging;

pub mod boot;
pub mod bus;
pub mod config;
pub mod devices;
pub mod hypervisor;
pub mod layout;
pub mod memory;
pub mod pvm;
pub mod timeline;
pub mod vcpu;
