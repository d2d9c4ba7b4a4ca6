//! Snapshot state of KVM VMs and vCPUs. Each `kvm_*` state struct is kept as its bytes
//! (kvm-bindings derives `zerocopy` for them), one named part per ioctl, and set back in
//! the order KVM needs: CPUID before anything that depends on it, the MSRs after the
//! LAPIC, pending events last.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::{immediate_exit_flag, KvmVcpu, KvmVm};
use crate::hypervisor::{HypervisorError, Result, SavedState};

/// The name snapshots record for this backend.
const BACKEND: &str = "kvm";

/// MSRs read or written per ioctl.
const MSR_CHUNK: usize = 64;

/// The in-kernel interrupt controllers, by part name.
const IRQCHIPS: [(&str, u32); 3] = [
    ("pic_master", KVM_IRQCHIP_PIC_MASTER),
    ("pic_slave", KVM_IRQCHIP_PIC_SLAVE),
    ("ioapic", KVM_IRQCHIP_IOAPIC),
];

/// Size of `kvm_xsave`, the area KVM_GET/SET_XSAVE move.
const XSAVE_STRUCT_SIZE: i32 = 4096;

/// What snapshots need to know of this host's KVM, asked once per process when the first
/// vCPU is saved or restored (never on a plain boot): the MSRs KVM lists, and whether
/// its XSAVE area fits `kvm_xsave` (KVM_CAP_XSAVE2 is 0 where there is no larger one).
struct HostKvm {
    msrs: Vec<u32>,
    xsave_fits: bool,
}

fn host_kvm() -> Result<&'static HostKvm> {
    static HOST: OnceLock<HostKvm> = OnceLock::new();
    if let Some(host) = HOST.get() {
        return Ok(host);
    }
    let kvm = Kvm::new().map_err(|e| HypervisorError::call("open /dev/kvm", e))?;
    let msrs = kvm
        .get_msr_index_list()
        .map_err(call("KVM_GET_MSR_INDEX_LIST"))?;
    let host = HostKvm {
        msrs: msrs.as_slice().to_vec(),
        xsave_fits: kvm.check_extension_int(Cap::Xsave2) <= XSAVE_STRUCT_SIZE,
    };
    Ok(HOST.get_or_init(|| host))
}

/// A saved part as the struct it was, if its size is exactly right.
fn read_part<T: FromBytes>(state: &SavedState, name: &'static str) -> Result<T> {
    T::read_from_bytes(state.part(name)?).map_err(|_| HypervisorError::BadState {
        part: name,
        why: "wrong size",
    })
}

/// A saved list of `T`s.
fn read_list<T: FromBytes>(state: &SavedState, name: &'static str) -> Result<Vec<T>> {
    let bytes = state.part(name)?;
    let size = std::mem::size_of::<T>();
    if size == 0 || bytes.len() % size != 0 {
        return Err(HypervisorError::BadState {
            part: name,
            why: "not a whole number of entries",
        });
    }
    bytes
        .chunks_exact(size)
        .map(|chunk| {
            T::read_from_bytes(chunk).map_err(|_| HypervisorError::BadState {
                part: name,
                why: "wrong size",
            })
        })
        .collect()
}

fn bytes_of<T: IntoBytes + Immutable + ?Sized>(value: &T) -> Vec<u8> {
    value.as_bytes().to_vec()
}

fn call(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::call(op, e)
}

impl KvmVm {
    /// `Vm::save_state`: the PICs and IOAPIC, the PIT (where the VM has one), the clock.
    pub(super) fn save(&self) -> Result<SavedState> {
        let mut state = SavedState::new(BACKEND);
        for (name, chip_id) in IRQCHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(call("KVM_GET_IRQCHIP"))?;
            state.push(name, bytes_of(&chip));
        }
        if self.pit {
            let pit = self.fd.get_pit2().map_err(call("KVM_GET_PIT2"))?;
            state.push("pit", bytes_of(&pit));
        }
        let clock = self.fd.get_clock().map_err(call("KVM_GET_CLOCK"))?;
        state.push("clock", bytes_of(&clock));
        Ok(state)
    }

    /// `Vm::restore_state`.
    pub(super) fn restore(&self, state: &SavedState) -> Result<()> {
        state.check_backend(BACKEND)?;
        match (self.pit, state.optional_part("pit").is_some()) {
            (true, true) => {
                let pit: kvm_pit_state2 = read_part(state, "pit")?;
                self.fd.set_pit2(&pit).map_err(call("KVM_SET_PIT2"))?;
            }
            (false, false) => {}
            _ => {
                return Err(HypervisorError::BadState {
                    part: "pit",
                    why: "saved on a host whose KVM differs in the TSC-deadline timer",
                })
            }
        }
        let mut clock: kvm_clock_data = read_part(state, "clock")?;
        // Only the clock value goes back; the flags describe the saving host.
        clock.flags = 0;
        self.fd.set_clock(&clock).map_err(call("KVM_SET_CLOCK"))?;
        for (name, chip_id) in IRQCHIPS {
            let chip: kvm_irqchip = read_part(state, name)?;
            if chip.chip_id != chip_id {
                return Err(HypervisorError::BadState {
                    part: name,
                    why: "names another interrupt controller",
                });
            }
            self.fd
                .set_irqchip(&chip)
                .map_err(call("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

impl KvmVcpu {
    /// Complete the I/O the last exit left half done (KVM finishes it at the start of
    /// the next `KVM_RUN`; with `immediate_exit` set that run returns at once).
    fn finish_pending_io(&mut self) -> Result<()> {
        // SAFETY: `self.run` is this vCPU's live kvm_run mapping.
        let flag = unsafe { immediate_exit_flag(self.run) };
        flag.store(1, Ordering::SeqCst);
        let outcome = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(HypervisorError::call("KVM_RUN", e)),
            Ok(_) => Err(HypervisorError::InvalidArgument(
                "the vCPU exited again while finishing its I/O; it cannot be saved now",
            )),
        };
        flag.store(0, Ordering::SeqCst);
        outcome
    }

    /// `VcpuX86::save_state`.
    pub(super) fn save(&mut self) -> Result<SavedState> {
        self.finish_pending_io()?;
        let mut state = SavedState::new(BACKEND);
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(call("KVM_GET_CPUID2"))?;
        state.push("cpuid", bytes_of(cpuid.as_slice()));
        let mp_state = self.fd.get_mp_state().map_err(call("KVM_GET_MP_STATE"))?;
        state.push("mp_state", bytes_of(&mp_state));
        let regs = self.fd.get_regs().map_err(call("KVM_GET_REGS"))?;
        state.push("regs", bytes_of(&regs));
        let sregs = self.fd.get_sregs().map_err(call("KVM_GET_SREGS"))?;
        state.push("sregs", bytes_of(&sregs));
        if !host_kvm()?.xsave_fits {
            return Err(HypervisorError::Unsupported(
                "snapshots of vCPUs whose XSAVE state is over 4 KiB",
            ));
        }
        let xsave = self.fd.get_xsave().map_err(call("KVM_GET_XSAVE"))?;
        state.push("xsave", bytes_of(&xsave));
        let xcrs = self.fd.get_xcrs().map_err(call("KVM_GET_XCRS"))?;
        state.push("xcrs", bytes_of(&xcrs));
        let debugregs = self
            .fd
            .get_debug_regs()
            .map_err(call("KVM_GET_DEBUGREGS"))?;
        state.push("debugregs", bytes_of(&debugregs));
        let lapic = self.fd.get_lapic().map_err(call("KVM_GET_LAPIC"))?;
        state.push("lapic", bytes_of(&lapic));
        state.push("msrs", bytes_of(self.read_msrs()?.as_slice()));
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(call("KVM_GET_VCPU_EVENTS"))?;
        state.push("events", bytes_of(&events));
        Ok(state)
    }

    /// Every MSR KVM lists that can be read (one that cannot is left out).
    fn read_msrs(&self) -> Result<Vec<kvm_msr_entry>> {
        let list = &host_kvm()?.msrs;
        let mut saved = Vec::with_capacity(list.len());
        let mut rest: &[u32] = list;
        while !rest.is_empty() {
            let chunk: Vec<kvm_msr_entry> = rest
                .iter()
                .take(MSR_CHUNK)
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&chunk)
                .map_err(|_| HypervisorError::InvalidArgument("too many msrs"))?;
            let read = self.fd.get_msrs(&mut msrs).map_err(call("KVM_GET_MSRS"))?;
            saved.extend(msrs.as_slice().iter().take(read).copied());
            // KVM stops at the first MSR it cannot read: skip that one.
            let step = if read < chunk.len() { read + 1 } else { read };
            rest = rest.get(step..).unwrap_or_default();
        }
        Ok(saved)
    }

    /// Write `entries`, skipping (and logging) each one this KVM refuses.
    fn write_msrs(&self, entries: &[kvm_msr_entry]) -> Result<()> {
        let mut rest = entries;
        while !rest.is_empty() {
            let chunk = rest.get(..rest.len().min(MSR_CHUNK)).unwrap_or_default();
            let msrs = Msrs::from_entries(chunk)
                .map_err(|_| HypervisorError::InvalidArgument("too many msrs"))?;
            let written = self.fd.set_msrs(&msrs).map_err(call("KVM_SET_MSRS"))?;
            let step = if written < chunk.len() {
                if let Some(refused) = chunk.get(written) {
                    tracing::debug!(index = refused.index, "restore: MSR refused, left out");
                }
                written + 1
            } else {
                written
            };
            rest = rest.get(step..).unwrap_or_default();
        }
        Ok(())
    }

    /// `VcpuX86::restore_state`.
    pub(super) fn restore(&self, state: &SavedState) -> Result<()> {
        state.check_backend(BACKEND)?;
        let entries: Vec<kvm_cpuid_entry2> = read_list(state, "cpuid")?;
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|_| HypervisorError::InvalidArgument("too many cpuid entries"))?;
        self.fd.set_cpuid2(&cpuid).map_err(call("KVM_SET_CPUID2"))?;
        let mp_state: kvm_mp_state = read_part(state, "mp_state")?;
        self.fd
            .set_mp_state(mp_state)
            .map_err(call("KVM_SET_MP_STATE"))?;
        let regs: kvm_regs = read_part(state, "regs")?;
        self.fd.set_regs(&regs).map_err(call("KVM_SET_REGS"))?;
        let sregs: kvm_sregs = read_part(state, "sregs")?;
        self.fd.set_sregs(&sregs).map_err(call("KVM_SET_SREGS"))?;
        let xsave: kvm_xsave = read_part(state, "xsave")?;
        if !host_kvm()?.xsave_fits {
            return Err(HypervisorError::Unsupported(
                "restoring on a host whose XSAVE state is over 4 KiB",
            ));
        }
        // SAFETY: KVM's XSAVE area is at most the 4 KiB of `kvm_xsave` (`xsave_fits`,
        // from KVM_CAP_XSAVE2), so KVM reads nothing past the struct.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(call("KVM_SET_XSAVE"))?;
        let xcrs: kvm_xcrs = read_part(state, "xcrs")?;
        self.fd.set_xcrs(&xcrs).map_err(call("KVM_SET_XCRS"))?;
        let debugregs: kvm_debugregs = read_part(state, "debugregs")?;
        self.fd
            .set_debug_regs(&debugregs)
            .map_err(call("KVM_SET_DEBUGREGS"))?;
        let lapic: kvm_lapic_state = read_part(state, "lapic")?;
        self.fd.set_lapic(&lapic).map_err(call("KVM_SET_LAPIC"))?;
        let msrs: Vec<kvm_msr_entry> = read_list(state, "msrs")?;
        self.write_msrs(&msrs)?;
        let events: kvm_vcpu_events = read_part(state, "events")?;
        self.fd
            .set_vcpu_events(&events)
            .map_err(call("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}
