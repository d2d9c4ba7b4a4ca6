//! The KVM backend of the hypervisor traits, on `kvm-ioctls`.
//!
//! How each call maps to the Windows Hypervisor Platform, for a later `whp.rs`:
//!
//! | trait method | KVM | WHP |
//! |---|---|---|
//! | `create_vm` | `KVM_CREATE_VM` | `WHvCreatePartition` + `WHvSetPartitionProperty` (processor count, APIC emulation mode) + `WHvSetupPartition` |
//! | `supported_cpuid` | `KVM_GET_SUPPORTED_CPUID` | `WHvGetCapability(ProcessorFeatures…)`; results set with `WHvPartitionPropertyCodeCpuidResultList` |
//! | `map_memory` | `KVM_SET_USER_MEMORY_REGION` | `WHvMapGpaRange` |
//! | `create_irqchip` | `KVM_CREATE_IRQCHIP` | xAPIC emulation via `WHvPartitionPropertyCodeLocalApicEmulationMode`; IOAPIC/PIC emulated in the VMM |
//! | `create_vcpu` | `KVM_CREATE_VCPU` | `WHvCreateVirtualProcessor` |
//! | `set_irq_line` | `KVM_IRQ_LINE` | VMM IOAPIC model → `WHvRequestInterrupt` |
//! | `interrupt_line` | an eventfd + `KVM_IRQFD` | `WHvRequestInterrupt` on each trigger |
//! | `register_ioeventfd` | `KVM_IOEVENTFD` | `Err(Unsupported)`: the write traps and the transport signals the event |
//! | `run` | `KVM_RUN` | `WHvRunVirtualProcessor` (+ `WHvEmulatorTryIoEmulation`/`TryMmioEmulation` to decode the access) |
//! | `kicker().kick()` | `immediate_exit` + a signal | `WHvCancelRunVirtualProcessor` |
//! | `regs`/`special_regs` and setters | `KVM_GET/SET_REGS`, `KVM_GET/SET_SREGS` | `WHvGet/SetVirtualProcessorRegisters` |
//! | `set_cpuid` | `KVM_SET_CPUID2` | partition-wide CPUID result list (per-vCPU APIC ID from the APIC) |
//! | `set_msrs` | `KVM_SET_MSRS` | `WHvSetVirtualProcessorRegisters` for the MSRs WHP names |
//! | `set_fpu` | `KVM_SET_FPU` | `WHvX64RegisterFpControlStatus` / `XmmControlStatus` |
//! | `set_lapic_lints` | `KVM_GET/SET_LAPIC` | `WHvGet/SetVirtualProcessorInterruptControllerState2` |

mod state;

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Once};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_dtable, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_run, kvm_segment,
    kvm_userspace_memory_region, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::{
    CpuidEntry, DescriptorTable, Flavour, HostKind, Hypervisor, HypervisorError, InterruptLine,
    IoEventAddress, MsrEntry, Regs, Result, SavedState, Segment, SpecialRegs, SystemEventKind,
    Vcpu, VcpuExit, VcpuKick, VcpuX86, Vm,
};

/// Path of the KVM device.
pub const KVM_PATH: &str = "/dev/kvm";

/// Guest-physical address of the 3-page TSS region Intel VMX needs (inside the MMIO gap,
/// away from every device).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Offsets of the local APIC LVT LINT0/LINT1 registers in the APIC page.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
/// Delivery-mode field values of an LVT entry (bits 8..=10).
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// Where the KVM vendor modules announce themselves.
const KVM_PVM_MODULE: &str = "/sys/module/kvm_pvm";
const KVM_INTEL_MODULE: &str = "/sys/module/kvm_intel";
const KVM_AMD_MODULE: &str = "/sys/module/kvm_amd";

/// CPUID leaf 1 ECX bits: VMX, TSC-deadline timer, running under a hypervisor.
const CPUID_1_ECX_VMX: u32 = 1 << 5;
const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 0x8000_0001 ECX bit: SVM.
const CPUID_8000_0001_ECX_SVM: u32 = 1 << 2;

/// Which kind of KVM this host's `/dev/kvm` is, from the vendor module that is loaded
/// (`kvm_pvm`, `kvm_intel`, `kvm_amd`), else from the host CPU's own VMX/SVM bits.
/// Detected once per process (the modules cannot change under a running VMM).
pub fn detect_flavour() -> Flavour {
    static FLAVOUR: std::sync::OnceLock<Flavour> = std::sync::OnceLock::new();
    *FLAVOUR.get_or_init(probe_flavour)
}

fn probe_flavour() -> Flavour {
    let loaded = |module: &str| std::path::Path::new(module).exists();
    if loaded(KVM_PVM_MODULE) {
        Flavour::Pvm
    } else if loaded(KVM_AMD_MODULE) {
        Flavour::HardwareSvm
    } else if loaded(KVM_INTEL_MODULE) || host_cpuid(1).2 & CPUID_1_ECX_VMX != 0 {
        Flavour::HardwareVmx
    } else if host_cpuid(0x8000_0001).2 & CPUID_8000_0001_ECX_SVM != 0 {
        Flavour::HardwareSvm
    } else {
        // /dev/kvm without VMX, SVM or a module we know: treat it like the one other
        // software-backed KVM we know, which is the cautious choice (filtered CPUID).
        Flavour::Pvm
    }
}

/// What this host offers: `/dev/kvm` opens, its flavour, and whether the host is
/// itself a VM.
pub fn detect_host() -> HostKind {
    if let Err(e) = probe() {
        return HostKind::NoKvm(format!("{KVM_PATH}: {e}"));
    }
    match detect_flavour() {
        Flavour::Pvm => HostKind::Pvm,
        flavour => HostKind::HardwareKvm {
            flavour,
            nested: host_is_virtual(),
        },
    }
}

/// Whether this host is itself a virtual machine: its CPUID has the hypervisor bit (a
/// nested KVM, as in a cloud VM or our nested test lane, rather than bare metal).
pub fn host_is_virtual() -> bool {
    host_cpuid(1).2 & CPUID_1_ECX_HYPERVISOR != 0
}

/// The host CPU's CPUID `leaf` (sub-leaf 0) as (eax, ebx, ecx, edx); zeros for a leaf
/// above the CPU's maximum.
fn host_cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    use std::arch::x86_64::__cpuid;
    let max = __cpuid(leaf & 0x8000_0000).eax;
    if leaf > max {
        return (0, 0, 0, 0);
    }
    let r = __cpuid(leaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// KVM, opened from `/dev/kvm`.
#[derive(Debug)]
pub struct KvmHypervisor {
    kvm: Kvm,
    flavour: Flavour,
}

impl KvmHypervisor {
    /// Open `/dev/kvm` (close-on-exec) and find out what backs it.
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| HypervisorError::Open {
            path: KVM_PATH,
            source: e.into(),
        })?;
        Ok(Self {
            kvm,
            flavour: detect_flavour(),
        })
    }

    /// Whether KVM emulates the LAPIC's TSC-deadline mode (it does not list the CPUID
    /// bit in `KVM_GET_SUPPORTED_CPUID`, because userspace must opt in).
    fn tsc_deadline_timer(&self) -> bool {
        self.kvm.check_extension(Cap::TscDeadlineTimer)
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// WHP: `WHvCreatePartition` + properties + `WHvSetupPartition`.
    fn create_vm(&self) -> Result<Box<dyn Vm>> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| HypervisorError::call("KVM_CREATE_VM", e))?;
        Ok(Box::new(KvmVm {
            fd,
            pit: !self.tsc_deadline_timer(),
        }))
    }

    /// WHP: `WHvGetCapability` for the processor features.
    ///
    /// With `KVM_CAP_TSC_DEADLINE_TIMER` the TSC-deadline bit is added: KVM emulates that
    /// LAPIC timer mode on every flavour but leaves the bit out of the supported set, and a
    /// Linux guest without it (and without a PIT) has no working timer under hardware
    /// KVM ("APIC timer disabled due to verification failure").
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| HypervisorError::call("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut entries: Vec<CpuidEntry> = cpuid.as_slice().iter().map(cpuid_from_kvm).collect();
        if self.tsc_deadline_timer() {
            for e in entries.iter_mut().filter(|e| e.function == 1) {
                e.ecx |= CPUID_1_ECX_TSC_DEADLINE;
            }
        }
        Ok(entries)
    }
}

/// A KVM virtual machine.
#[derive(Debug)]
pub struct KvmVm {
    fd: VmFd,
    /// Whether `create_irqchip` adds a PIT (only where there is no TSC-deadline timer).
    pit: bool,
}

impl Vm for KvmVm {
    /// WHP: `WHvMapGpaRange`.
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees the host range is a valid mapping that outlives
        // the VM (this function's contract).
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| HypervisorError::call("KVM_SET_USER_MEMORY_REGION", e))
    }

    /// WHP: local APIC emulation as a partition property; IOAPIC and PIC in the VMM.
    ///
    /// A PIT only where KVM has no TSC-deadline timer: elsewhere the guest times with
    /// kvmclock and the TSC-deadline LAPIC timer (see `supported_cpuid`), and
    /// `KVM_CREATE_PIT2` costs a kernel thread per VM (0.1-4 ms, measured).
    fn create_irqchip(&self) -> Result<()> {
        self.fd
            .set_tss_address(TSS_ADDRESS)
            .map_err(|e| HypervisorError::call("KVM_SET_TSS_ADDR", e))?;
        self.fd
            .create_irq_chip()
            .map_err(|e| HypervisorError::call("KVM_CREATE_IRQCHIP", e))?;
        if self.pit {
            let config = kvm_bindings::kvm_pit_config {
                flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            self.fd
                .create_pit2(config)
                .map_err(|e| HypervisorError::call("KVM_CREATE_PIT2", e))?;
        }
        Ok(())
    }

    /// WHP: `WHvCreateVirtualProcessor`.
    fn create_vcpu(&self, id: u8) -> Result<Box<dyn VcpuX86>> {
        let mut fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| HypervisorError::call("KVM_CREATE_VCPU", e))?;
        let run = fd.get_kvm_run() as *mut kvm_run;
        let kick = Arc::new(KvmKick {
            target: Mutex::new(KickTarget {
                run: run as usize,
                thread: None,
            }),
        });
        Ok(Box::new(KvmVcpu {
            fd,
            run,
            kick,
            bound: false,
        }))
    }

    /// WHP: the VMM's IOAPIC model, then `WHvRequestInterrupt`.
    fn set_irq_line(&self, gsi: u32, high: bool) -> Result<()> {
        self.fd
            .set_irq_line(gsi, high)
            .map_err(|e| HypervisorError::call("KVM_IRQ_LINE", e))
    }

    /// An eventfd registered as an irqfd: each write raises `gsi` in the kernel.
    fn interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>> {
        let fd = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
            .map_err(|e| HypervisorError::call("eventfd", e))?;
        self.fd
            .register_irqfd(&fd, gsi)
            .map_err(|e| HypervisorError::call("KVM_IRQFD", e))?;
        Ok(Arc::new(fd))
    }

    /// WHP: `Err(Unsupported)`.
    fn register_ioeventfd(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let addr = match addr {
            IoEventAddress::Pio(a) => kvm_ioctls::IoEventAddress::Pio(a),
            IoEventAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
        };
        let res = match datamatch {
            Some(value) => self.fd.register_ioevent(fd, &addr, value),
            None => self.fd.register_ioevent(fd, &addr, kvm_ioctls::NoDatamatch),
        };
        res.map_err(|e| HypervisorError::call("KVM_IOEVENTFD", e))
    }

    /// WHP: `Err(Unsupported)` for now.
    fn save_state(&self) -> Result<SavedState> {
        self.save()
    }

    fn restore_state(&self, state: &SavedState) -> Result<()> {
        self.restore(state)
    }
}

/// What a kick needs to reach a vCPU: its `kvm_run` page and the thread running it.
#[derive(Debug)]
struct KickTarget {
    /// Address of the vCPU's `kvm_run` mapping; 0 once the vCPU is dropped.
    run: usize,
    /// The thread (its id) that last called `run`.
    thread: Option<libc::pid_t>,
}

/// Kicks a KVM vCPU out of `KVM_RUN`: sets `immediate_exit` (so a `KVM_RUN` that has
/// not started yet returns at once) and signals the vCPU thread (so one in progress
/// returns with `EINTR`).
#[derive(Debug)]
struct KvmKick {
    target: Mutex<KickTarget>,
}

impl VcpuKick for KvmKick {
    fn kick(&self) {
        let Ok(target) = self.target.lock() else {
            return;
        };
        if target.run == 0 {
            return;
        }
        // SAFETY: `run` points at the vCPU's live kvm_run mapping: the vCPU clears it
        // under this lock before unmapping. `immediate_exit` is a u8 the kernel reads at
        // KVM_RUN entry; writing it atomically from another thread is the documented use.
        let flag = unsafe { immediate_exit_flag(target.run as *mut kvm_run) };
        flag.store(1, Ordering::SeqCst);
        if let Some(thread) = target.thread {
            // SAFETY: `thread` is the live vCPU thread: it is recorded by `run` and
            // cleared (under this lock) when the vCPU is dropped on that thread, before
            // it exits. The kick signal has a no-op handler. tgkill names this process
            // (the only one the VMM's seccomp filter lets it signal), whichever libc
            // (musl's pthread_kill is tkill).
            unsafe {
                libc::syscall(libc::SYS_tgkill, libc::getpid(), thread, kick_signal());
            }
        }
    }
}

/// The `immediate_exit` byte of a `kvm_run` page, as an atomic.
///
/// # Safety
/// `run` must point at a live `kvm_run` mapping for the returned lifetime.
unsafe fn immediate_exit_flag<'a>(run: *mut kvm_run) -> &'a AtomicU8 {
    // SAFETY: the caller guarantees `run` is valid; the field is a plain u8 and AtomicU8
    // has the same size and alignment.
    unsafe { AtomicU8::from_ptr(std::ptr::addr_of_mut!((*run).immediate_exit)) }
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 3
}

extern "C" fn noop_signal_handler(
    _num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
}

static KICK_HANDLER: Once = Once::new();

fn install_kick_handler() {
    KICK_HANDLER.call_once(|| {
        // The handler only has to exist so the signal interrupts KVM_RUN instead of
        // killing the process; failure leaves kicks to `immediate_exit` alone.
        let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_signal_handler);
    });
}

/// A KVM vCPU.
#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
    run: *mut kvm_run,
    kick: Arc<KvmKick>,
    bound: bool,
}

// SAFETY: `run` points into the mapping owned by `fd`, which moves with the struct; it is
// only dereferenced by the thread that owns the vCPU (and by `KvmKick` under its lock).
unsafe impl Send for KvmVcpu {}

impl KvmVcpu {
    /// Record the calling thread as the one to signal on a kick.
    fn bind_thread(&mut self) {
        if self.bound {
            return;
        }
        install_kick_handler();
        let _ = vmm_sys_util::signal::unblock_signal(kick_signal());
        if let Ok(mut target) = self.kick.target.lock() {
            // SAFETY: gettid has no preconditions.
            target.thread = Some(unsafe { libc::gettid() });
        }
        self.bound = true;
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        if let Ok(mut target) = self.kick.target.lock() {
            target.run = 0;
            target.thread = None;
        }
    }
}

impl Vcpu for KvmVcpu {
    /// WHP: `WHvRunVirtualProcessor`, then the instruction emulator for I/O and MMIO.
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        self.bind_thread();
        let run_ptr = self.run;
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                kvm_ioctls::VcpuExit::IoIn(port, data) => VcpuExit::IoIn { port, data },
                kvm_ioctls::VcpuExit::IoOut(port, data) => VcpuExit::IoOut { port, data },
                kvm_ioctls::VcpuExit::MmioRead(addr, data) => VcpuExit::MmioRead { addr, data },
                kvm_ioctls::VcpuExit::MmioWrite(addr, data) => VcpuExit::MmioWrite { addr, data },
                kvm_ioctls::VcpuExit::Hlt => VcpuExit::Hlt,
                kvm_ioctls::VcpuExit::Shutdown => VcpuExit::Shutdown,
                kvm_ioctls::VcpuExit::Intr => VcpuExit::Interrupted,
                kvm_ioctls::VcpuExit::SystemEvent(kind, _) => VcpuExit::SystemEvent {
                    kind: match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => SystemEventKind::Shutdown,
                        KVM_SYSTEM_EVENT_RESET => SystemEventKind::Reset,
                        KVM_SYSTEM_EVENT_CRASH => SystemEventKind::Crash,
                        other => SystemEventKind::Other(other),
                    },
                },
                kvm_ioctls::VcpuExit::InternalError => {
                    // SAFETY: run_ptr is this vCPU's kvm_run mapping and the exit reason
                    // says the `internal` union member is valid.
                    let internal = unsafe { (*run_ptr).__bindgen_anon_1.internal };
                    let mut data = [0u64; 4];
                    let n = (internal.ndata as usize).min(data.len());
                    for (dst, src) in data.iter_mut().zip(internal.data.iter()).take(n) {
                        *dst = *src;
                    }
                    VcpuExit::InternalError {
                        suberror: internal.suberror,
                        data,
                    }
                }
                kvm_ioctls::VcpuExit::FailEntry(reason, _) => VcpuExit::FailEntry { reason },
                kvm_ioctls::VcpuExit::Unsupported(code) => VcpuExit::Other { code },
                _ => {
                    // SAFETY: run_ptr is this vCPU's kvm_run mapping.
                    let code = unsafe { (*run_ptr).exit_reason };
                    VcpuExit::Other { code }
                }
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: run_ptr is this vCPU's live kvm_run mapping.
                unsafe { immediate_exit_flag(run_ptr) }.store(0, Ordering::SeqCst);
                Ok(VcpuExit::Interrupted)
            }
            Err(e) => Err(HypervisorError::call("KVM_RUN", e)),
        }
    }

    /// WHP: `WHvCancelRunVirtualProcessor`.
    fn kicker(&self) -> Arc<dyn VcpuKick> {
        self.kick.clone()
    }

    fn detach_thread(&mut self) {
        if let Ok(mut target) = self.kick.target.lock() {
            target.thread = None;
        }
        self.bound = false;
    }
}

impl VcpuX86 for KvmVcpu {
    /// WHP: `WHvGetVirtualProcessorRegisters` (Rax…R15, Rip, Rflags).
    fn regs(&self) -> Result<Regs> {
        let r = self
            .fd
            .get_regs()
            .map_err(|e| HypervisorError::call("KVM_GET_REGS", e))?;
        Ok(Regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        })
    }

    /// WHP: `WHvSetVirtualProcessorRegisters`.
    fn set_regs(&self, r: &Regs) -> Result<()> {
        let regs = kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        };
        self.fd
            .set_regs(&regs)
            .map_err(|e| HypervisorError::call("KVM_SET_REGS", e))
    }

    /// WHP: `WHvGetVirtualProcessorRegisters` (segments, Cr0…Cr8, Efer, Gdtr, Idtr).
    fn special_regs(&self) -> Result<SpecialRegs> {
        let s = self
            .fd
            .get_sregs()
            .map_err(|e| HypervisorError::call("KVM_GET_SREGS", e))?;
        Ok(SpecialRegs {
            cs: seg_from_kvm(&s.cs),
            ds: seg_from_kvm(&s.ds),
            es: seg_from_kvm(&s.es),
            fs: seg_from_kvm(&s.fs),
            gs: seg_from_kvm(&s.gs),
            ss: seg_from_kvm(&s.ss),
            tr: seg_from_kvm(&s.tr),
            ldt: seg_from_kvm(&s.ldt),
            gdt: DescriptorTable {
                base: s.gdt.base,
                limit: s.gdt.limit,
            },
            idt: DescriptorTable {
                base: s.idt.base,
                limit: s.idt.limit,
            },
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
        })
    }

    /// WHP: `WHvSetVirtualProcessorRegisters`.
    fn set_special_regs(&self, v: &SpecialRegs) -> Result<()> {
        // Start from the current state so fields we do not model (the pending-interrupt
        // bitmap) keep their values.
        let mut s = self
            .fd
            .get_sregs()
            .map_err(|e| HypervisorError::call("KVM_GET_SREGS", e))?;
        s.cs = seg_to_kvm(&v.cs);
        s.ds = seg_to_kvm(&v.ds);
        s.es = seg_to_kvm(&v.es);
        s.fs = seg_to_kvm(&v.fs);
        s.gs = seg_to_kvm(&v.gs);
        s.ss = seg_to_kvm(&v.ss);
        s.tr = seg_to_kvm(&v.tr);
        s.ldt = seg_to_kvm(&v.ldt);
        s.gdt = kvm_dtable {
            base: v.gdt.base,
            limit: v.gdt.limit,
            ..Default::default()
        };
        s.idt = kvm_dtable {
            base: v.idt.base,
            limit: v.idt.limit,
            ..Default::default()
        };
        s.cr0 = v.cr0;
        s.cr2 = v.cr2;
        s.cr3 = v.cr3;
        s.cr4 = v.cr4;
        s.cr8 = v.cr8;
        s.efer = v.efer;
        s.apic_base = v.apic_base;
        self.fd
            .set_sregs(&s)
            .map_err(|e| HypervisorError::call("KVM_SET_SREGS", e))
    }

    /// WHP: the partition's CPUID result list (set before the first vCPU runs).
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()> {
        let kvm_entries: Vec<kvm_cpuid_entry2> = entries.iter().map(cpuid_to_kvm).collect();
        let cpuid = CpuId::from_entries(&kvm_entries)
            .map_err(|_| HypervisorError::InvalidArgument("too many cpuid entries"))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| HypervisorError::call("KVM_SET_CPUID2", e))
    }

    /// WHP: `WHvSetVirtualProcessorRegisters` with the MSR register names.
    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let kvm_msrs = Msrs::from_entries(&entries)
            .map_err(|_| HypervisorError::InvalidArgument("too many msrs"))?;
        let written = self
            .fd
            .set_msrs(&kvm_msrs)
            .map_err(|e| HypervisorError::call("KVM_SET_MSRS", e))?;
        match msrs.get(written) {
            Some(rejected) => Err(HypervisorError::MsrRejected {
                index: rejected.index,
            }),
            None => Ok(()),
        }
    }

    /// WHP: `WHvX64RegisterFpControlStatus` and `WHvX64RegisterXmmControlStatus`.
    fn set_fpu(&self, fcw: u16, mxcsr: u32) -> Result<()> {
        let fpu = kvm_fpu {
            fcw,
            mxcsr,
            ..Default::default()
        };
        self.fd
            .set_fpu(&fpu)
            .map_err(|e| HypervisorError::call("KVM_SET_FPU", e))
    }

    /// WHP: `WHvGet/SetVirtualProcessorInterruptControllerState2`.
    fn set_lapic_lints(&self) -> Result<()> {
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| HypervisorError::call("KVM_GET_LAPIC", e))?;
        for (offset, mode) in [
            (APIC_LVT_LINT0, APIC_MODE_EXTINT),
            (APIC_LVT_LINT1, APIC_MODE_NMI),
        ] {
            let reg = lapic
                .regs
                .get_mut(offset..offset + 4)
                .ok_or(HypervisorError::InvalidArgument("lapic register offset"))?;
            let mut bytes = [0u8; 4];
            for (b, r) in bytes.iter_mut().zip(reg.iter()) {
                *b = *r as u8;
            }
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (r, b) in reg.iter_mut().zip(value.to_le_bytes()) {
                *r = b as libc::c_char;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| HypervisorError::call("KVM_SET_LAPIC", e))
    }

    /// WHP: `Err(Unsupported)` for now.
    fn save_state(&mut self) -> Result<SavedState> {
        self.save()
    }

    fn restore_state(&self, state: &SavedState) -> Result<()> {
        self.restore(state)
    }
}

fn cpuid_from_kvm(e: &kvm_cpuid_entry2) -> CpuidEntry {
    CpuidEntry {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

fn cpuid_to_kvm(e: &CpuidEntry) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

fn seg_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn seg_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        ..Default::default()
    }
}

/// Open `/dev/kvm` read-write to check it is usable, without creating anything.
pub fn probe() -> std::io::Result<()> {
    let fd = Kvm::open_with_cloexec(true).map_err(std::io::Error::from)?;
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    drop(unsafe { File::from_raw_fd(fd) });
    Ok(())
}
