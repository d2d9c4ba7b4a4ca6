//! How a VM ends: the first thread to see an end (a vCPU, a device, the event loop, a
//! `VmHandle::kill`) records why and wakes the thread waiting in `Vm::run`.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu::VcpuError;

/// Why a VM ended without an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest pulsed the i8042 reset line (port 0x64 ← 0xFE): a reboot or power-off.
    GuestReset,
    /// A vCPU shut down (triple fault).
    TripleFault { vcpu: u8 },
    /// The hypervisor reported a guest power-off/reset/crash event.
    SystemEvent { vcpu: u8, event: String },
    /// `VmHandle::kill`, SIGTERM or SIGINT.
    Killed,
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestReset => write!(f, "guest reset/poweroff"),
            ExitReason::TripleFault { vcpu } => write!(f, "vcpu {vcpu} shut down (triple fault)"),
            ExitReason::SystemEvent { vcpu, event } => {
                write!(f, "vcpu {vcpu} system event: {event}")
            }
            ExitReason::Killed => write!(f, "killed"),
        }
    }
}

/// Why a VM ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum VmFailure {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("device event loop failed")]
    EventLoop(#[source] event_manager::Error),
}

/// The shared "VM is over" signal.
#[derive(Debug)]
pub struct VmExit {
    evt: EventFd,
    outcome: Mutex<Option<Result<ExitReason, VmFailure>>>,
}

impl VmExit {
    /// A fresh, unsignalled exit (its eventfd blocks on read).
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(0)?,
            outcome: Mutex::new(None),
        })
    }

    /// End the VM with `outcome`, unless something ended it first.
    pub fn request(&self, outcome: Result<ExitReason, VmFailure>) {
        if let Ok(mut slot) = self.outcome.lock() {
            if slot.is_none() {
                *slot = Some(outcome);
            }
        }
        // A full eventfd counter still wakes the waiter, so an error here changes nothing.
        let _ = self.evt.write(1);
    }

    /// Block until the VM is asked to end.
    pub fn wait(&self) {
        while self.evt.read().is_err() {}
    }

    /// The recorded outcome; a bare eventfd write (the signal handler's) means killed.
    pub fn take(&self) -> Result<ExitReason, VmFailure> {
        self.outcome
            .lock()
            .ok()
            .and_then(|mut slot| slot.take())
            .unwrap_or(Ok(ExitReason::Killed))
    }

    /// Whether an outcome was recorded.
    pub fn requested(&self) -> bool {
        self.outcome.lock().map(|o| o.is_some()).unwrap_or(true)
    }

    /// The eventfd the waiter blocks on.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_wins() {
        let exit = VmExit::new().unwrap();

        exit.request(Ok(ExitReason::GuestReset));
        exit.request(Ok(ExitReason::Killed));
        exit.wait();

        assert_eq!(exit.take().unwrap(), ExitReason::GuestReset);
    }

    #[test]
    fn a_bare_wakeup_means_killed() {
        let exit = VmExit::new().unwrap();

        exit.eventfd().write(1).unwrap();
        exit.wait();

        assert_eq!(exit.take().unwrap(), ExitReason::Killed);
    }
}
