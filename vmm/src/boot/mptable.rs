//! The Intel MultiProcessor Specification 1.4 table: how a kernel without ACPI finds the
//! vCPUs' local APICs, the IOAPIC and the ISA interrupt routing.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR};
use crate::memory::GuestMemoryMmap;

const FLOATING_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
const PROCESSOR_SIZE: usize = 20;
const ENTRY_SIZE: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6 signature and the FPU + APIC feature flags, as firmware reports them.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const ISA_BUS_ID: u8 = 0;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("too many vCPUs for the MP table: {0}")]
    TooManyCpus(u8),
    #[error("cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Total bytes the table takes for `cpus` vCPUs.
pub fn table_size(cpus: u8) -> usize {
    FLOATING_SIZE
        + HEADER_SIZE
        + PROCESSOR_SIZE * usize::from(cpus)
        + ENTRY_SIZE * (1 + 1 + usize::from(IOAPIC_PINS) + 2)
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The table's bytes for `cpus` vCPUs when placed at guest address `addr`.
pub fn build(addr: u64, cpus: u8) -> Result<Vec<u8>, MptableError> {
    // The IOAPIC's ID follows the vCPUs' APIC IDs (0..cpus) and must fit in 8 bits.
    let ioapic_id = cpus
        .checked_add(1)
        .filter(|_| cpus > 0)
        .ok_or(MptableError::TooManyCpus(cpus))?;
    let mut entries = Vec::with_capacity(table_size(cpus));
    for cpu in 0..cpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(cpu);
        entries.push(LAPIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        // ISA IRQ n -> IOAPIC pin n, bus-default polarity and trigger.
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0]);
        entries.extend_from_slice(&[ISA_BUS_ID, pin, ioapic_id, pin]);
    }
    // LINT0 = ExtINT (the PIC), LINT1 = NMI, on every local APIC.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0]);
    entries.extend_from_slice(&[ISA_BUS_ID, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0]);
    entries.extend_from_slice(&[ISA_BUS_ID, 0, 0xff, 1]);

    let entry_count = usize::from(cpus) + 1 + 1 + usize::from(IOAPIC_PINS) + 2;
    let table_len = (HEADER_SIZE + entries.len()) as u16;
    let mut header = Vec::with_capacity(HEADER_SIZE);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&table_len.to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"MXC-VM  ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&(entry_count as u16).to_le_bytes());
    header.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.push(0); // extended table checksum
    header.push(0); // reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    let sum = checksum(&table);
    if let Some(c) = table.get_mut(7) {
        *c = sum;
    }

    let config_addr = addr + FLOATING_SIZE as u64;
    let mut floating = Vec::with_capacity(FLOATING_SIZE);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(config_addr as u32).to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(4); // spec revision 1.4
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]); // feature bytes: a configuration table follows
    let sum = checksum(&floating);
    if let Some(c) = floating.get_mut(10) {
        *c = sum;
    }

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Write the MP table for `cpus` vCPUs at `addr`.
pub fn write(mem: &GuestMemoryMmap, addr: u64, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(addr, cpus)?;
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_structures_checksum_to_zero() {
        let bytes = build(0x9fc00, 4).unwrap();

        let (floating, table) = bytes.split_at(FLOATING_SIZE);
        assert_eq!(floating.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        assert_eq!(table.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
    }

    #[test]
    fn the_floating_pointer_points_at_the_table() {
        let bytes = build(0x9fc00, 2).unwrap();

        assert_eq!(&bytes[0..4], b"_MP_");
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 0x9fc10);
        assert_eq!(&bytes[16..20], b"PCMP");
        assert_eq!(bytes.len(), table_size(2));
    }

    #[test]
    fn each_vcpu_is_listed_with_the_first_as_bootstrap() {
        let bytes = build(0, 3).unwrap();

        let cpus: Vec<(u8, u8)> = bytes[FLOATING_SIZE + HEADER_SIZE..]
            .chunks(PROCESSOR_SIZE)
            .take(3)
            .map(|e| (e[1], e[3]))
            .collect();
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1)]);
    }

    #[test]
    fn apic_id_space_limits_the_vcpu_count() {
        assert!(matches!(build(0, 255), Err(MptableError::TooManyCpus(255))));
        assert!(matches!(build(0, 0), Err(MptableError::TooManyCpus(0))));
    }
}
