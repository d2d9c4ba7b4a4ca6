//! COM1: a 16550A UART from `vm-superio` on port 0x3F8, IRQ 4, output only. Present only
//! when the console is on (each byte the guest prints is a VM exit).

mod output;

use std::io::Write;

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

pub use self::output::{ConsoleOutput, CONSOLE_LIMIT};
use crate::devices::BusDevice;
use crate::hypervisor::InterruptLine;
use crate::layout::SERIAL_PORT_LEN;
use crate::logging::guest_debug;

/// Raises the UART's interrupt through its line to the irqchip.
#[derive(Debug)]
pub struct LineTrigger(Arc<dyn InterruptLine>);

impl Trigger for LineTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

/// The serial port on the I/O bus.
pub struct SerialDevice {
    serial: Serial<LineTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART writing to `out` and interrupting through `irq`.
    pub fn new(irq: Arc<dyn InterruptLine>, out: Box<dyn Write + Send>) -> Self {
        Self {
            serial: Serial::new(LineTrigger(irq), out),
        }
    }
}

/// The UART's registers, as a snapshot keeps them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Bytes received and not yet read by the guest (at most the 64-byte FIFO).
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    /// The registers now.
    pub fn save(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART with the saved registers (an interrupt the guest was owed is raised again).
    pub fn restored(
        irq: Arc<dyn InterruptLine>,
        out: Box<dyn Write + Send>,
        saved: &SerialSnapshot,
    ) -> std::io::Result<Self> {
        let state = SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        let serial = Serial::from_state(&state, LineTrigger(irq), NoEvents, out)
            .map_err(|e| std::io::Error::other(format!("serial state: {e:?}")))?;
        Ok(Self { serial })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match (data.first_mut(), u8::try_from(offset)) {
            (Some(byte), Ok(reg)) if data_len_ok(offset, 1) => *byte = self.serial.read(reg),
            _ => guest_debug!(offset, "serial: bad read"),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (data, u8::try_from(offset)) {
            ([value], Ok(reg)) if data_len_ok(offset, 1) => {
                if let Err(e) = self.serial.write(reg, *value) {
                    guest_debug!(error = ?e, "serial: write failed");
                }
            }
            _ => guest_debug!(offset, "serial: bad write"),
        }
    }
}

fn data_len_ok(offset: u64, len: u64) -> bool {
    offset + len <= u64::from(SERIAL_PORT_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_the_data_register_reach_the_output_and_interrupt() {
        let irq = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let mut dev = SerialDevice::new(Arc::new(irq.try_clone().unwrap()), Box::new(sink.clone()));

        dev.write(1, &[0x02]); // IER: THR-empty interrupt
        dev.write(0, b"h");
        dev.write(0, b"i");

        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn odd_sizes_and_offsets_are_ignored() {
        let irq = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let mut dev = SerialDevice::new(Arc::new(irq), Box::new(sink.clone()));
        let mut wide = [0xffu8; 4];

        dev.write(0, b"ab");
        dev.write(300, b"a");
        dev.write(0, b"");
        dev.read(0, &mut wide);
        dev.read(u64::MAX, &mut [0u8; 1]);

        assert!(sink.0.lock().unwrap().is_empty());
        assert_eq!(&wide[1..], &[0, 0, 0]);
    }
}
