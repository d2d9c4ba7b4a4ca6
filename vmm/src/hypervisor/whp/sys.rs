//! The WHP calls behind the hypervisor traits (Windows only; compiled, not run, by CI).
//!
//! One partition per VM, created with room for [`MAX_VCPUS`] processors and the local
//! APIC emulated in xAPIC mode, then set up at once so memory can be mapped. An MMIO exit
//! carries no data: the instruction is decoded by the WHP emulator in two passes — the
//! first learns the access (a write completes there; a read is stopped before it
//! completes), the caller fills the read, and the next `run` lets the emulator finish it
//! with that data.

// The `windows` crate names WHP's constants as the C headers do.
#![allow(non_upper_case_globals)]

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use windows::core::HRESULT;
use windows::Win32::Foundation::{E_FAIL, S_OK};
use windows::Win32::System::Hypervisor::*;

use super::{
    fpu_values, irq_vector, memory_access_is_write, regs_from_values, regs_to_values,
    set_lapic_lints, simple_exit, sregs_from_values, sregs_to_values, IoAccess, MemoryPlan,
    RawExit, Reg, Value, GP_REGS, SPECIAL_REGS,
};
use crate::hypervisor::{
    CpuidEntry, Flavour, HostKind, Hypervisor, HypervisorError, InterruptLine, MsrEntry, Regs,
    Result, SpecialRegs, Vcpu, VcpuExit, VcpuKick, VcpuX86, Vm,
};

/// Processors a partition is created with room for (WHP fixes the count at setup).
const MAX_VCPUS: u32 = crate::layout::MAX_VCPUS as u32;

fn call(op: &'static str) -> impl FnOnce(windows::core::Error) -> HypervisorError {
    move |e| HypervisorError::call(op, std::io::Error::from_raw_os_error(e.code().0))
}

/// What this host offers: whether the hypervisor is present (Hyper-V with the Windows
/// Hypervisor Platform feature), and whether the host itself is a VM.
pub fn detect_host() -> HostKind {
    match hypervisor_present() {
        Ok(true) => HostKind::HardwareKvm {
            flavour: Flavour::Whp,
            nested: host_is_virtual(),
        },
        Ok(false) => HostKind::NoKvm(
            "the Windows Hypervisor Platform is not enabled (turn on the \
             HypervisorPlatform optional feature)"
                .into(),
        ),
        Err(e) => HostKind::NoKvm(format!("WHvGetCapability: {e}")),
    }
}

fn hypervisor_present() -> Result<bool> {
    let mut cap = WHV_CAPABILITY::default();
    // SAFETY: the buffer is a WHV_CAPABILITY we own and we pass its size.
    unsafe {
        WHvGetCapability(
            WHvCapabilityCodeHypervisorPresent,
            (&mut cap as *mut WHV_CAPABILITY).cast(),
            std::mem::size_of::<WHV_CAPABILITY>() as u32,
            None,
        )
    }
    .map_err(call("WHvGetCapability"))?;
    // SAFETY: HypervisorPresent is the member this capability code fills.
    Ok(unsafe { cap.HypervisorPresent }.as_bool())
}

fn host_is_virtual() -> bool {
    let leaf1 = std::arch::x86_64::__cpuid(1);
    leaf1.ecx & (1 << 31) != 0
}

/// The Windows Hypervisor Platform.
#[derive(Debug)]
pub struct WhpHypervisor;

impl WhpHypervisor {
    /// Fails when the platform is absent or disabled.
    pub fn new() -> Result<Self> {
        if hypervisor_present()? {
            Ok(Self)
        } else {
            Err(HypervisorError::Unsupported(
                "the Windows Hypervisor Platform (not enabled on this host)",
            ))
        }
    }
}

impl Hypervisor for WhpHypervisor {
    fn name(&self) -> &'static str {
        "whp"
    }

    fn flavour(&self) -> Flavour {
        Flavour::Whp
    }

    fn create_vm(&self) -> Result<Box<dyn Vm>> {
        Ok(Box::new(WhpVm::new()?))
    }

    /// WHP has no "supported CPUID" call: the partition reports the host's CPUID as
    /// Hyper-V filters it, so the host's own leaves are the starting point.
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        Ok(host_cpuid_leaves())
    }
}

fn host_cpuid_leaves() -> Vec<CpuidEntry> {
    use std::arch::x86_64::__cpuid_count;
    let mut out = Vec::new();
    for base in [0u32, 0x8000_0000] {
        let max = __cpuid_count(base, 0).eax;
        for function in base..=max.min(base + 0x40) {
            let r = __cpuid_count(function, 0);
            out.push(CpuidEntry {
                function,
                index: 0,
                flags: 0,
                eax: r.eax,
                ebx: r.ebx,
                ecx: r.ecx,
                edx: r.edx,
            });
        }
    }
    out
}

/// A partition handle, deleted when the last user is gone.
#[derive(Debug)]
struct Partition(WHV_PARTITION_HANDLE);

// SAFETY: a partition handle may be used from any thread (WHP serialises per vCPU).
unsafe impl Send for Partition {}
// SAFETY: as above.
unsafe impl Sync for Partition {}

impl Drop for Partition {
    fn drop(&mut self) {
        // SAFETY: the handle came from WHvCreatePartition and is deleted once.
        let _ = unsafe { WHvDeletePartition(self.0) };
    }
}

fn set_property<T>(p: &Partition, code: WHV_PARTITION_PROPERTY_CODE, value: &T) -> Result<()> {
    // SAFETY: `value` is a plain property struct of the size we pass.
    unsafe {
        WHvSetPartitionProperty(
            p.0,
            code,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as u32,
        )
    }
    .map_err(call("WHvSetPartitionProperty"))
}

/// One partition.
#[derive(Debug)]
pub struct WhpVm {
    partition: Arc<Partition>,
    plan: Mutex<MemoryPlan>,
}

impl WhpVm {
    fn new() -> Result<Self> {
        // SAFETY: plain creation call; the handle is owned by `Partition` from here on.
        let handle = unsafe { WHvCreatePartition() }.map_err(call("WHvCreatePartition"))?;
        let partition = Arc::new(Partition(handle));
        set_property(
            &partition,
            WHvPartitionPropertyCodeProcessorCount,
            &MAX_VCPUS,
        )?;
        set_property(
            &partition,
            WHvPartitionPropertyCodeLocalApicEmulationMode,
            &WHvX64LocalApicEmulationModeXApic,
        )?;
        // SAFETY: the partition exists and its properties are set.
        unsafe { WHvSetupPartition(partition.0) }.map_err(call("WHvSetupPartition"))?;
        Ok(Self {
            partition,
            plan: Mutex::new(MemoryPlan::default()),
        })
    }
}

impl Vm for WhpVm {
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()> {
        self.plan
            .lock()
            .map_err(|_| HypervisorError::InvalidArgument("memory plan poisoned"))?
            .add(slot, guest_addr, size, host_addr)?;
        let flags = WHV_MAP_GPA_RANGE_FLAGS(
            WHvMapGpaRangeFlagRead.0 | WHvMapGpaRangeFlagWrite.0 | WHvMapGpaRangeFlagExecute.0,
        );
        // SAFETY: the caller guarantees the host range is a valid mapping that outlives
        // the partition; the plan checked alignment and overlaps.
        unsafe {
            WHvMapGpaRange(
                self.partition.0,
                host_addr as *const c_void,
                guest_addr,
                size,
                flags,
            )
        }
        .map_err(call("WHvMapGpaRange"))
    }

    /// The local APIC is emulated by the partition (set at creation); there is no
    /// IOAPIC or PIC to create.
    fn create_irqchip(&self) -> Result<()> {
        Ok(())
    }

    fn create_vcpu(&self, id: u8) -> Result<Box<dyn VcpuX86>> {
        // SAFETY: plain creation call on our partition.
        unsafe { WHvCreateVirtualProcessor(self.partition.0, u32::from(id), 0) }
            .map_err(call("WHvCreateVirtualProcessor"))?;
        Ok(Box::new(WhpVcpu::new(
            Arc::clone(&self.partition),
            u32::from(id),
        )?))
    }

    /// Edge lines only: raising a line requests its vector; lowering does nothing.
    fn set_irq_line(&self, gsi: u32, high: bool) -> Result<()> {
        if high {
            request_interrupt(&self.partition, irq_vector(gsi)?)?;
        }
        Ok(())
    }

    fn interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>> {
        Ok(Arc::new(WhpLine {
            partition: Arc::clone(&self.partition),
            vector: irq_vector(gsi)?,
        }))
    }
}

fn request_interrupt(p: &Partition, vector: u32) -> Result<()> {
    // Fixed delivery (type 0), physical destination mode, edge trigger: all zero bits.
    let control = WHV_INTERRUPT_CONTROL {
        _bitfield: u64::from(WHvX64InterruptTypeFixed.0 as u32),
        Destination: 0,
        Vector: vector,
    };
    // SAFETY: `control` is a WHV_INTERRUPT_CONTROL of the size we pass.
    unsafe {
        WHvRequestInterrupt(
            p.0,
            &control,
            std::mem::size_of::<WHV_INTERRUPT_CONTROL>() as u32,
        )
    }
    .map_err(call("WHvRequestInterrupt"))
}

/// An interrupt line: a fixed-vector interrupt to the boot processor.
#[derive(Debug)]
struct WhpLine {
    partition: Arc<Partition>,
    vector: u32,
}

impl InterruptLine for WhpLine {
    fn trigger(&self) -> std::io::Result<()> {
        request_interrupt(&self.partition, self.vector).map_err(std::io::Error::other)
    }
}

/// Kicks a vCPU out of `WHvRunVirtualProcessor`.
#[derive(Debug)]
struct WhpKick {
    partition: Arc<Partition>,
    vp: u32,
}

impl VcpuKick for WhpKick {
    fn kick(&self) {
        // SAFETY: cancelling a run of our own vCPU; harmless when it is not running.
        let _ = unsafe { WHvCancelRunVirtualProcessor(self.partition.0, self.vp, 0) };
    }
}

fn register_name(r: Reg) -> WHV_REGISTER_NAME {
    match r {
        Reg::Rax => WHvX64RegisterRax,
        Reg::Rcx => WHvX64RegisterRcx,
        Reg::Rdx => WHvX64RegisterRdx,
        Reg::Rbx => WHvX64RegisterRbx,
        Reg::Rsp => WHvX64RegisterRsp,
        Reg::Rbp => WHvX64RegisterRbp,
        Reg::Rsi => WHvX64RegisterRsi,
        Reg::Rdi => WHvX64RegisterRdi,
        Reg::R8 => WHvX64RegisterR8,
        Reg::R9 => WHvX64RegisterR9,
        Reg::R10 => WHvX64RegisterR10,
        Reg::R11 => WHvX64RegisterR11,
        Reg::R12 => WHvX64RegisterR12,
        Reg::R13 => WHvX64RegisterR13,
        Reg::R14 => WHvX64RegisterR14,
        Reg::R15 => WHvX64RegisterR15,
        Reg::Rip => WHvX64RegisterRip,
        Reg::Rflags => WHvX64RegisterRflags,
        Reg::Es => WHvX64RegisterEs,
        Reg::Cs => WHvX64RegisterCs,
        Reg::Ss => WHvX64RegisterSs,
        Reg::Ds => WHvX64RegisterDs,
        Reg::Fs => WHvX64RegisterFs,
        Reg::Gs => WHvX64RegisterGs,
        Reg::Ldtr => WHvX64RegisterLdtr,
        Reg::Tr => WHvX64RegisterTr,
        Reg::Idtr => WHvX64RegisterIdtr,
        Reg::Gdtr => WHvX64RegisterGdtr,
        Reg::Cr0 => WHvX64RegisterCr0,
        Reg::Cr2 => WHvX64RegisterCr2,
        Reg::Cr3 => WHvX64RegisterCr3,
        Reg::Cr4 => WHvX64RegisterCr4,
        Reg::Cr8 => WHvX64RegisterCr8,
        Reg::Efer => WHvX64RegisterEfer,
        Reg::ApicBase => WHvX64RegisterApicBase,
    }
}

/// The WHP register of an MSR the boot code sets; `None`: WHP does not expose it.
fn msr_register(index: u32) -> Option<WHV_REGISTER_NAME> {
    Some(match index {
        0x10 => WHvX64RegisterTsc,
        0x174 => WHvX64RegisterSysenterCs,
        0x175 => WHvX64RegisterSysenterEsp,
        0x176 => WHvX64RegisterSysenterEip,
        0x277 => WHvX64RegisterPat,
        0x2ff => WHvX64RegisterMsrMtrrDefType,
        0xc000_0080 => WHvX64RegisterEfer,
        0xc000_0081 => WHvX64RegisterStar,
        0xc000_0082 => WHvX64RegisterLstar,
        0xc000_0083 => WHvX64RegisterCstar,
        0xc000_0084 => WHvX64RegisterSfmask,
        0xc000_0102 => WHvX64RegisterKernelGsBase,
        _ => return None,
    })
}

fn to_whp(v: Value) -> WHV_REGISTER_VALUE {
    WHV_REGISTER_VALUE {
        Reg128: WHV_UINT128 {
            Anonymous: WHV_UINT128_0 {
                Low64: v[0],
                High64: v[1],
            },
        },
    }
}

fn from_whp(v: &WHV_REGISTER_VALUE) -> Value {
    // SAFETY: every register value is 128 bits wide; Reg128 reads all of it.
    let r = unsafe { v.Reg128.Anonymous };
    [r.Low64, r.High64]
}

/// An MMIO access the emulator reported, and how far it got.
#[derive(Debug, Default)]
struct MmioAccess {
    addr: u64,
    len: usize,
    write: bool,
    /// A write's bytes, or the bytes a read gets back (filled by the caller).
    data: [u8; 8],
    /// Second pass of a read: `data` holds the device's answer.
    answer_ready: bool,
    /// The emulator called back with an access (first pass).
    seen: bool,
}

/// What the emulator callbacks need: the vCPU and the access in flight.
#[derive(Debug)]
struct EmulatorContext {
    partition: WHV_PARTITION_HANDLE,
    vp: u32,
    access: MmioAccess,
}

/// A pending IN: the caller fills `io_buf`, the next `run` writes RAX and RIP.
#[derive(Debug, Clone, Copy)]
struct PendingIn {
    rax: u64,
    next_rip: u64,
    len: usize,
}

/// One virtual processor.
pub struct WhpVcpu {
    partition: Arc<Partition>,
    vp: u32,
    emulator: *mut c_void,
    exit: WHV_RUN_VP_EXIT_CONTEXT,
    io_buf: [u8; 8],
    pending_in: Option<PendingIn>,
    /// A read stopped in the emulator's first pass, answered on the next `run`.
    pending_mmio_read: Option<Box<EmulatorContext>>,
    mmio_buf: [u8; 8],
}

// SAFETY: the emulator handle is used only by the thread that owns the vCPU.
unsafe impl Send for WhpVcpu {}

impl std::fmt::Debug for WhpVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhpVcpu")
            .field("vp", &self.vp)
            .field("pending_in", &self.pending_in)
            .finish_non_exhaustive()
    }
}

impl Drop for WhpVcpu {
    fn drop(&mut self) {
        // SAFETY: our own emulator and vCPU, destroyed once.
        unsafe {
            let _ = WHvEmulatorDestroyEmulator(self.emulator);
            let _ = WHvDeleteVirtualProcessor(self.partition.0, self.vp);
        }
    }
}

/// Copies the first `len` bytes (at most what both hold).
fn copy_prefix(dst: &mut [u8], src: &[u8], len: usize) {
    for (d, s) in dst.iter_mut().zip(src).take(len) {
        *d = *s;
    }
}

unsafe extern "system" fn emu_io_port(
    _context: *const c_void,
    _access: *mut WHV_EMULATOR_IO_ACCESS_INFO,
) -> HRESULT {
    // String port I/O is not emulated: the guest kernel uses plain IN/OUT.
    E_FAIL
}

unsafe extern "system" fn emu_memory(
    context: *const c_void,
    access: *mut WHV_EMULATOR_MEMORY_ACCESS_INFO,
) -> HRESULT {
    // SAFETY: WHP passes back the context we gave (an EmulatorContext we own for the
    // call) and a valid access record.
    let (ctx, access) = unsafe { (&mut *(context as *mut EmulatorContext), &mut *access) };
    let len = usize::from(access.AccessSize).min(8);
    let write = access.Direction == 1;
    let ours = &mut ctx.access;
    if ours.answer_ready && !write && ours.addr == access.GpaAddress && ours.len == len {
        copy_prefix(&mut access.Data, &ours.data, len);
        return S_OK;
    }
    ours.addr = access.GpaAddress;
    ours.len = len;
    ours.write = write;
    ours.seen = true;
    if write {
        copy_prefix(&mut ours.data, &access.Data, len);
        S_OK
    } else {
        // Stop here: the device answers before the emulator goes on (second pass).
        E_FAIL
    }
}

unsafe extern "system" fn emu_get_regs(
    context: *const c_void,
    names: *const WHV_REGISTER_NAME,
    count: u32,
    values: *mut WHV_REGISTER_VALUE,
) -> HRESULT {
    // SAFETY: as in emu_memory; the arrays are the emulator's, `count` long.
    let ctx = unsafe { &*(context as *const EmulatorContext) };
    // SAFETY: forwarding the emulator's own arrays to WHP.
    match unsafe { WHvGetVirtualProcessorRegisters(ctx.partition, ctx.vp, names, count, values) } {
        Ok(()) => S_OK,
        Err(e) => e.code(),
    }
}

unsafe extern "system" fn emu_set_regs(
    context: *const c_void,
    names: *const WHV_REGISTER_NAME,
    count: u32,
    values: *const WHV_REGISTER_VALUE,
) -> HRESULT {
    // SAFETY: as in emu_get_regs.
    let ctx = unsafe { &*(context as *const EmulatorContext) };
    // SAFETY: forwarding the emulator's own arrays to WHP.
    match unsafe { WHvSetVirtualProcessorRegisters(ctx.partition, ctx.vp, names, count, values) } {
        Ok(()) => S_OK,
        Err(e) => e.code(),
    }
}

unsafe extern "system" fn emu_translate(
    context: *const c_void,
    gva: u64,
    flags: WHV_TRANSLATE_GVA_FLAGS,
    result: *mut WHV_TRANSLATE_GVA_RESULT_CODE,
    gpa: *mut u64,
) -> HRESULT {
    // SAFETY: as in emu_get_regs; `result` and `gpa` are the emulator's out slots.
    let ctx = unsafe { &*(context as *const EmulatorContext) };
    let mut out = WHV_TRANSLATE_GVA_RESULT::default();
    // SAFETY: WHP fills our result struct and the emulator's gpa slot.
    match unsafe { WHvTranslateGva(ctx.partition, ctx.vp, gva, flags, &mut out, gpa) } {
        Ok(()) => {
            // SAFETY: the emulator's out slot.
            unsafe { *result = out.ResultCode };
            S_OK
        }
        Err(e) => e.code(),
    }
}

impl WhpVcpu {
    fn new(partition: Arc<Partition>, vp: u32) -> Result<Self> {
        let callbacks = WHV_EMULATOR_CALLBACKS {
            Size: std::mem::size_of::<WHV_EMULATOR_CALLBACKS>() as u32,
            Reserved: 0,
            WHvEmulatorIoPortCallback: Some(emu_io_port),
            WHvEmulatorMemoryCallback: Some(emu_memory),
            WHvEmulatorGetVirtualProcessorRegisters: Some(emu_get_regs),
            WHvEmulatorSetVirtualProcessorRegisters: Some(emu_set_regs),
            WHvEmulatorTranslateGvaPage: Some(emu_translate),
        };
        let mut emulator = std::ptr::null_mut();
        // SAFETY: the callbacks struct is complete and outlives the call; WHP writes the
        // new emulator's handle.
        unsafe { WHvEmulatorCreateEmulator(&callbacks, &mut emulator) }
            .map_err(call("WHvEmulatorCreateEmulator"))?;
        Ok(Self {
            partition,
            vp,
            emulator,
            exit: WHV_RUN_VP_EXIT_CONTEXT::default(),
            io_buf: [0; 8],
            pending_in: None,
            pending_mmio_read: None,
            mmio_buf: [0; 8],
        })
    }

    fn get(&self, names: &[WHV_REGISTER_NAME]) -> Result<Vec<Value>> {
        let mut values = vec![WHV_REGISTER_VALUE::default(); names.len()];
        // SAFETY: both arrays are `names.len()` long.
        unsafe {
            WHvGetVirtualProcessorRegisters(
                self.partition.0,
                self.vp,
                names.as_ptr(),
                names.len() as u32,
                values.as_mut_ptr(),
            )
        }
        .map_err(call("WHvGetVirtualProcessorRegisters"))?;
        Ok(values.iter().map(from_whp).collect())
    }

    fn set(&self, names: &[WHV_REGISTER_NAME], values: &[Value]) -> Result<()> {
        let values: Vec<WHV_REGISTER_VALUE> = values.iter().copied().map(to_whp).collect();
        if values.len() != names.len() {
            return Err(HypervisorError::InvalidArgument("register count"));
        }
        // SAFETY: both arrays are `names.len()` long.
        unsafe {
            WHvSetVirtualProcessorRegisters(
                self.partition.0,
                self.vp,
                names.as_ptr(),
                names.len() as u32,
                values.as_ptr(),
            )
        }
        .map_err(call("WHvSetVirtualProcessorRegisters"))
    }

    /// Runs the emulator over the current memory exit with `ctx`.
    fn emulate_mmio(&self, ctx: &mut EmulatorContext) -> Result<bool> {
        // SAFETY: the exit context is the one WHP last filled; `ctx` lives across the
        // call and is what the callbacks receive.
        let status = unsafe {
            WHvEmulatorTryMmioEmulation(
                self.emulator,
                (ctx as *mut EmulatorContext).cast(),
                &self.exit.VpContext,
                &self.exit.Anonymous.MemoryAccess,
            )
        }
        .map_err(call("WHvEmulatorTryMmioEmulation"))?;
        // SAFETY: every bit pattern is a valid status word; bit 0 is success.
        Ok(unsafe { status.AsUINT32 } & 1 != 0)
    }

    /// Finishes what the previous exit left for the caller: an IN's data into RAX, or
    /// the second emulator pass of an MMIO read.
    fn complete_pending(&mut self) -> Result<()> {
        if let Some(p) = self.pending_in.take() {
            let data = self.io_buf.get(..p.len).unwrap_or_default();
            let rax = super::complete_in(p.rax, data);
            self.set(
                &[WHvX64RegisterRax, WHvX64RegisterRip],
                &[[rax, 0], [p.next_rip, 0]],
            )?;
        }
        if let Some(mut ctx) = self.pending_mmio_read.take() {
            let len = ctx.access.len.min(8);
            copy_prefix(&mut ctx.access.data, &self.mmio_buf, len);
            ctx.access.answer_ready = true;
            if !self.emulate_mmio(&mut ctx)? {
                return Err(HypervisorError::Unsupported(
                    "an MMIO read the WHP emulator failed",
                ));
            }
        }
        Ok(())
    }
}

impl Vcpu for WhpVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        self.complete_pending()?;
        // SAFETY: the exit context is ours and of the size we pass.
        unsafe {
            WHvRunVirtualProcessor(
                self.partition.0,
                self.vp,
                (&mut self.exit as *mut WHV_RUN_VP_EXIT_CONTEXT).cast(),
                std::mem::size_of::<WHV_RUN_VP_EXIT_CONTEXT>() as u32,
            )
        }
        .map_err(call("WHvRunVirtualProcessor"))?;
        let reason = self.exit.ExitReason;
        let vp_bits = self.exit.VpContext._bitfield;
        let next_rip = self.exit.VpContext.Rip + u64::from(super::instruction_len(vp_bits));
        match reason {
            WHvRunVpExitReasonX64IoPortAccess => {
                // SAFETY: the exit reason says which union member WHP filled.
                let io = unsafe { self.exit.Anonymous.IoPortAccess };
                // SAFETY: as above.
                let info = unsafe { io.AccessInfo.AsUINT32 };
                let access = IoAccess::decode(info, io.PortNumber, io.Rax, vp_bits)?;
                if access.string {
                    return Ok(VcpuExit::InternalError {
                        suberror: reason.0 as u32,
                        data: [u64::from(access.port), 0, 0, 0],
                    });
                }
                let len = usize::from(access.size);
                if access.write {
                    copy_prefix(&mut self.io_buf, &access.out_data(), len);
                    self.set(&[WHvX64RegisterRip], &[[next_rip, 0]])?;
                    Ok(VcpuExit::IoOut {
                        port: access.port,
                        data: self.io_buf.get(..len).unwrap_or_default(),
                    })
                } else {
                    self.pending_in = Some(PendingIn {
                        rax: access.rax,
                        next_rip,
                        len,
                    });
                    Ok(VcpuExit::IoIn {
                        port: access.port,
                        data: self.io_buf.get_mut(..len).unwrap_or_default(),
                    })
                }
            }
            WHvRunVpExitReasonMemoryAccess => {
                // SAFETY: the exit reason says which union member WHP filled.
                let info = unsafe { self.exit.Anonymous.MemoryAccess.AccessInfo.AsUINT32 };
                let mut ctx = Box::new(EmulatorContext {
                    partition: self.partition.0,
                    vp: self.vp,
                    access: MmioAccess::default(),
                });
                let done = self.emulate_mmio(&mut ctx)?;
                let a = &ctx.access;
                if !a.seen {
                    return Err(HypervisorError::Unsupported(
                        "an MMIO instruction the WHP emulator cannot decode",
                    ));
                }
                let len = a.len;
                if a.write && done && memory_access_is_write(info) {
                    copy_prefix(&mut self.mmio_buf, &a.data, len);
                    Ok(VcpuExit::MmioWrite {
                        addr: a.addr,
                        data: self.mmio_buf.get(..len).unwrap_or_default(),
                    })
                } else if !a.write {
                    let addr = a.addr;
                    self.pending_mmio_read = Some(ctx);
                    Ok(VcpuExit::MmioRead {
                        addr,
                        data: self.mmio_buf.get_mut(..len).unwrap_or_default(),
                    })
                } else {
                    Err(HypervisorError::Unsupported(
                        "an MMIO write the WHP emulator failed",
                    ))
                }
            }
            other => {
                let code = other.0 as u32;
                let raw = match other {
                    WHvRunVpExitReasonX64Halt => RawExit::Halt,
                    WHvRunVpExitReasonCanceled => RawExit::Canceled,
                    WHvRunVpExitReasonUnrecoverableException => RawExit::UnrecoverableException,
                    WHvRunVpExitReasonInvalidVpRegisterValue => RawExit::InvalidRegisters(code),
                    WHvRunVpExitReasonUnsupportedFeature => RawExit::UnsupportedFeature(code),
                    _ => RawExit::Other(code),
                };
                Ok(simple_exit(&raw).unwrap_or(VcpuExit::Other { code }))
            }
        }
    }

    fn kicker(&self) -> Arc<dyn VcpuKick> {
        Arc::new(WhpKick {
            partition: Arc::clone(&self.partition),
            vp: self.vp,
        })
    }
}

impl VcpuX86 for WhpVcpu {
    fn regs(&self) -> Result<Regs> {
        let names = GP_REGS.map(register_name);
        let values: [Value; 18] = self
            .get(&names)?
            .try_into()
            .map_err(|_| HypervisorError::InvalidArgument("register count"))?;
        Ok(regs_from_values(&values))
    }

    fn set_regs(&self, regs: &Regs) -> Result<()> {
        self.set(&GP_REGS.map(register_name), &regs_to_values(regs))
    }

    fn special_regs(&self) -> Result<SpecialRegs> {
        let names = SPECIAL_REGS.map(register_name);
        let values: [Value; 17] = self
            .get(&names)?
            .try_into()
            .map_err(|_| HypervisorError::InvalidArgument("register count"))?;
        Ok(sregs_from_values(&values))
    }

    fn set_special_regs(&self, sregs: &SpecialRegs) -> Result<()> {
        self.set(&SPECIAL_REGS.map(register_name), &sregs_to_values(sregs))
    }

    /// WHP's CPUID results are partition-wide and per leaf (sub-leaf 0 only): the
    /// boot vCPU's entries are applied to the partition.
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()> {
        if self.vp != 0 {
            return Ok(());
        }
        let list: Vec<WHV_X64_CPUID_RESULT> = entries
            .iter()
            .filter(|e| e.index == 0)
            .map(|e| WHV_X64_CPUID_RESULT {
                Function: e.function,
                Reserved: [0; 3],
                Eax: e.eax,
                Ebx: e.ebx,
                Ecx: e.ecx,
                Edx: e.edx,
            })
            .collect();
        // SAFETY: the list is `list.len()` results long and we pass its byte size.
        unsafe {
            WHvSetPartitionProperty(
                self.partition.0,
                WHvPartitionPropertyCodeCpuidResultList,
                list.as_ptr().cast(),
                std::mem::size_of_val(list.as_slice()) as u32,
            )
        }
        .map_err(call("WHvSetPartitionProperty(CpuidResultList)"))
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        let mut names = Vec::with_capacity(msrs.len());
        let mut values = Vec::with_capacity(msrs.len());
        for m in msrs {
            let name =
                msr_register(m.index).ok_or(HypervisorError::MsrRejected { index: m.index })?;
            names.push(name);
            values.push([m.data, 0]);
        }
        self.set(&names, &values)
    }

    fn set_fpu(&self, fcw: u16, mxcsr: u32) -> Result<()> {
        let (fp, xmm) = fpu_values(fcw, mxcsr);
        self.set(
            &[
                WHvX64RegisterFpControlStatus,
                WHvX64RegisterXmmControlStatus,
            ],
            &[fp, xmm],
        )
    }

    fn set_lapic_lints(&self) -> Result<()> {
        let mut page = vec![0u8; 4096];
        // SAFETY: the buffer is 4 KiB, the size we pass.
        unsafe {
            WHvGetVirtualProcessorInterruptControllerState2(
                self.partition.0,
                self.vp,
                page.as_mut_ptr().cast(),
                page.len() as u32,
                None,
            )
        }
        .map_err(call("WHvGetVirtualProcessorInterruptControllerState2"))?;
        set_lapic_lints(&mut page)?;
        // SAFETY: as above.
        unsafe {
            WHvSetVirtualProcessorInterruptControllerState2(
                self.partition.0,
                self.vp,
                page.as_ptr().cast(),
                page.len() as u32,
            )
        }
        .map_err(call("WHvSetVirtualProcessorInterruptControllerState2"))
    }
}
