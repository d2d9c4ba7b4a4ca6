//! mxc-vm's virtual machine monitor.
#![deny(clippy::indexing_slicing)]

pub mod logging;

pub mod bus;
pub mod devices;
pub mod hypervisor;
pub mod layout;
pub mod memory;
