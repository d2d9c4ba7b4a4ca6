//! How a VM ends: the first thread to see an end (a vCPU, a device, the event loop, a
//! `VmHandle::kill`) records why and wakes the thread waiting in `Vm::run`. Below
//! `vcpu`: a vCPU's failure ([`VcpuError`]) is one way a VM ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::hypervisor::{HypervisorError, Regs, SpecialRegs, VcpuKick};

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
    /// The VM was saved as a snapshot (`SnapshotMode::SaveAtReady`) and ended.
    Saved,
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
            ExitReason::Saved => write!(f, "saved as a snapshot"),
        }
    }
}

/// The register state of a vCPU when something went wrong, for the error message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: Regs,
    /// Control and segment registers, when they could be read.
    pub sregs: Option<SpecialRegs>,
}

impl std::fmt::Display for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.regs;
        write!(
            f,
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} \
             rsi={:#x} rdi={:#x} rbp={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
        )?;
        if let Some(s) = &self.sregs {
            write!(
                f,
                " cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            )?;
        }
        Ok(())
    }
}

/// Errors setting up or running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vcpu {vcpu}: setup failed")]
    Setup {
        vcpu: u8,
        #[source]
        source: HypervisorError,
    },
    #[error(
        "vcpu {vcpu}: the hypervisor could not emulate an instruction \
         (internal error {suberror}, data {data:x?}); {state}"
    )]
    Emulation {
        vcpu: u8,
        suberror: u32,
        data: [u64; 4],
        state: Box<VcpuState>,
    },
    #[error("vcpu {vcpu}: the hypervisor failed to enter the guest (reason {reason:#x}); {state}")]
    FailEntry {
        vcpu: u8,
        reason: u64,
        state: Box<VcpuState>,
    },
    #[error("vcpu {vcpu}: unexpected exit {code}; {state}")]
    UnexpectedExit {
        vcpu: u8,
        code: u32,
        state: Box<VcpuState>,
    },
    #[error("vcpu {vcpu}: run failed")]
    Run {
        vcpu: u8,
        #[source]
        source: HypervisorError,
    },
}

/// Why a VM ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum VmFailure {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("device event loop failed")]
    EventLoop(#[source] event_manager::Error),
    #[error("a VMM thread could not install its seccomp filter")]
    Seccomp(#[source] crate::seccomp::SeccompError),
}

/// The shared "VM is over" signal. Requesting an exit records the first outcome, raises
/// the stop flag every vCPU loop checks, kicks every vCPU out of guest code and wakes
/// whoever waits on the eventfd.
#[derive(Debug)]
pub struct VmExit {
    evt: EventFd,
    stop: AtomicBool,
    outcome: Mutex<Option<Result<ExitReason, VmFailure>>>,
    kickers: Mutex<Vec<Arc<dyn VcpuKick>>>,
}

impl VmExit {
    /// A fresh, unsignalled exit (its eventfd blocks on read).
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(0)?,
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            kickers: Mutex::new(Vec::new()),
        })
    }

    /// Kick this vCPU when the VM ends (and now, if it already ended).
    pub fn add_kicker(&self, kicker: Arc<dyn VcpuKick>) {
        if let Ok(mut kickers) = self.kickers.lock() {
            kickers.push(kicker.clone());
        }
        if self.stopped() {
            kicker.kick();
        }
    }

    /// End the VM with `outcome`, unless something ended it first.
    pub fn request(&self, outcome: Result<ExitReason, VmFailure>) {
        if let Ok(mut slot) = self.outcome.lock() {
            if slot.is_none() {
                *slot = Some(outcome);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        let kickers = self.kickers.lock().map(|k| k.clone()).unwrap_or_default();
        for kicker in kickers {
            kicker.kick();
        }
        // A full eventfd counter still wakes the waiter, so an error here changes nothing.
        let _ = self.evt.write(1);
    }

    /// Whether the VM is ending; vCPU loops return when this is set.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Block until the VM is asked to end.
    pub fn wait(&self) {
        while self.evt.read().is_err() {}
    }

    /// The recorded outcome (killed if none was recorded).
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

    #[derive(Debug, Default)]
    struct CountingKick(std::sync::atomic::AtomicU32);

    impl VcpuKick for CountingKick {
        fn kick(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_request_stops_and_kicks_every_vcpu() {
        let exit = VmExit::new().unwrap();
        let early = Arc::new(CountingKick::default());
        let late = Arc::new(CountingKick::default());
        exit.add_kicker(early.clone());

        exit.request(Ok(ExitReason::Killed));
        exit.add_kicker(late.clone());

        assert!(exit.stopped());
        assert_eq!(early.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            late.0.load(Ordering::SeqCst),
            1,
            "a vcpu added after the end is kicked at once"
        );
    }
}
