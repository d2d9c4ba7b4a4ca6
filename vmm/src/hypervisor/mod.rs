//! The hypervisor layer: one small trait set, `Hypervisor` → `Vm` → `Vcpu`.
//!
//! Everything above this module (memory, boot, devices, the vCPU loop) is written once
//! against these traits. A backend only maps memory, creates and runs vCPUs, moves
//! registers in and out in the neutral structs below and wires interrupts. What a backend
//! cannot do is an `Err(HypervisorError::Unsupported)`, never a panic: callers either
//! fall back (an ioeventfd becomes a trapped MMIO write) or fail closed.
//!
//! `kvm.rs` implements the traits on `kvm-ioctls` (Linux); `whp/` on the Windows
//! Hypervisor Platform. Nothing outside this module names a type of either: the VMM
//! gets a hypervisor from [`open`], the host's kind from [`detect_host`], and devices
//! raise interrupts through an [`InterruptLine`].

#[cfg(target_os = "linux")]
pub mod kvm;
pub mod whp;

use std::sync::Arc;

#[cfg(target_os = "linux")]
use vmm_sys_util::eventfd::EventFd;

/// Errors from the hypervisor backend.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot open the hypervisor device {path}")]
    Open {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} failed")]
    Call {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not supported by this hypervisor")]
    Unsupported(&'static str),
    #[error("the hypervisor rejected MSR {index:#x}")]
    MsrRejected { index: u32 },
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    #[error("saved state part {part:?}: {why}")]
    BadState {
        part: &'static str,
        why: &'static str,
    },
}

impl HypervisorError {
    /// Wrap an OS error from the backend call `op`.
    pub fn call(op: &'static str, source: impl Into<std::io::Error>) -> Self {
        Self::Call {
            op,
            source: source.into(),
        }
    }
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, HypervisorError>;

/// An edge-triggered interrupt line into the guest's interrupt controller, as a device
/// sees it (KVM: an irqfd; WHP: `WHvRequestInterrupt`).
pub trait InterruptLine: Send + Sync + std::fmt::Debug {
    /// Raise the line once.
    fn trigger(&self) -> std::io::Result<()>;
}

/// An eventfd is a line whose edges can be counted: KVM's irqfd signals the irqchip
/// through one, and device tests read it back.
#[cfg(target_os = "linux")]
impl InterruptLine for EventFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.write(1)
    }
}

/// What virtualization this host offers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostKind {
    /// Hardware-assisted virtualization (KVM on VMX or SVM, or WHP).
    HardwareKvm {
        /// VMX or SVM (or WHP).
        flavour: Flavour,
        /// The host is itself a VM (its CPUID has the hypervisor bit): nested hardware
        /// virtualization, as in a cloud VM or our QEMU test lane, not bare metal.
        nested: bool,
    },
    /// `/dev/kvm` backed by the `kvm_pvm` pagetable-based hypervisor (guest kernel code
    /// is emulated).
    Pvm,
    /// No usable hypervisor; the reason says why.
    NoKvm(String),
}

impl HostKind {
    /// Hardware KVM, bare metal or nested.
    pub fn is_hardware(&self) -> bool {
        matches!(self, Self::HardwareKvm { .. })
    }

    /// A short label for figures measured on this host.
    pub fn label(&self) -> String {
        match self {
            Self::HardwareKvm {
                flavour,
                nested: false,
            } => format!("{flavour}, bare metal"),
            Self::HardwareKvm {
                flavour,
                nested: true,
            } => format!("nested {flavour}: the host is itself a VM"),
            Self::Pvm => "KVM on kvm_pvm (guest kernel emulated)".into(),
            Self::NoKvm(reason) => format!("no KVM: {reason}"),
        }
    }
}

impl std::fmt::Display for HostKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

/// Open this platform's hypervisor: KVM on Linux, WHP on Windows.
pub fn open() -> Result<Box<dyn Hypervisor>> {
    #[cfg(target_os = "linux")]
    {
        Ok(Box::new(kvm::KvmHypervisor::new()?))
    }
    #[cfg(not(target_os = "linux"))]
    {
        Ok(Box::new(whp::WhpHypervisor::new()?))
    }
}

/// The device files the hypervisor opens (what a jailed VMM must still see).
pub fn device_paths() -> &'static [&'static str] {
    #[cfg(target_os = "linux")]
    {
        &[kvm::KVM_PATH]
    }
    #[cfg(not(target_os = "linux"))]
    {
        &[]
    }
}

/// The flavour of this host's hypervisor, detected once per process.
pub fn host_flavour() -> Flavour {
    #[cfg(target_os = "linux")]
    {
        kvm::detect_flavour()
    }
    #[cfg(not(target_os = "linux"))]
    {
        Flavour::Whp
    }
}

/// Find out what this host offers: whether the hypervisor opens, its flavour, and
/// whether the host itself runs under a hypervisor.
pub fn detect_host() -> HostKind {
    #[cfg(target_os = "linux")]
    {
        kvm::detect_host()
    }
    #[cfg(not(target_os = "linux"))]
    {
        whp::detect_host()
    }
}

/// The kind of virtualization behind a hypervisor, detected once when it is opened.
/// Every flavour-specific rule of the VMM (the `kvm_pvm` CPUID filter and kernel flags,
/// how often to poll a booting guest, what the benchmarks call their figures) hangs off
/// this value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flavour {
    /// Intel VT-x (`kvm_intel`).
    HardwareVmx,
    /// AMD-V (`kvm_amd`).
    HardwareSvm,
    /// The nested `kvm_pvm` hypervisor: no VMX/SVM; guest user code runs natively,
    /// guest kernel code in KVM's instruction emulator.
    Pvm,
    /// The Windows Hypervisor Platform (Hyper-V on VMX or SVM).
    Whp,
}

impl Flavour {
    /// Hardware-assisted virtualization (VMX or SVM).
    pub fn is_hardware(self) -> bool {
        matches!(self, Self::HardwareVmx | Self::HardwareSvm | Self::Whp)
    }
}

impl std::fmt::Display for Flavour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::HardwareVmx => "hardware KVM (Intel VMX)",
            Self::HardwareSvm => "hardware KVM (AMD SVM)",
            Self::Pvm => "kvm_pvm (no VMX/SVM: guest kernel code is emulated)",
            Self::Whp => "Windows Hypervisor Platform",
        })
    }
}

/// General-purpose registers of an x86-64 vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register in its unpacked (descriptor-cache) form.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// Default operation size (1 = 32-bit).
    pub db: bool,
    /// Code/data (true) or system (false) descriptor.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity (limit in 4 KiB units).
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

/// A descriptor-table register (GDTR or IDTR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, control and descriptor-table registers of an x86-64 vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct SpecialRegs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// One CPUID leaf (function, sub-leaf index) and its result registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// Backend flags (on KVM: `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`); kept as given.
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// One model-specific register value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct MsrEntry {
    pub index: u32,
    pub data: u64,
}

/// Hypervisor state saved into a snapshot: named byte strings only the backend that
/// wrote them reads back (`backend` says which). Everything above the hypervisor seam
/// stores and checksums it without looking inside.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedState {
    /// The backend that saved it ("kvm").
    pub backend: String,
    /// (part name, bytes) in the order the backend restores them.
    pub parts: Vec<SavedPart>,
}

/// One named piece of [`SavedState`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedPart {
    /// What the bytes are ("regs", "lapic", …), backend-defined.
    pub name: String,
    /// The bytes, hex-encoded in the snapshot file.
    #[serde(with = "hex_bytes")]
    pub bytes: Vec<u8>,
}

impl SavedState {
    /// An empty state of `backend`.
    pub fn new(backend: &str) -> Self {
        Self {
            backend: backend.to_string(),
            parts: Vec::new(),
        }
    }

    /// Append part `name`.
    pub fn push(&mut self, name: &str, bytes: impl Into<Vec<u8>>) {
        self.parts.push(SavedPart {
            name: name.to_string(),
            bytes: bytes.into(),
        });
    }

    /// The bytes of part `name`; a missing part is an error naming it.
    pub fn part(&self, name: &'static str) -> Result<&[u8]> {
        self.parts
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.bytes.as_slice())
            .ok_or(HypervisorError::BadState {
                part: name,
                why: "missing",
            })
    }

    /// The bytes of part `name` if it was saved.
    pub fn optional_part(&self, name: &str) -> Option<&[u8]> {
        self.parts
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.bytes.as_slice())
    }

    /// Fail unless this state was saved by `backend`.
    pub fn check_backend(&self, backend: &'static str) -> Result<()> {
        if self.backend == backend {
            Ok(())
        } else {
            Err(HypervisorError::BadState {
                part: "backend",
                why: "saved by another hypervisor backend",
            })
        }
    }
}

/// Bytes as a lower-case hex string (compact and exact in a JSON file).
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        use std::fmt::Write;
        let mut text = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            // Writing into a String cannot fail.
            let _ = write!(text, "{b:02x}");
        }
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <&str>::deserialize(d)?;
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        text.as_bytes()
            .chunks(2)
            .map(|pair| match pair {
                [hi, lo] => Some((digit(*hi)? << 4) | digit(*lo)?),
                _ => None,
            })
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| serde::de::Error::custom("not a string of hex byte pairs"))
    }
}

/// Where an ioeventfd listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEventAddress {
    /// An I/O port.
    Pio(u64),
    /// A guest-physical MMIO address.
    Mmio(u64),
}

/// Why `Vcpu::run` returned.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// `IN` from `port`: fill `data` (its length is the access size).
    IoIn { port: u16, data: &'a mut [u8] },
    /// `OUT` of `data` to `port`.
    IoOut { port: u16, data: &'a [u8] },
    /// A read of unbacked guest-physical memory: fill `data`.
    MmioRead { addr: u64, data: &'a mut [u8] },
    /// A write of `data` to unbacked guest-physical memory.
    MmioWrite { addr: u64, data: &'a [u8] },
    /// The vCPU executed HLT and no in-kernel interrupt controller handles it.
    Hlt,
    /// The vCPU hit a triple fault (or another shutdown condition).
    Shutdown,
    /// The guest asked the hypervisor to power off or reset (PSCI/ACPI style event).
    SystemEvent { kind: SystemEventKind },
    /// The run was interrupted from outside (a `VcpuKick` or a signal).
    Interrupted,
    /// The hypervisor could not emulate an instruction or hit an internal error.
    InternalError { suberror: u32, data: [u64; 4] },
    /// The hypervisor failed to enter the guest.
    FailEntry { reason: u64 },
    /// Any other exit; `code` is backend-specific.
    Other { code: u32 },
}

/// A system event reported by the hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SystemEventKind {
    /// Power off.
    Shutdown,
    /// Reset.
    Reset,
    /// Guest crash report.
    Crash,
    /// Any other event type (backend-specific number).
    Other(u32),
}

/// Makes a running (or about to run) vCPU return from `run` with
/// `VcpuExit::Interrupted`. Callable from any thread.
pub trait VcpuKick: Send + Sync + std::fmt::Debug {
    /// Interrupt the vCPU's current or next `run` call.
    fn kick(&self);
}

/// A hypervisor: creates VMs.
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// Short name ("kvm").
    fn name(&self) -> &'static str;
    /// What backs this hypervisor (detected once, when it was opened).
    fn flavour(&self) -> Flavour;
    /// Create an empty VM (no memory, no vCPUs).
    fn create_vm(&self) -> Result<Box<dyn Vm>>;
    /// x86: the CPUID leaves this hypervisor can present to a guest, including features
    /// it emulates without listing them (on KVM: the TSC-deadline timer).
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>>;
}

/// A virtual machine: guest memory, vCPUs and interrupt wiring.
pub trait Vm: Send + Sync + std::fmt::Debug {
    /// Map `size` bytes of host memory at `host_addr` into guest-physical memory at
    /// `guest_addr`, as memory slot `slot`.
    ///
    /// # Safety
    /// `host_addr..host_addr+size` must be a valid, page-aligned mapping that outlives
    /// the VM (the guest reads and writes it at any time).
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()>;
    /// Create the in-kernel interrupt controllers (x86: PIC, IOAPIC, LAPICs).
    fn create_irqchip(&self) -> Result<()>;
    /// Create vCPU `id` (x86: its initial APIC ID). Call `create_irqchip` first.
    fn create_vcpu(&self, id: u8) -> Result<Box<dyn VcpuX86>>;
    /// Drive interrupt line `gsi` of the in-kernel irqchip.
    fn set_irq_line(&self, gsi: u32, high: bool) -> Result<()>;
    /// An edge-triggered line into the irqchip's input `gsi`, for a device to raise.
    fn interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>>;
    /// Signal `fd` instead of exiting when the guest writes `datamatch` (4 bytes; any
    /// value when `None`) to `addr`. A backend without it says `Unsupported`: the write
    /// then traps and the transport signals `fd` itself.
    #[cfg(target_os = "linux")]
    fn register_ioeventfd(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()>;
    /// Save the VM-wide state of a stopped VM: the in-kernel interrupt controllers,
    /// the PIT if there is one, the guest clock.
    fn save_state(&self) -> Result<SavedState> {
        Err(HypervisorError::Unsupported("snapshots"))
    }
    /// Put back what [`Vm::save_state`] saved, on a VM created the same way (memory
    /// mapped and irqchip created, before any vCPU runs).
    fn restore_state(&self, _state: &SavedState) -> Result<()> {
        Err(HypervisorError::Unsupported("snapshots"))
    }
}

/// A virtual CPU: run it and get an exit back.
pub trait Vcpu: Send + std::fmt::Debug {
    /// Run guest code until the next exit the VMM must handle.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
    /// A handle other threads use to interrupt `run`.
    fn kicker(&self) -> Arc<dyn VcpuKick>;
    /// The calling thread is done running this vCPU (it may exit while the vCPU lives
    /// on, e.g. to be saved): kicks no longer signal it.
    fn detach_thread(&mut self) {}
}

/// The x86-64 extension of `Vcpu`: registers, CPUID, MSRs, FPU and local APIC.
pub trait VcpuX86: Vcpu {
    /// Read the general-purpose registers.
    fn regs(&self) -> Result<Regs>;
    /// Write the general-purpose registers.
    fn set_regs(&self, regs: &Regs) -> Result<()>;
    /// Read the segment, control and descriptor-table registers.
    fn special_regs(&self) -> Result<SpecialRegs>;
    /// Write the segment, control and descriptor-table registers.
    fn set_special_regs(&self, sregs: &SpecialRegs) -> Result<()>;
    /// Set the CPUID results this vCPU reports.
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()>;
    /// Write MSRs; fails with `MsrRejected` naming the first one refused.
    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()>;
    /// Reset the x87/SSE state to its power-on values with the given control words.
    fn set_fpu(&self, fcw: u16, mxcsr: u32) -> Result<()>;
    /// Program the local APIC's LINT0 as ExtINT (the PIC) and LINT1 as NMI, as firmware
    /// does on a PC.
    fn set_lapic_lints(&self) -> Result<()>;
    /// Save everything about a stopped vCPU a restore needs (registers, FPU/XSAVE,
    /// MSRs, local APIC, pending events, CPUID). Call it after the vCPU's last `run`
    /// returned, from any thread; I/O the last exit left half done is completed first.
    fn save_state(&mut self) -> Result<SavedState> {
        Err(HypervisorError::Unsupported("snapshots"))
    }
    /// Put back what [`VcpuX86::save_state`] saved, instead of the boot-time setup.
    fn restore_state(&self, _state: &SavedState) -> Result<()> {
        Err(HypervisorError::Unsupported("snapshots"))
    }
}
