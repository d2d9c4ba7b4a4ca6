//! Conformance test of the hypervisor layer: the same tiny guest programs, in real mode
//! and in 64-bit long mode, run through the `Hypervisor`/`Vm`/`Vcpu` traits on every
//! backend this host has. Fast: a few exits each.
#![allow(clippy::unwrap_used, clippy::panic)]

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::hypervisor::{DescriptorTable, Hypervisor, Segment, SpecialRegs, VcpuExit, VcpuX86, Vm};

type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

const CODE_ADDR: u64 = 0x1000;
const GDT_ADDR: u64 = 0x500;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xA000;
const PD_ADDR: u64 = 0xB000;
const MEM_SIZE: usize = 0x20_0000;

/// Every backend this host offers. A host without one fails the test loudly.
fn backends() -> Vec<Box<dyn Hypervisor>> {
    let mut found: Vec<Box<dyn Hypervisor>> = Vec::new();
    match vmm::hypervisor::open() {
        Ok(hv) => found.push(hv),
        Err(e) => eprintln!("this platform's hypervisor is unavailable: {e}"),
    }
    assert!(
        !found.is_empty(),
        "no hypervisor backend on this host (need a usable /dev/kvm); cannot run the conformance test"
    );
    found
}

/// A VM with `MEM_SIZE` bytes of RAM at 0 holding `code` at `CODE_ADDR`, and one vCPU.
fn vm_with_code(
    hv: &dyn Hypervisor,
    code: &[u8],
) -> (Box<dyn Vm>, Box<dyn VcpuX86>, GuestMemoryMmap) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    mem.write_slice(code, GuestAddress(CODE_ADDR)).unwrap();
    let vm = hv.create_vm().unwrap();
    let region = mem.iter().next().unwrap();
    // SAFETY: the mapping is owned by `mem`, which the test keeps alive with the VM.
    unsafe { vm.map_memory(0, 0, region.len(), region.as_ptr() as u64) }.unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    (vm, vcpu, mem)
}

fn real_mode_segment(selector: u16, type_: u8) -> Segment {
    Segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_,
        present: true,
        s: true,
        ..Default::default()
    }
}

#[test]
fn real_mode_program_does_port_io_and_halts() {
    // mov dx,0x3f8 ; in al,0x61 ; add al,bl ; out dx,al ; hlt
    let code = [0xba, 0xf8, 0x03, 0xe4, 0x61, 0x00, 0xd8, 0xee, 0xf4];
    for hv in backends() {
        let (_vm, mut vcpu, _mem) = vm_with_code(hv.as_ref(), &code);
        let mut sregs = vcpu.special_regs().unwrap();
        sregs.cs = real_mode_segment(0, 0xb);
        sregs.ds = real_mode_segment(0, 0x3);
        sregs.cr0 &= !1;
        vcpu.set_special_regs(&sregs).unwrap();
        let mut regs = vcpu.regs().unwrap();
        regs.rip = CODE_ADDR;
        regs.rbx = 5;
        regs.rflags = 0x2;
        vcpu.set_regs(&regs).unwrap();

        let mut events = Vec::new();
        loop {
            match vcpu.run().unwrap() {
                VcpuExit::IoIn { port, data } => {
                    events.push(format!("in {port:#x} {}", data.len()));
                    data.fill(0x30);
                }
                VcpuExit::IoOut { port, data } => events.push(format!("out {port:#x} {data:?}")),
                VcpuExit::Hlt => break,
                other => panic!("{}: unexpected exit {other:?}", hv.name()),
            }
        }
        let regs = vcpu.regs().unwrap();

        assert_eq!(
            events,
            vec!["in 0x61 1".to_string(), "out 0x3f8 [53]".to_string()],
            "{}",
            hv.name()
        );
        assert_eq!(regs.rax & 0xff, 0x35, "{}", hv.name());
        assert_eq!(regs.rip, CODE_ADDR + code.len() as u64, "{}", hv.name());
    }
}

/// GDT: null, 64-bit code (0x08), data (0x10).
fn write_long_mode_tables(mem: &GuestMemoryMmap) {
    let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + i as u64 * 8))
            .unwrap();
    }
    // Identity-map 4 GiB with 2 MiB pages: PML4[0] -> PDPT, PDPT[0..4] -> PDs.
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))
        .unwrap();
    for pd in 0..4u64 {
        let pd_addr = PD_ADDR + pd * 0x1000;
        mem.write_obj(pd_addr | 0x3, GuestAddress(PDPT_ADDR + pd * 8))
            .unwrap();
        for i in 0..512u64 {
            let frame = (pd * 512 + i) << 21;
            mem.write_obj(frame | 0x83, GuestAddress(pd_addr + i * 8))
                .unwrap();
        }
    }
}

fn long_mode_sregs(mut sregs: SpecialRegs) -> SpecialRegs {
    let code = Segment {
        base: 0,
        limit: 0xfffff,
        selector: 0x08,
        type_: 0xb,
        present: true,
        s: true,
        l: true,
        g: true,
        ..Default::default()
    };
    let data = Segment {
        selector: 0x10,
        type_: 0x3,
        l: false,
        db: true,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt = DescriptorTable {
        base: GDT_ADDR,
        limit: 3 * 8 - 1,
    };
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8000_0011; // PG | ET | PE
    sregs.efer = 0x500; // LMA | LME
    sregs
}

#[test]
fn long_mode_program_does_mmio_and_port_io() {
    let mut code = vec![0x48, 0xb8];
    code.extend_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes()); // mov rax, imm64
    code.extend_from_slice(&[0x48, 0x01, 0xd8]); // add rax, rbx
    code.extend_from_slice(&[0x48, 0xba]);
    code.extend_from_slice(&0xd000_0000u64.to_le_bytes()); // mov rdx, 0xd0000000
    code.extend_from_slice(&[0x48, 0x89, 0x02]); // mov [rdx], rax
    code.extend_from_slice(&[0x48, 0x8b, 0x0a]); // mov rcx, [rdx]
    code.extend_from_slice(&[0xba, 0xf8, 0x03, 0x00, 0x00]); // mov edx, 0x3f8
    code.extend_from_slice(&[0xee, 0xf4]); // out dx, al ; hlt
    let expected = 0x1122_3344_5566_7788u64 + 0x10;
    for hv in backends() {
        let (_vm, mut vcpu, mem) = vm_with_code(hv.as_ref(), &code);
        write_long_mode_tables(&mem);
        let sregs = long_mode_sregs(vcpu.special_regs().unwrap());
        vcpu.set_special_regs(&sregs).unwrap();
        let mut regs = vcpu.regs().unwrap();
        regs.rip = CODE_ADDR;
        regs.rbx = 0x10;
        regs.rsp = 0x8000;
        regs.rflags = 0x2;
        vcpu.set_regs(&regs).unwrap();

        let mut events = Vec::new();
        loop {
            match vcpu.run().unwrap() {
                VcpuExit::MmioWrite { addr, data } => {
                    events.push(format!("mmio write {addr:#x} {data:02x?}"));
                }
                VcpuExit::MmioRead { addr, data } => {
                    events.push(format!("mmio read {addr:#x} {}", data.len()));
                    data.copy_from_slice(&0xabcdu64.to_le_bytes());
                }
                VcpuExit::IoOut { port, data } => events.push(format!("out {port:#x} {data:02x?}")),
                VcpuExit::Hlt => break,
                other => panic!("{}: unexpected exit {other:?}", hv.name()),
            }
        }
        let regs = vcpu.regs().unwrap();
        let sregs = vcpu.special_regs().unwrap();

        assert_eq!(
            events,
            vec![
                format!("mmio write 0xd0000000 {:02x?}", expected.to_le_bytes()),
                "mmio read 0xd0000000 8".to_string(),
                format!("out 0x3f8 [{:02x}]", expected & 0xff),
            ],
            "{}",
            hv.name()
        );
        assert_eq!(regs.rax, expected, "{}", hv.name());
        assert_eq!(regs.rcx, 0xabcd, "{}", hv.name());
        assert_eq!(regs.rip, CODE_ADDR + code.len() as u64, "{}", hv.name());
        assert_eq!(sregs.efer & 0x400, 0x400, "{}: EFER.LMA", hv.name());
    }
}

#[test]
fn kick_interrupts_a_spinning_vcpu() {
    // jmp $  (spins forever in real mode)
    let code = [0xeb, 0xfe];
    for hv in backends() {
        let (_vm, mut vcpu, _mem) = vm_with_code(hv.as_ref(), &code);
        let mut sregs = vcpu.special_regs().unwrap();
        sregs.cs = real_mode_segment(0, 0xb);
        vcpu.set_special_regs(&sregs).unwrap();
        let mut regs = vcpu.regs().unwrap();
        regs.rip = CODE_ADDR;
        regs.rflags = 0x2;
        vcpu.set_regs(&regs).unwrap();
        let kicker = vcpu.kicker();
        let kick_thread = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            kicker.kick();
        });

        let exit = format!("{:?}", vcpu.run().unwrap());
        kick_thread.join().unwrap();

        assert_eq!(exit, "Interrupted", "{}", hv.name());
    }
}

/// A device's interrupt line raises its irqchip input: the line triggers without error
/// on every backend (what the guest sees of it is the end-to-end tests' business).
#[test]
fn interrupt_lines_trigger_on_every_backend() {
    for hv in backends() {
        let vm = hv.create_vm().unwrap();
        vm.create_irqchip().unwrap();
        let line = vm.interrupt_line(5).unwrap();
        line.trigger().unwrap();
        line.trigger().unwrap();
    }
}
