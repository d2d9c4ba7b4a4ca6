//! The CPUID a vCPU reports: the hypervisor's supported set, with this vCPU's APIC ID
//! and the VM's topology (one thread per core, all cores in one package, one node), the
//! KVM paravirtual features we want, no nested virtualization, and, under the `kvm_pvm`
//! hypervisor only, without the features its instruction emulator cannot run at CPL0.

use crate::hypervisor::CpuidEntry;

/// Which register of a CPUID leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// Feature bits hidden from the guest under `kvm_pvm`: (leaf, sub-leaf, register, bits).
///
/// Guest kernel code runs in KVM's instruction emulator there, which lacks these
/// instructions (or the state handling behind them). The kernel picks many of them
/// through `alternatives` when CPUID offers them, so the guest must not see them.
/// Guest user code runs natively and loses only optional speed-ups.
const PVM_HIDDEN: &[(u32, u32, Reg, u32)] = &[
    // Leaf 1 ECX: PCLMULQDQ(1), DTES64(2), MONITOR(3), DS-CPL(4), VMX(5), SMX(6),
    // FMA(12), CX16(13), PCID(17), SSE4.2/CRC32(20), MOVBE(22), POPCNT(23),
    // AES(25), XSAVE(26), OSXSAVE(27), AVX(28), F16C(29), RDRAND(30).
    (
        1,
        0,
        Reg::Ecx,
        bits(&[
            1, 2, 3, 4, 5, 6, 12, 13, 17, 20, 22, 23, 25, 26, 27, 28, 29, 30,
        ]),
    ),
    // Leaf 7.0 EBX: FSGSBASE(0), SGX(2), BMI1(3), HLE(4), AVX2(5), SMEP(7), BMI2(8),
    // ERMS(9), INVPCID(10), RTM(11), MPX(14), AVX512F(16), AVX512DQ(17), RDSEED(18),
    // ADX(19), SMAP(20), AVX512IFMA(21),
    // CLFLUSHOPT(23), CLWB(24), PT(25), AVX512PF(26), AVX512ER(27), AVX512CD(28), SHA(29),
    // AVX512BW(30), AVX512VL(31).
    (
        7,
        0,
        Reg::Ebx,
        bits(&[
            0, 2, 3, 4, 5, 7, 8, 9, 10, 11, 14, 16, 17, 18, 19, 20, 21, 23, 24, 25, 26, 27, 28, 29,
            30, 31,
        ]),
    ),
    // Leaf 7.0 ECX: AVX512VBMI(1), UMIP(2), PKU(3), OSPKE(4), WAITPKG(5), AVX512VBMI2(6),
    // CET-SS(7), GFNI(8), VAES(9), VPCLMULQDQ(10), AVX512VNNI(11), AVX512BITALG(12),
    // AVX512VPOPCNTDQ(14), LA57(16), RDPID(22), KL(23), CLDEMOTE(25), MOVDIRI(27),
    // MOVDIR64B(28), ENQCMD(29), PKS(31).
    (
        7,
        0,
        Reg::Ecx,
        bits(&[
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 22, 23, 25, 27, 28, 29, 31,
        ]),
    ),
    // Leaf 7.0 EDX: AVX512-4VNNIW(2), AVX512-4FMAPS(3), FSRM(4), UINTR(5),
    // AVX512-VP2INTERSECT(8), SERIALIZE(14), TSXLDTRK(16), CET-IBT(20), AMX-BF16(22),
    // AVX512-FP16(23), AMX-TILE(24), AMX-INT8(25), ARCH_CAPABILITIES(29, MSR 0x10a).
    (
        7,
        0,
        Reg::Edx,
        bits(&[2, 3, 4, 5, 8, 14, 16, 20, 22, 23, 24, 25, 29]),
    ),
    // Leaf 7.1: every feature (AVX-VNNI, AVX512-BF16, FZRM, FSRS, FSRC, FRED, LAM, ...).
    (7, 1, Reg::Eax, u32::MAX),
    (7, 1, Reg::Ebx, u32::MAX),
    (7, 1, Reg::Ecx, u32::MAX),
    (7, 1, Reg::Edx, u32::MAX),
    // Leaf 0x8000_0001 ECX: ABM/LZCNT(5), SSE4A(6), MISALIGNSSE(7), 3DNOWPREFETCH(8),
    // XOP(11), FMA4(16), TBM(21), MWAITX(29).
    (0x8000_0001, 0, Reg::Ecx, bits(&[6, 7, 8, 11, 16, 21, 29])),
    // Leaf 0x8000_0001 EDX: RDTSCP(27), 3DNOWEXT(30), 3DNOW(31).
    (0x8000_0001, 0, Reg::Edx, bits(&[27, 30, 31])),
    // KVM paravirtual features that make hypercalls: PV_UNHALT(7, KVM_HC_KICK_CPU) and
    // PV_SEND_IPI(11, KVM_HC_SEND_IPI). Under kvm_pvm the emulator "fixes" the guest's
    // VMMCALL by writing another instruction over it, a write to read-only kernel text:
    // a 4-vCPU guest oopsed in its first PV IPI ("unable to handle page fault" at the
    // VMMCALL, RAX=10).
    (0x4000_0001, 0, Reg::Eax, bits(&[7, 11])),
];

/// The XSAVE leaf (0xD) is dropped entirely under `kvm_pvm`.
const XSAVE_LEAF: u32 = 0xd;

/// Leaf 1 ECX bit 5: VMX. Leaf 0x8000_0001 ECX bit 2: SVM. The guest gets no nested
/// virtualization (and so no `/dev/kvm` of its own): untrusted code has no use for it,
/// and it is a large attack surface of the host kernel.
const LEAF1_ECX_VMX: u32 = 1 << 5;
const EXT1_ECX_SVM: u32 = 1 << 2;
/// AMD's SVM feature leaf, meaningless without SVM.
const SVM_LEAF: u32 = 0x8000_000a;

/// KVM's paravirtual feature leaf (EAX holds the feature bits).
const KVM_FEATURES_LEAF: u32 = 0x4000_0001;
/// The KVM paravirtual features a guest gets, where the hypervisor offers them:
/// kvmclock (0, 3) and its stable bit (24), no-op port-0x80 delays (1), steal time (5),
/// PV EOI (6), PV spinlock unhalt (7), PV TLB flush (9) and PV IPIs (11). Left out:
/// asynchronous page faults (4, 10, 14; the guest's memory is never swapped behind its
/// back in a short-lived sandbox), halt-poll control (12), PV sched-yield (13), the
/// extended MSI destination ID (15) and migration control (17).
const KVM_FEATURES_WANTED: u32 = bits(&[0, 1, 3, 5, 6, 7, 9, 11, 24]);

/// AMD cache topology (0x8000_001D) and extended APIC ID / core / node (0x8000_001E).
const AMD_CACHE_LEAF: u32 = 0x8000_001d;
const AMD_TOPOLOGY_LEAF: u32 = 0x8000_001e;

const fn bits(mut list: &[u32]) -> u32 {
    let mut mask = 0;
    while let [bit, rest @ ..] = list {
        mask |= 1 << *bit;
        list = rest;
    }
    mask
}

fn reg_mut(entry: &mut CpuidEntry, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

/// Remove what the `kvm_pvm` emulator cannot execute (see `PVM_HIDDEN`).
pub fn filter_for_pvm(entries: &mut Vec<CpuidEntry>) {
    entries.retain(|e| e.function != XSAVE_LEAF);
    for entry in entries.iter_mut() {
        for &(function, index, reg, mask) in PVM_HIDDEN {
            if entry.function == function && entry.index == index {
                *reg_mut(entry, reg) &= !mask;
            }
        }
    }
}

/// Bits needed to number `count` items (ceil(log2(count))).
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// The CPUID for vCPU `apic_id` of `nr_vcpus`, from the hypervisor's supported set.
pub fn vcpu_cpuid(
    supported: &[CpuidEntry],
    apic_id: u8,
    nr_vcpus: u8,
    pvm: bool,
) -> Vec<CpuidEntry> {
    let mut entries = supported.to_vec();
    entries.retain(|e| e.function != SVM_LEAF);
    if pvm {
        filter_for_pvm(&mut entries);
    }
    let apic = u32::from(apic_id);
    let count = u32::from(nr_vcpus.max(1));
    let core_bits = id_bits(nr_vcpus);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX: [31:24] initial APIC ID, [23:16] logical processors per package.
                e.ebx = (e.ebx & 0xffff) | (count.min(255) << 16) | (apic << 24);
                // EDX[28] HTT: more than one logical processor per package.
                if count > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
                // ECX[31]: running under a hypervisor; no VMX for the guest.
                e.ecx |= 1 << 31;
                e.ecx &= !LEAF1_ECX_VMX;
            }
            0x8000_0001 => e.ecx &= !EXT1_ECX_SVM,
            KVM_FEATURES_LEAF => e.eax &= KVM_FEATURES_WANTED,
            4 => {
                // Deterministic cache parameters: [31:26] cores per package - 1,
                // [25:14] threads sharing this cache - 1 (the L3 is shared by all).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | ((count - 1) << 26);
            }
            0xb | 0x1f => {
                // Extended topology: sub-leaf 0 = SMT (one thread per core), 1 = core.
                e.edx = apic;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    index => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = index & 0xff;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: [15:12] APIC ID bits for cores, [7:0] cores per package - 1.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            AMD_CACHE_LEAF => {
                // [25:14] logical processors sharing this cache - 1: the L3 is shared
                // by all, L1 and L2 belong to one core.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & !(0xfff << 14)) | ((sharing & 0xfff) << 14);
            }
            AMD_TOPOLOGY_LEAF => {
                // EAX: extended APIC ID; EBX: [15:8] threads per core - 1 (one),
                // [7:0] core ID; ECX: [10:8] nodes per package - 1 (one), [7:0] node 0.
                e.eax = apic;
                e.ebx = apic & 0xff;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, value: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            eax: value,
            ebx: value,
            ecx: value,
            edx: value,
            ..Default::default()
        }
    }

    fn find(entries: &[CpuidEntry], function: u32, index: u32) -> Option<CpuidEntry> {
        entries
            .iter()
            .copied()
            .find(|e| e.function == function && e.index == index)
    }

    #[test]
    fn leaf_1_carries_the_apic_id_and_processor_count() {
        let supported = [leaf(1, 0, 0x0000_0800)];

        let cpuid = vcpu_cpuid(&supported, 3, 4, false);

        let l1 = find(&cpuid, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.edx & (1 << 28), 0);
        assert_ne!(l1.ecx & (1 << 31), 0);
    }

    #[test]
    fn extended_topology_describes_cores_of_one_package() {
        let supported = [leaf(0xb, 0, 0), leaf(0xb, 1, 0), leaf(0xb, 2, 0)];

        let cpuid = vcpu_cpuid(&supported, 2, 3, false);

        let smt = find(&cpuid, 0xb, 0).unwrap();
        let core = find(&cpuid, 0xb, 1).unwrap();
        let invalid = find(&cpuid, 0xb, 2).unwrap();
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        assert_eq!((invalid.ebx, invalid.ecx >> 8), (0, 0));
    }

    #[test]
    fn pvm_filter_hides_features_the_emulator_cannot_run() {
        let supported = [
            leaf(1, 0, u32::MAX),
            leaf(7, 0, u32::MAX),
            leaf(7, 1, u32::MAX),
            leaf(0xd, 0, u32::MAX),
            leaf(0xd, 1, u32::MAX),
            leaf(0x8000_0001, 0, u32::MAX),
            leaf(KVM_FEATURES_LEAF, 0, u32::MAX),
        ];

        let cpuid = vcpu_cpuid(&supported, 0, 1, true);

        let l1 = find(&cpuid, 1, 0).unwrap();
        let l7 = find(&cpuid, 7, 0).unwrap();
        let l7_1 = find(&cpuid, 7, 1).unwrap();
        let ext = find(&cpuid, 0x8000_0001, 0).unwrap();
        for (bit, name) in [
            (23, "popcnt"),
            (13, "cx16"),
            (26, "xsave"),
            (27, "osxsave"),
            (20, "sse4.2"),
            (30, "rdrand"),
        ] {
            assert_eq!(l1.ecx & (1 << bit), 0, "{name}");
        }
        for (bit, name) in [
            (0, "fsgsbase"),
            (7, "smep"),
            (9, "erms"),
            (18, "rdseed"),
            (20, "smap"),
            (29, "sha"),
        ] {
            assert_eq!(l7.ebx & (1 << bit), 0, "{name}");
        }
        for (bit, name) in [(2, "umip"), (3, "pku"), (22, "rdpid")] {
            assert_eq!(l7.ecx & (1 << bit), 0, "{name}");
        }
        assert_eq!(l7.edx & (1 << 4), 0, "fsrm");
        assert_eq!(l7.edx & (1 << 29), 0, "arch_capabilities");
        assert_eq!((l7_1.eax, l7_1.ebx, l7_1.ecx, l7_1.edx), (0, 0, 0, 0));
        assert!(find(&cpuid, 0xd, 0).is_none());
        assert!(find(&cpuid, 0xd, 1).is_none());
        assert_eq!(ext.edx & (1 << 27), 0, "rdtscp");
        let kvm = find(&cpuid, KVM_FEATURES_LEAF, 0).unwrap();
        assert_eq!(kvm.eax & (1 << 11), 0, "pv send ipi (a hypercall)");
        assert_eq!(kvm.eax & (1 << 7), 0, "pv unhalt (a hypercall)");
        assert_ne!(kvm.eax & 1, 0, "kvmclock stays");
        assert_ne!(l1.edx & (1 << 25), 0, "sse stays");
        assert_ne!(l1.ecx & 1, 0, "sse3 stays");
    }

    #[test]
    fn hardware_kvm_keeps_every_supported_feature() {
        let supported = [leaf(7, 0, u32::MAX), leaf(0xd, 0, 7)];

        let cpuid = vcpu_cpuid(&supported, 0, 1, false);

        assert_eq!(find(&cpuid, 7, 0).unwrap().ebx, u32::MAX);
        assert_eq!(find(&cpuid, 0xd, 0).unwrap().eax, 7);
    }

    #[test]
    fn the_tsc_deadline_bit_the_hypervisor_offers_is_kept_on_every_flavour() {
        let supported = [leaf(1, 0, 1 << 24)];

        for pvm in [false, true] {
            let cpuid = vcpu_cpuid(&supported, 0, 1, pvm);
            assert_ne!(find(&cpuid, 1, 0).unwrap().ecx & (1 << 24), 0, "pvm={pvm}");
        }
    }

    #[test]
    fn the_guest_gets_no_nested_virtualization() {
        let supported = [
            leaf(1, 0, u32::MAX),
            leaf(0x8000_0001, 0, u32::MAX),
            leaf(SVM_LEAF, 0, u32::MAX),
        ];

        let cpuid = vcpu_cpuid(&supported, 0, 1, false);

        assert_eq!(find(&cpuid, 1, 0).unwrap().ecx & LEAF1_ECX_VMX, 0);
        assert_eq!(find(&cpuid, 0x8000_0001, 0).unwrap().ecx & EXT1_ECX_SVM, 0);
        assert!(find(&cpuid, SVM_LEAF, 0).is_none());
    }

    #[test]
    fn kvm_paravirt_features_are_the_wanted_subset() {
        let supported = [
            leaf(0x4000_0000, 0, 0x4000_0001),
            leaf(KVM_FEATURES_LEAF, 0, 0x0100_7efb),
        ];

        let cpuid = vcpu_cpuid(&supported, 0, 1, false);

        let features = find(&cpuid, KVM_FEATURES_LEAF, 0).unwrap().eax;
        for (bit, name) in [
            (0, "clocksource"),
            (3, "clocksource2"),
            (24, "clocksource stable"),
            (6, "pv eoi"),
            (7, "pv unhalt"),
        ] {
            assert_ne!(features & (1 << bit), 0, "{name}");
        }
        for (bit, name) in [
            (4, "async pf"),
            (10, "async pf vmexit"),
            (14, "async pf int"),
        ] {
            assert_eq!(features & (1 << bit), 0, "{name}");
        }
        assert_eq!(find(&cpuid, 0x4000_0000, 0).unwrap().eax, 0x4000_0001);
    }

    #[test]
    fn amd_topology_leaves_match_the_apic_ids() {
        let supported = [
            leaf(AMD_TOPOLOGY_LEAF, 0, 0),
            CpuidEntry {
                function: AMD_CACHE_LEAF,
                index: 3,
                eax: 0x0000_4163,
                ..Default::default()
            },
            CpuidEntry {
                function: AMD_CACHE_LEAF,
                index: 0,
                eax: 0x0000_0121,
                ..Default::default()
            },
            leaf(0x8000_0008, 0, 0),
        ];

        let cpuid = vcpu_cpuid(&supported, 3, 4, false);

        let topo = find(&cpuid, AMD_TOPOLOGY_LEAF, 0).unwrap();
        assert_eq!((topo.eax, topo.ebx, topo.ecx), (3, 3, 0));
        let l3 = find(&cpuid, AMD_CACHE_LEAF, 3).unwrap();
        assert_eq!((l3.eax >> 14) & 0xfff, 3, "L3 shared by all 4");
        assert_eq!(l3.eax & 0x3fff, 0x0163, "the cache level and type stay");
        let l1 = find(&cpuid, AMD_CACHE_LEAF, 0).unwrap();
        assert_eq!((l1.eax >> 14) & 0xfff, 0, "L1 per core");
        let ext = find(&cpuid, 0x8000_0008, 0).unwrap();
        assert_eq!((ext.ecx & 0xff, (ext.ecx >> 12) & 0xf), (3, 2));
    }
}
