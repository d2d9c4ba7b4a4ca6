//! Emulated devices, one folder per device.

pub mod boot_timer;
pub mod fs;
pub mod i8042;
pub mod serial;
pub mod virtio;
pub mod vsock;

/// A device on the port-I/O or MMIO bus. `offset` is relative to the device's base.
///
/// Called from vCPU threads with guest-chosen offsets and sizes: implementations
/// must accept any `offset` and any `data` length without panicking.
pub trait BusDevice: Send + std::fmt::Debug {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Reads as zero, ignores writes. Stands in for legacy PC ports a kernel may poke
/// (the CMOS RTC at 0x70/0x71) so that its reads do not float to 0xFF.
#[derive(Debug, Default)]
pub struct ZeroDevice;

impl BusDevice for ZeroDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}
