//! The guest machine's physical layout. Other crates (the guest agent, the kernel command
//! line, tests) depend on these numbers: change them only together.
//!
//! ```text
//! 0x0000_0000  real-mode area: GDT, boot info, page tables, command line, MP table
//! 0x0010_0000  RAM (kernel at its link address, initrd high in low RAM)
//! 0xC000_0000  MMIO gap start (low RAM ends here or earlier: at most 3 GiB)
//! 0xD000_0000  boot-timer device (one page)
//! 0xD000_1000  virtio-mmio slot 0, then one page per slot (IRQ 5 + slot)
//! 0xFEC0_0000  IOAPIC          0xFEE0_0000  local APIC
//! 0x1_0000_0000 RAM above 4 GiB (whatever did not fit below the gap)
//! ```

/// Start of the 32-bit MMIO gap: RAM below it ends here at most.
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO gap; RAM resumes here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Most RAM placed below the gap (3 GiB).
pub const LOW_RAM_MAX: u64 = MMIO_GAP_START;

/// Boot-timer device: the guest writes a one-byte stage code at offset 0.
pub const BOOT_TIMER_ADDR: u64 = 0xD000_0000;
/// Size of the boot-timer window.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// Boot-timer stage code: the guest agent started.
pub const BOOT_STAGE_AGENT_STARTED: u8 = 1;
/// Boot-timer stage code: the guest agent is ready for requests.
pub const BOOT_STAGE_AGENT_READY: u8 = 2;

/// Base of the first virtio-mmio slot.
pub const VIRTIO_MMIO_BASE: u64 = 0xD000_1000;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC input (GSI) of virtio-mmio slot 0; slot `i` uses `VIRTIO_MMIO_IRQ_BASE + i`.
pub const VIRTIO_MMIO_IRQ_BASE: u32 = 5;
/// Number of virtio-mmio slots (GSIs 5..=20): vsock, a network device and one virtio-fs
/// device per share (the system view alone takes up to six on a host without merged
/// `/usr`).
pub const VIRTIO_MMIO_SLOTS: u32 = 16;

/// COM1 base port.
pub const SERIAL_PORT: u16 = 0x3F8;
/// COM1 register count.
pub const SERIAL_PORT_LEN: u16 = 8;
/// COM1 interrupt line.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port; writing `I8042_CMD_RESET` here ends the VM.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 "pulse reset line" command.
pub const I8042_CMD_RESET: u8 = 0xFE;

/// IOAPIC MMIO base.
pub const IOAPIC_ADDR: u64 = 0xFEC0_0000;
/// Local APIC MMIO base.
pub const LAPIC_ADDR: u64 = 0xFEE0_0000;
/// Number of IOAPIC inputs the in-kernel irqchip has.
pub const IOAPIC_PINS: u8 = 24;

/// GDT used while booting (4 entries of 8 bytes).
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Empty IDT loaded while booting.
pub const BOOT_IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// Most entries the PVH memory map may hold (must fit below `ZERO_PAGE_ADDR`).
pub const PVH_MEMMAP_MAX: usize = 64;
/// Linux boot protocol zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Boot stack top for the Linux boot protocol.
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// Identity-mapping page tables for a 64-bit bzImage entry: PML4, PDPT, then 4 PDs.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xA000;
/// First of the four page directories (identity map of the first 4 GiB with 2 MiB pages).
pub const PD_ADDR: u64 = 0xB000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line accepted (the x86 kernel's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the extended BIOS data area; the MP table lives here. RAM below it is
/// usable; `EBDA_START..HIGH_RAM_START` is reserved.
pub const EBDA_START: u64 = 0x9_FC00;
/// MP floating pointer and configuration table.
pub const MPTABLE_ADDR: u64 = EBDA_START;
/// Start of "high" memory (1 MiB): kernels load at or above it.
pub const HIGH_RAM_START: u64 = 0x10_0000;

/// Smallest RAM size the VMM accepts (MiB).
pub const MIN_MEM_MIB: u32 = 16;
/// Most vCPUs the VMM accepts (APIC IDs and the MP table stay simple below this).
pub const MAX_VCPUS: u8 = 64;

/// Guest-physical address of virtio-mmio slot `slot`.
pub const fn virtio_mmio_addr(slot: u32) -> u64 {
    VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE
}

/// IOAPIC GSI of virtio-mmio slot `slot`.
pub const fn virtio_mmio_irq(slot: u32) -> u32 {
    VIRTIO_MMIO_IRQ_BASE + slot
}

// The layout is checked when the crate compiles.
const _: () = {
    // Devices sit inside the MMIO gap, boot timer first, virtio slots below the IOAPIC.
    assert!(BOOT_TIMER_ADDR >= MMIO_GAP_START);
    assert!(BOOT_TIMER_ADDR + BOOT_TIMER_SIZE == VIRTIO_MMIO_BASE);
    assert!(virtio_mmio_addr(VIRTIO_MMIO_SLOTS) <= IOAPIC_ADDR);
    assert!(virtio_mmio_irq(VIRTIO_MMIO_SLOTS - 1) < IOAPIC_PINS as u32);
    // Boot structures do not overlap.
    assert!(BOOT_IDT_ADDR >= BOOT_GDT_ADDR + 4 * 8);
    assert!(PVH_MEMMAP_ADDR + (PVH_MEMMAP_MAX as u64) * 24 <= ZERO_PAGE_ADDR);
    assert!(ZERO_PAGE_ADDR + 0x1000 <= BOOT_STACK_ADDR);
    assert!(PD_ADDR + 4 * 0x1000 <= CMDLINE_ADDR);
    assert!(CMDLINE_ADDR + CMDLINE_MAX as u64 <= MPTABLE_ADDR);
};
