//! The kernel command line the VMM builds: its own base flags, one
//! `virtio_mmio.device=` entry per virtio device, the console, the PVM flags (only under
//! `kvm_pvm`) and the caller's extra text.

use std::fmt::Write as _;

use crate::layout::{virtio_mmio_addr, virtio_mmio_irq, CMDLINE_MAX, VIRTIO_MMIO_SIZE};

/// Flags every boot gets: a reboot goes through the i8042 reset line (which ends the
/// VM), a panic reboots at once, no module loading.
pub const BASE_CMDLINE: &str = "reboot=k panic=-1 nomodule";

/// Console flags when the serial console is on.
pub const CONSOLE_CMDLINE: &str = "console=ttyS0";

/// Errors building the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("kernel command line is {len} bytes, longer than the kernel's limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("kernel command line contains a control character or NUL")]
    BadCharacter,
}

/// Inputs of the command line.
#[derive(Clone, Debug, Default)]
pub struct CmdlineParts<'a> {
    /// Number of virtio-mmio slots in use (slots 0..n).
    pub virtio_slots: u32,
    /// Whether the serial console is on.
    pub console: bool,
    /// PVM flags; empty when not under `kvm_pvm`.
    pub pvm: &'a str,
    /// The caller's additions, last so they can override.
    pub extra: &'a str,
}

/// Build the command line (without the trailing NUL).
pub fn build(parts: &CmdlineParts<'_>) -> Result<String, CmdlineError> {
    let mut line = String::with_capacity(256);
    line.push_str(BASE_CMDLINE);
    if parts.console {
        line.push(' ');
        line.push_str(CONSOLE_CMDLINE);
    }
    for slot in 0..parts.virtio_slots {
        // Writing into a String cannot fail.
        let _ = write!(
            line,
            " virtio_mmio.device={}K@{:#x}:{}",
            VIRTIO_MMIO_SIZE >> 10,
            virtio_mmio_addr(slot),
            virtio_mmio_irq(slot)
        );
    }
    for part in [parts.pvm, parts.extra] {
        let part = part.trim();
        if !part.is_empty() {
            line.push(' ');
            line.push_str(part);
        }
    }
    if line.chars().any(|c| c.is_control()) {
        return Err(CmdlineError::BadCharacter);
    }
    // The kernel's limit includes the NUL terminator.
    if line.len() >= CMDLINE_MAX {
        return Err(CmdlineError::TooLong {
            len: line.len(),
            max: CMDLINE_MAX - 1,
        });
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_devices_are_announced_in_slot_order() {
        let parts = CmdlineParts {
            virtio_slots: 2,
            ..Default::default()
        };

        let line = build(&parts).unwrap();

        assert_eq!(
            line,
            "reboot=k panic=-1 nomodule virtio_mmio.device=4K@0xd0001000:5 \
             virtio_mmio.device=4K@0xd0002000:6"
        );
    }

    #[test]
    fn console_pvm_and_extra_come_in_order() {
        let parts = CmdlineParts {
            virtio_slots: 0,
            console: true,
            pvm: " noxsave ",
            extra: "quiet init=/init",
        };

        let line = build(&parts).unwrap();

        assert_eq!(
            line,
            "reboot=k panic=-1 nomodule console=ttyS0 noxsave quiet init=/init"
        );
    }

    #[test]
    fn overlong_or_control_characters_are_refused() {
        let long = "x".repeat(CMDLINE_MAX);
        let too_long = CmdlineParts {
            extra: &long,
            ..Default::default()
        };
        let newline = CmdlineParts {
            extra: "a\nb",
            ..Default::default()
        };

        assert!(matches!(
            build(&too_long),
            Err(CmdlineError::TooLong { .. })
        ));
        assert_eq!(build(&newline), Err(CmdlineError::BadCharacter));
    }
}
