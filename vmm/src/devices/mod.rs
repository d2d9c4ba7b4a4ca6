//! Emulated devices, one folder per device.

pub mod virtio;
pub mod vsock;
