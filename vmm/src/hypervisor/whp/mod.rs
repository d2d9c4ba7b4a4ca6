//! The Windows Hypervisor Platform (WHP) backend of the hypervisor traits.
//!
//! Split as the STYLE asks of a backend that cannot run here: this file is
//! platform-neutral — how our registers, segments and exits translate to WHP's, and the
//! memory plan (WHP has no slots: ranges are mapped and unmapped by address) — and is
//! compiled and unit-tested on every platform. `sys.rs` makes the calls
//! (`WHvCreatePartition`, `WHvMapGpaRange`, `WHvRunVirtualProcessor`, …) through the
//! `windows` crate and exists only on Windows. **Our CI compiles it (clippy for
//! `x86_64-pc-windows-gnu`) but has no Windows machine to run it on.**
//!
//! What WHP does differently from KVM, and where that is handled:
//! - No in-kernel PIC/IOAPIC: the partition emulates the local APIC (xAPIC mode); an
//!   interrupt line is a `WHvRequestInterrupt` of a fixed vector ([`irq_vector`]).
//! - No ioeventfd: `register_ioeventfd` is `Unsupported`; the queue-notify write traps.
//! - An I/O exit does not advance RIP and carries RAX: [`IoAccess`] says what the
//!   access was, [`complete_in`] merges the data of an IN into RAX as the CPU would.
//! - An MMIO exit does not carry the data: `sys.rs` decodes the instruction with the
//!   WHP emulator (`WHvEmulatorTryMmioEmulation`).

#[cfg(windows)]
mod sys;

#[cfg(windows)]
pub use sys::{detect_host, WhpHypervisor};

use super::{DescriptorTable, HypervisorError, Regs, Result, Segment, SpecialRegs, VcpuExit};

/// A WHP register value: the 128-bit `WHV_REGISTER_VALUE` union as two words.
pub type Value = [u64; 2];

/// The registers this backend moves, in our names; `sys.rs` maps each to its
/// `WHV_REGISTER_NAME`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Reg {
    Rax,
    Rcx,
    Rdx,
    Rbx,
    Rsp,
    Rbp,
    Rsi,
    Rdi,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
    Rip,
    Rflags,
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
    Ldtr,
    Tr,
    Idtr,
    Gdtr,
    Cr0,
    Cr2,
    Cr3,
    Cr4,
    Cr8,
    Efer,
    ApicBase,
}

/// The general-purpose registers, in the order [`regs_to_values`] writes them.
pub const GP_REGS: [Reg; 18] = [
    Reg::Rax,
    Reg::Rcx,
    Reg::Rdx,
    Reg::Rbx,
    Reg::Rsp,
    Reg::Rbp,
    Reg::Rsi,
    Reg::Rdi,
    Reg::R8,
    Reg::R9,
    Reg::R10,
    Reg::R11,
    Reg::R12,
    Reg::R13,
    Reg::R14,
    Reg::R15,
    Reg::Rip,
    Reg::Rflags,
];

/// The segment, table and control registers, in the order [`sregs_to_values`] writes
/// them.
pub const SPECIAL_REGS: [Reg; 17] = [
    Reg::Es,
    Reg::Cs,
    Reg::Ss,
    Reg::Ds,
    Reg::Fs,
    Reg::Gs,
    Reg::Ldtr,
    Reg::Tr,
    Reg::Idtr,
    Reg::Gdtr,
    Reg::Cr0,
    Reg::Cr2,
    Reg::Cr3,
    Reg::Cr4,
    Reg::Cr8,
    Reg::Efer,
    Reg::ApicBase,
];

/// Our general-purpose registers as WHP values, in [`GP_REGS`] order.
pub fn regs_to_values(r: &Regs) -> [Value; 18] {
    [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ]
    .map(|v| [v, 0])
}

/// Our general-purpose registers from WHP values in [`GP_REGS`] order.
pub fn regs_from_values(v: &[Value; 18]) -> Regs {
    let [rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags] =
        v.map(|[low, _]| low);
    Regs {
        rax,
        rcx,
        rdx,
        rbx,
        rsp,
        rbp,
        rsi,
        rdi,
        r8,
        r9,
        r10,
        r11,
        r12,
        r13,
        r14,
        r15,
        rip,
        rflags,
    }
}

/// The attribute word of a `WHV_X64_SEGMENT_REGISTER` (the VMX access-rights layout:
/// type 0..=3, S 4, DPL 5..=6, P 7, AVL 12, L 13, D/B 14, G 15). WHP has no "unusable"
/// bit: an unusable segment is written not present.
pub fn segment_attributes(s: &Segment) -> u16 {
    let bit = |b: bool, at: u16| u16::from(b) << at;
    u16::from(s.type_ & 0xf)
        | bit(s.s, 4)
        | (u16::from(s.dpl & 3) << 5)
        | bit(s.present && !s.unusable, 7)
        | bit(s.avl, 12)
        | bit(s.l, 13)
        | bit(s.db, 14)
        | bit(s.g, 15)
}

/// A segment as a `WHV_X64_SEGMENT_REGISTER`: base, then limit, selector and
/// attributes packed in the second word.
pub fn segment_to_value(s: &Segment) -> Value {
    [
        s.base,
        u64::from(s.limit) | u64::from(s.selector) << 32 | u64::from(segment_attributes(s)) << 48,
    ]
}

/// A segment from a `WHV_X64_SEGMENT_REGISTER` value.
pub fn segment_from_value(v: Value) -> Segment {
    let attrs = (v[1] >> 48) as u16;
    let bit = |at: u16| attrs & (1 << at) != 0;
    let present = bit(7);
    Segment {
        base: v[0],
        limit: v[1] as u32,
        selector: (v[1] >> 32) as u16,
        type_: (attrs & 0xf) as u8,
        s: bit(4),
        dpl: ((attrs >> 5) & 3) as u8,
        present,
        avl: bit(12),
        l: bit(13),
        db: bit(14),
        g: bit(15),
        unusable: !present,
    }
}

/// A descriptor table as a `WHV_X64_TABLE_REGISTER` (three words of padding, the
/// limit, then the base).
pub fn table_to_value(t: &DescriptorTable) -> Value {
    [u64::from(t.limit) << 48, t.base]
}

/// A descriptor table from a `WHV_X64_TABLE_REGISTER` value.
pub fn table_from_value(v: Value) -> DescriptorTable {
    DescriptorTable {
        base: v[1],
        limit: (v[0] >> 48) as u16,
    }
}

/// Our special registers as WHP values, in [`SPECIAL_REGS`] order.
pub fn sregs_to_values(s: &SpecialRegs) -> [Value; 17] {
    let one = |v: u64| [v, 0];
    [
        segment_to_value(&s.es),
        segment_to_value(&s.cs),
        segment_to_value(&s.ss),
        segment_to_value(&s.ds),
        segment_to_value(&s.fs),
        segment_to_value(&s.gs),
        segment_to_value(&s.ldt),
        segment_to_value(&s.tr),
        table_to_value(&s.idt),
        table_to_value(&s.gdt),
        one(s.cr0),
        one(s.cr2),
        one(s.cr3),
        one(s.cr4),
        one(s.cr8),
        one(s.efer),
        one(s.apic_base),
    ]
}

/// Our special registers from WHP values in [`SPECIAL_REGS`] order.
pub fn sregs_from_values(v: &[Value; 17]) -> SpecialRegs {
    let [es, cs, ss, ds, fs, gs, ldt, tr, idt, gdt, cr0, cr2, cr3, cr4, cr8, efer, apic_base] = *v;
    SpecialRegs {
        es: segment_from_value(es),
        cs: segment_from_value(cs),
        ss: segment_from_value(ss),
        ds: segment_from_value(ds),
        fs: segment_from_value(fs),
        gs: segment_from_value(gs),
        ldt: segment_from_value(ldt),
        tr: segment_from_value(tr),
        idt: table_from_value(idt),
        gdt: table_from_value(gdt),
        cr0: cr0[0],
        cr2: cr2[0],
        cr3: cr3[0],
        cr4: cr4[0],
        cr8: cr8[0],
        efer: efer[0],
        apic_base: apic_base[0],
    }
}

/// An I/O port exit as WHP reports it (`WHV_X64_IO_PORT_ACCESS_CONTEXT` and the exit's
/// instruction length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoAccess {
    pub port: u16,
    /// 1, 2 or 4 bytes.
    pub size: u8,
    pub write: bool,
    /// INS/OUTS (with or without REP): needs the instruction emulator.
    pub string: bool,
    pub rax: u64,
    /// Bytes to advance RIP by once the access is done.
    pub instruction_len: u8,
}

impl IoAccess {
    /// Checks what the hypervisor reported: a size of 1, 2 or 4 and an instruction of
    /// 1..=15 bytes (a hostile or buggy report is an error, not a panic).
    pub fn validated(self) -> Result<Self> {
        if !matches!(self.size, 1 | 2 | 4) {
            return Err(HypervisorError::InvalidArgument("I/O access size"));
        }
        if !(1..=15).contains(&self.instruction_len) {
            return Err(HypervisorError::InvalidArgument("instruction length"));
        }
        Ok(self)
    }

    /// The bytes an OUT writes (the low `size` bytes of RAX).
    pub fn out_data(&self) -> Vec<u8> {
        self.rax
            .to_le_bytes()
            .into_iter()
            .take(usize::from(self.size))
            .collect()
    }
}

impl IoAccess {
    /// Decodes `WHV_X64_IO_PORT_ACCESS_INFO` (bit 0 write, bits 1..=3 size, bit 4 string
    /// operation, bit 5 REP) of an exit whose `WHV_VP_EXIT_CONTEXT` bitfield is
    /// `vp_bits` (bits 0..=3: the instruction length).
    pub fn decode(info: u32, port: u16, rax: u64, vp_bits: u8) -> Result<Self> {
        IoAccess {
            port,
            size: ((info >> 1) & 0x7) as u8,
            write: info & 1 != 0,
            string: info & (1 << 4) != 0,
            rax,
            instruction_len: instruction_len(vp_bits),
        }
        .validated()
    }
}

/// The instruction length in a `WHV_VP_EXIT_CONTEXT` bitfield (its low four bits).
pub fn instruction_len(vp_bits: u8) -> u8 {
    vp_bits & 0xf
}

/// Whether a `WHV_MEMORY_ACCESS_INFO` (bits 0..=1: 0 read, 1 write, 2 execute) is a
/// write.
pub fn memory_access_is_write(info: u32) -> bool {
    info & 0x3 == 1
}

/// `WHvX64RegisterFpControlStatus` and `XmmControlStatus` for a power-on FPU with the
/// given control words (MXCSR_MASK as the processor reports it, 0xffbf).
pub fn fpu_values(fcw: u16, mxcsr: u32) -> (Value, Value) {
    ([u64::from(fcw), 0], [0, u64::from(mxcsr) | 0xffbf << 32])
}

/// Offsets of the local APIC LVT LINT0/LINT1 registers in the APIC page.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;

/// Programs LINT0 as ExtINT and LINT1 as NMI in an xAPIC register page (the state
/// `WHvGetVirtualProcessorInterruptControllerState2` returns), as firmware does.
pub fn set_lapic_lints(page: &mut [u8]) -> Result<()> {
    for (offset, mode) in [(APIC_LVT_LINT0, 0x7u32), (APIC_LVT_LINT1, 0x4u32)] {
        let word: &mut [u8; 4] = page
            .get_mut(offset..offset + 4)
            .and_then(|w| w.try_into().ok())
            .ok_or(HypervisorError::InvalidArgument("APIC page too short"))?;
        let lvt = (u32::from_le_bytes(*word) & !0x700) | (mode << 8);
        *word = lvt.to_le_bytes();
    }
    Ok(())
}

/// RAX after an IN of `data` (1, 2 or 4 bytes): an 8- or 16-bit IN keeps the rest of
/// RAX, a 32-bit IN zeroes the upper half, as the CPU does.
pub fn complete_in(rax: u64, data: &[u8]) -> u64 {
    match *data {
        [b] => (rax & !0xff) | u64::from(b),
        [a, b] => (rax & !0xffff) | u64::from(u16::from_le_bytes([a, b])),
        [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
        _ => rax,
    }
}

/// Why `WHvRunVirtualProcessor` returned, in neutral terms (`sys.rs` decodes the
/// `WHV_RUN_VP_EXIT_CONTEXT`; each number is the exit's `WHV_RUN_VP_EXIT_REASON`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawExit {
    Io(IoAccess),
    /// An access to unmapped guest-physical memory.
    Memory {
        gpa: u64,
        write: bool,
    },
    Halt,
    /// `WHvCancelRunVirtualProcessor` (a kick).
    Canceled,
    /// A triple fault or another unrecoverable exception.
    UnrecoverableException,
    /// The registers we set are not a state the processor can run.
    InvalidRegisters(u32),
    /// The guest used something the partition does not support.
    UnsupportedFeature(u32),
    /// Any other exit reason.
    Other(u32),
}

/// Our exit for one that needs no device; `None` for `Io` and `Memory`, which go to
/// the buses.
pub fn simple_exit(exit: &RawExit) -> Option<VcpuExit<'static>> {
    Some(match *exit {
        RawExit::Io(_) | RawExit::Memory { .. } => return None,
        RawExit::Halt => VcpuExit::Hlt,
        RawExit::Canceled => VcpuExit::Interrupted,
        RawExit::UnrecoverableException => VcpuExit::Shutdown,
        RawExit::InvalidRegisters(reason) => VcpuExit::FailEntry {
            reason: u64::from(reason),
        },
        RawExit::UnsupportedFeature(reason) => VcpuExit::InternalError {
            suberror: reason,
            data: [0; 4],
        },
        RawExit::Other(code) => VcpuExit::Other { code },
    })
}

/// The fixed vector an interrupt line raises: WHP emulates the local APIC but no
/// IOAPIC, so line `gsi` is delivered as vector `0x20 + gsi` (the range Linux's
/// `IRQ0_VECTOR` maps legacy IRQs to). Lines above 223 have no vector.
pub fn irq_vector(gsi: u32) -> Result<u32> {
    if gsi > 0xff - 0x20 {
        return Err(HypervisorError::InvalidArgument("interrupt line"));
    }
    Ok(0x20 + gsi)
}

/// Page size of every mapping.
pub const PAGE: u64 = 4096;

/// The guest-physical ranges mapped in one partition: WHP maps by address (no slots),
/// so the plan refuses misaligned or overlapping ranges before any call.
#[derive(Debug, Default)]
pub struct MemoryPlan {
    /// (slot, guest address, size), sorted by address.
    ranges: Vec<(u32, u64, u64)>,
}

impl MemoryPlan {
    /// Record `size` bytes at `guest_addr` as `slot`; refused when not page-aligned,
    /// empty, past the 52-bit guest-physical space, overlapping another range, or a
    /// slot already used.
    pub fn add(&mut self, slot: u32, guest_addr: u64, size: u64, host_addr: u64) -> Result<()> {
        if size == 0 || size % PAGE != 0 || guest_addr % PAGE != 0 || host_addr % PAGE != 0 {
            return Err(HypervisorError::InvalidArgument("memory range alignment"));
        }
        let end = guest_addr
            .checked_add(size)
            .filter(|&e| e <= 1 << 52)
            .ok_or(HypervisorError::InvalidArgument("memory range end"))?;
        if self
            .ranges
            .iter()
            .any(|&(s, a, n)| s == slot || guest_addr < a + n && a < end)
        {
            return Err(HypervisorError::InvalidArgument("memory range overlaps"));
        }
        let at = self.ranges.partition_point(|&(_, a, _)| a < guest_addr);
        self.ranges.insert(at, (slot, guest_addr, size));
        Ok(())
    }

    /// Whether `gpa` lies in a mapped range.
    pub fn contains(&self, gpa: u64) -> bool {
        self.ranges.iter().any(|&(_, a, n)| gpa >= a && gpa - a < n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code64() -> Segment {
        Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x10,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: true,
            g: true,
            avl: false,
            unusable: false,
        }
    }

    #[test]
    fn general_registers_round_trip_in_whp_order() {
        let regs = Regs {
            rax: 1,
            rcx: 2,
            rdx: 3,
            rbx: 4,
            rip: 0x1000,
            rflags: 2,
            r15: 15,
            ..Regs::default()
        };
        let values = regs_to_values(&regs);
        assert_eq!(
            values[GP_REGS.iter().position(|&r| r == Reg::Rbx).unwrap()],
            [4, 0]
        );
        assert_eq!(values[16], [0x1000, 0]);
        assert_eq!(regs_from_values(&values), regs);
    }

    #[test]
    fn a_64_bit_code_segment_packs_as_vmx_access_rights() {
        let cs = code64();
        // type b, S, P, L, G: 0xb | 0x10 | 0x80 | 0x2000 | 0x8000.
        assert_eq!(segment_attributes(&cs), 0xa09b);
        let v = segment_to_value(&cs);
        assert_eq!(v, [0, 0xa09b_0010_ffff_ffff]);
        assert_eq!(segment_from_value(v), cs);
    }

    #[test]
    fn an_unusable_segment_is_written_not_present() {
        let ldt = Segment {
            unusable: true,
            present: true,
            type_: 2,
            ..Segment::default()
        };
        let back = segment_from_value(segment_to_value(&ldt));
        assert!(!back.present && back.unusable);
    }

    #[test]
    fn special_registers_round_trip() {
        let sregs = SpecialRegs {
            cs: code64(),
            gdt: DescriptorTable {
                base: 0x500,
                limit: 0x27,
            },
            cr0: 0x8000_0011,
            cr3: 0x9000,
            cr4: 0x20,
            efer: 0x500,
            apic_base: 0xfee0_0900,
            ..SpecialRegs::default()
        };
        let values = sregs_to_values(&sregs);
        assert_eq!(values[9], [0x27 << 48, 0x500]);
        let mut back = sregs_from_values(&values);
        // Segments left at their defaults come back marked unusable (not present).
        for s in [
            &mut back.es,
            &mut back.ss,
            &mut back.ds,
            &mut back.fs,
            &mut back.gs,
        ] {
            s.unusable = false;
        }
        back.ldt.unusable = false;
        back.tr.unusable = false;
        assert_eq!(back, sregs);
    }

    #[test]
    fn port_io_data_moves_through_rax_as_on_the_cpu() {
        let out = IoAccess {
            port: 0x3f8,
            size: 2,
            write: true,
            string: false,
            rax: 0xdead_beef_1234_5678,
            instruction_len: 1,
        };
        assert_eq!(out.out_data(), vec![0x78, 0x56]);
        assert_eq!(
            complete_in(0xffff_ffff_ffff_ffff, &[0x12]),
            0xffff_ffff_ffff_ff12
        );
        assert_eq!(
            complete_in(0xffff_ffff_ffff_ffff, &[1, 2]),
            0xffff_ffff_ffff_0201
        );
        assert_eq!(
            complete_in(0xffff_ffff_ffff_ffff, &[1, 2, 3, 4]),
            0x0403_0201
        );
    }

    #[test]
    fn impossible_io_reports_are_errors() {
        let io = IoAccess {
            port: 0x80,
            size: 3,
            write: false,
            string: false,
            rax: 0,
            instruction_len: 1,
        };
        assert!(io.validated().is_err());
        assert!(IoAccess {
            size: 1,
            instruction_len: 0,
            ..io
        }
        .validated()
        .is_err());
        assert!(IoAccess {
            size: 4,
            instruction_len: 16,
            ..io
        }
        .validated()
        .is_err());
        assert!(IoAccess { size: 4, ..io }.validated().is_ok());
    }

    #[test]
    fn exit_bitfields_decode() {
        // OUT, 1 byte, not a string op, 2-byte instruction (`out dx, al` is 1; say 2).
        let io = IoAccess::decode(0b0_0011, 0x3f8, 0x41, 0x32).unwrap();
        assert_eq!(
            (io.write, io.size, io.string, io.instruction_len),
            (true, 1, false, 2)
        );
        let ins = IoAccess::decode(0b1_1000, 0x60, 0, 1).unwrap();
        assert_eq!((ins.write, ins.size, ins.string), (false, 4, true));
        assert!(IoAccess::decode(0b0110, 0x60, 0, 1).is_err(), "size 3");
        assert!(memory_access_is_write(1));
        assert!(!memory_access_is_write(0) && !memory_access_is_write(2));
    }

    #[test]
    fn fpu_and_lints_as_firmware_leaves_them() {
        let (fp, xmm) = fpu_values(0x37f, 0x1f80);
        assert_eq!(fp, [0x37f, 0]);
        assert_eq!(xmm, [0, 0xffbf_0000_1f80]);
        let mut page = vec![0u8; 4096];
        page[0x350..0x354].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        set_lapic_lints(&mut page).unwrap();
        assert_eq!(
            u32::from_le_bytes(page[0x350..0x354].try_into().unwrap()),
            0x0001_0700
        );
        assert_eq!(
            u32::from_le_bytes(page[0x360..0x364].try_into().unwrap()),
            0x400
        );
        assert!(set_lapic_lints(&mut [0u8; 0x100]).is_err());
    }

    #[test]
    fn exits_without_a_device_map_to_ours() {
        assert!(matches!(simple_exit(&RawExit::Halt), Some(VcpuExit::Hlt)));
        assert!(matches!(
            simple_exit(&RawExit::Canceled),
            Some(VcpuExit::Interrupted)
        ));
        assert!(matches!(
            simple_exit(&RawExit::UnrecoverableException),
            Some(VcpuExit::Shutdown)
        ));
        assert!(matches!(
            simple_exit(&RawExit::InvalidRegisters(5)),
            Some(VcpuExit::FailEntry { reason: 5 })
        ));
        assert!(matches!(
            simple_exit(&RawExit::Other(0x1003)),
            Some(VcpuExit::Other { code: 0x1003 })
        ));
        assert!(simple_exit(&RawExit::Memory {
            gpa: 0,
            write: true
        })
        .is_none());
    }

    #[test]
    fn interrupt_lines_map_to_vectors_above_the_exceptions() {
        assert_eq!(irq_vector(4).unwrap(), 0x24);
        assert_eq!(irq_vector(223).unwrap(), 0xff);
        assert!(irq_vector(224).is_err());
    }

    #[test]
    fn the_memory_plan_refuses_what_whp_would_corrupt() {
        let mut plan = MemoryPlan::default();
        plan.add(0, 0, 0x10_0000, 0x7f00_0000_0000).unwrap();
        assert!(plan.contains(0xf_ffff));
        assert!(!plan.contains(0x10_0000));
        assert!(plan.add(1, 0x8_0000, 0x1000, 0x1000).is_err(), "overlap");
        assert!(
            plan.add(0, 0x20_0000, 0x1000, 0x1000).is_err(),
            "slot reused"
        );
        assert!(
            plan.add(2, 0x20_0800, 0x1000, 0x1000).is_err(),
            "misaligned"
        );
        assert!(
            plan.add(3, u64::MAX - 0xfff, 0x1000, 0x1000).is_err(),
            "past the end"
        );
        assert!(plan.add(4, 0x20_0000, 0, 0x1000).is_err(), "empty");
        plan.add(5, 0x20_0000, 0x1000, 0x1000).unwrap();
        assert!(plan.contains(0x20_0fff));
    }
}
