//! Emulated devices, one folder per device.

pub mod virtio;

/// A device on the port-I/O or MMIO bus. `offset` is relative to the device's base.
///
/// Called from vCPU threads with guest-chosen offsets and sizes: implementations
/// must accept any `offset` and any `data` length without panicking (reads of nothing
/// leave `data` as the bus prepared it).
pub trait BusDevice: Send + std::fmt::Debug {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}
