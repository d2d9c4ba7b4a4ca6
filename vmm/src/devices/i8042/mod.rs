//! The part of the i8042 keyboard controller a Linux guest uses to reboot: writing
//! 0xFE (pulse the reset line) to the command port ends the VM. Everything else reads
//! as an idle controller (no data, input buffer empty) and is otherwise ignored.

use std::sync::Arc;

use crate::devices::BusDevice;
use crate::exit::{ExitReason, VmExit};
use crate::layout::{I8042_CMD_RESET, I8042_COMMAND_PORT, I8042_DATA_PORT};

/// Ports the device covers, from the data port to the command port.
pub const I8042_PORT_LEN: u16 = I8042_COMMAND_PORT - I8042_DATA_PORT + 1;
const COMMAND_OFFSET: u64 = (I8042_COMMAND_PORT - I8042_DATA_PORT) as u64;

/// The reset-only i8042.
#[derive(Debug)]
pub struct I8042 {
    exit: Arc<VmExit>,
}

impl I8042 {
    /// A controller whose reset ends the VM through `exit`.
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty (ready for a command).
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&I8042_CMD_RESET) {
            self.exit.request(Ok(ExitReason::GuestReset));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut dev = I8042::new(exit.clone());

        dev.write(COMMAND_OFFSET, &[I8042_CMD_RESET]);
        exit.wait();

        assert_eq!(exit.take().unwrap(), ExitReason::GuestReset);
    }

    #[test]
    fn other_writes_do_nothing_and_status_reads_idle() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        let mut status = [0xffu8; 1];

        dev.write(0, &[I8042_CMD_RESET]);
        dev.write(COMMAND_OFFSET, &[0xaa]);
        dev.write(COMMAND_OFFSET, &[]);
        dev.read(COMMAND_OFFSET, &mut status);

        assert_eq!(status, [0]);
        assert!(!exit.requested());
    }
}
