//! vCPU setup (CPUID, MSRs, FPU, local APIC) and the per-vCPU thread that runs guest code
//! and dispatches its exits to the port-I/O and MMIO buses.

pub mod cpuid;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::bus::Bus;
use crate::exit::{ExitReason, VmExit, VmFailure};
pub use crate::exit::{VcpuError, VcpuState};
use crate::hypervisor::{CpuidEntry, MsrEntry, SystemEventKind, VcpuExit, VcpuX86};
use crate::logging::{guest_debug, guest_warn};
use crate::seccomp::threads::ThreadKind;
use crate::timeline::{Stage, Timeline};

/// x87 control word at power-on (all exceptions masked, 64-bit precision).
const FPU_FCW: u16 = 0x37f;
/// MXCSR at power-on (all SSE exceptions masked).
const FPU_MXCSR: u32 = 0x1f80;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// IA32_MISC_ENABLE: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled, default type write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// MSR values every vCPU starts with. IA32_ARCH_CAPABILITIES (0x10a) is never set.
pub fn boot_msrs() -> Vec<MsrEntry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_LSTAR, 0),
        (MSR_CSTAR, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| MsrEntry { index, data })
    .collect()
}

/// Give vCPU `id` (of `count`) its CPUID, MSRs, FPU state and LAPIC wiring.
pub fn configure(
    vcpu: &dyn VcpuX86,
    id: u8,
    count: u8,
    supported_cpuid: &[CpuidEntry],
    pvm: bool,
) -> Result<(), VcpuError> {
    let setup = |source| VcpuError::Setup { vcpu: id, source };
    vcpu.set_cpuid(&cpuid::vcpu_cpuid(supported_cpuid, id, count, pvm))
        .map_err(setup)?;
    vcpu.set_msrs(&boot_msrs()).map_err(setup)?;
    vcpu.set_fpu(FPU_FCW, FPU_MXCSR).map_err(setup)?;
    vcpu.set_lapic_lints().map_err(setup)
}

/// Everything a vCPU thread shares with the rest of the VM.
#[derive(Clone, Debug)]
pub struct VcpuShared {
    /// Port-I/O devices.
    pub io_bus: Arc<Bus>,
    /// MMIO devices.
    pub mmio_bus: Arc<Bus>,
    /// Where a vCPU reports the end of the VM, and learns of it (`VmExit::stopped`).
    pub exit: Arc<VmExit>,
    /// Boot-stage timestamps.
    pub timeline: Arc<Timeline>,
    /// Exits handled by all vCPUs.
    pub exits: Arc<AtomicU64>,
    /// Benchmarks: end the VM at this stage of the boot vCPU (see `VmConfig::stop_at`).
    pub stop_at: Option<Stage>,
    /// The boot vCPU saves the ready snapshot when the guest is ready: its thread may
    /// write the snapshot files (see [`crate::seccomp::threads`]).
    pub saving: bool,
}

/// One vCPU and the loop that runs it.
#[derive(Debug)]
pub struct VcpuRunner {
    id: u8,
    vcpu: Box<dyn VcpuX86>,
    shared: VcpuShared,
}

/// What the loop does after handling one exit.
enum Next {
    Continue,
    Stop(Result<ExitReason, VcpuError>),
}

impl VcpuRunner {
    /// A runner for vCPU `id`.
    pub fn new(id: u8, vcpu: Box<dyn VcpuX86>, shared: VcpuShared) -> Self {
        Self { id, vcpu, shared }
    }

    /// Run until the VM stops. Any end this vCPU sees is reported through `VmExit`.
    /// Returns the vCPU (a snapshot saves it), no longer tied to this thread.
    pub fn run(mut self) -> Box<dyn VcpuX86> {
        self.shared.exit.add_kicker(self.vcpu.kicker());
        let boot_vcpu = self.id == 0;
        let kind = if boot_vcpu && self.shared.saving {
            ThreadKind::VcpuSaving
        } else {
            ThreadKind::Vcpu
        };
        if let Err(e) = crate::seccomp::threads::enter(kind) {
            self.shared.exit.request(Err(VmFailure::Seccomp(e)));
        }
        let mut first = boot_vcpu;
        while !self.shared.exit.stopped() {
            if first {
                self.shared.timeline.record(Stage::FirstVcpuEntry);
                if self.shared.stop_at == Some(Stage::FirstVcpuEntry) {
                    self.shared.exit.request(Ok(ExitReason::Killed));
                    break;
                }
            }
            let mut next = self.run_once();
            if first {
                self.shared.timeline.record(Stage::FirstGuestExit);
                first = false;
                if self.shared.stop_at == Some(Stage::FirstGuestExit)
                    && matches!(next, Next::Continue)
                {
                    next = Next::Stop(Ok(ExitReason::Killed));
                }
            }
            if let Next::Stop(outcome) = next {
                self.shared.exit.request(outcome.map_err(Into::into));
                break;
            }
        }
        self.vcpu.detach_thread();
        self.vcpu
    }

    fn state(&self) -> Box<VcpuState> {
        Box::new(VcpuState {
            regs: self.vcpu.regs().unwrap_or_default(),
            sregs: self.vcpu.special_regs().ok(),
        })
    }

    fn run_once(&mut self) -> Next {
        let id = self.id;
        let shared = &self.shared;
        let exit = match self.vcpu.run() {
            Ok(exit) => exit,
            Err(source) => return Next::Stop(Err(VcpuError::Run { vcpu: id, source })),
        };
        shared.exits.fetch_add(1, Ordering::Relaxed);
        let failure = match exit {
            VcpuExit::IoIn { port, data } => {
                if !shared.io_bus.read(u64::from(port), data) {
                    guest_debug!(port, "read of an unclaimed I/O port");
                    data.fill(0xff);
                }
                return Next::Continue;
            }
            VcpuExit::IoOut { port, data } => {
                if !shared.io_bus.write(u64::from(port), data) {
                    guest_debug!(port, "write to an unclaimed I/O port");
                }
                return Next::Continue;
            }
            VcpuExit::MmioRead { addr, data } => {
                if !shared.mmio_bus.read(addr, data) {
                    guest_debug!(addr, "read of unclaimed MMIO");
                    data.fill(0xff);
                }
                return Next::Continue;
            }
            VcpuExit::MmioWrite { addr, data } => {
                if !shared.mmio_bus.write(addr, data) {
                    guest_debug!(addr, "write to unclaimed MMIO");
                }
                return Next::Continue;
            }
            // With the in-kernel irqchip HLT does not exit; re-entering waits for an
            // interrupt either way.
            VcpuExit::Hlt | VcpuExit::Interrupted => return Next::Continue,
            VcpuExit::Shutdown => {
                return Next::Stop(Ok(ExitReason::TripleFault { vcpu: id }));
            }
            VcpuExit::SystemEvent { kind } => {
                let event = match kind {
                    SystemEventKind::Shutdown => "shutdown".to_string(),
                    SystemEventKind::Reset => "reset".to_string(),
                    SystemEventKind::Crash => "crash".to_string(),
                    SystemEventKind::Other(n) => format!("type {n}"),
                };
                return Next::Stop(Ok(ExitReason::SystemEvent { vcpu: id, event }));
            }
            VcpuExit::InternalError { suberror, data } => Failure::Emulation { suberror, data },
            VcpuExit::FailEntry { reason } => Failure::FailEntry { reason },
            VcpuExit::Other { code } => Failure::Unexpected { code },
        };
        let state = self.state();
        Next::Stop(Err(match failure {
            Failure::Emulation { suberror, data } => VcpuError::Emulation {
                vcpu: id,
                suberror,
                data,
                state,
            },
            Failure::FailEntry { reason } => VcpuError::FailEntry {
                vcpu: id,
                reason,
                state,
            },
            Failure::Unexpected { code } => {
                guest_warn!(vcpu = id, code, "unexpected vcpu exit");
                VcpuError::UnexpectedExit {
                    vcpu: id,
                    code,
                    state,
                }
            }
        }))
    }
}

/// An exit that ends the VM with an error.
enum Failure {
    Emulation { suberror: u32, data: [u64; 4] },
    FailEntry { reason: u64 },
    Unexpected { code: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{Regs, SpecialRegs};

    #[test]
    fn boot_msrs_never_touch_arch_capabilities() {
        let msrs = boot_msrs();

        assert!(msrs
            .iter()
            .all(|m| m.index != crate::pvm::MSR_ARCH_CAPABILITIES));
        assert!(msrs.contains(&MsrEntry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_ENABLE_WRITEBACK
        }));
    }

    #[test]
    fn vcpu_state_shows_the_registers_that_matter() {
        let state = VcpuState {
            regs: Regs {
                rip: 0xffff_ffff_8100_0000,
                ..Default::default()
            },
            sregs: Some(SpecialRegs {
                cr3: 0x1000,
                ..Default::default()
            }),
        };

        let text = state.to_string();

        assert!(text.starts_with("rip=0xffffffff81000000 "), "{text}");
        assert!(text.contains(" cr3=0x1000 "), "{text}");
    }
}
