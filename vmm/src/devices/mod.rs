//! Emulated devices, one folder per device.

pub mod fs;
pub mod virtio;
pub mod vsock;
