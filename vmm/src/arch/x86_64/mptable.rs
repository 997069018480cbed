//! The Intel MultiProcessor Specification 1.4 table: a floating pointer and
//! a configuration table listing the vCPUs, the ISA bus, the IOAPIC and
//! the legacy interrupt routing. Linux uses it when ACPI is off (`acpi=off`).

use vm_memory::{Bytes, GuestAddress};

use crate::arch::acpi::ioapic_id;
use crate::arch::layout::{IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_START};
use crate::vstate::memory::GuestMemoryMmap;

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
/// Family 6 signature and FPU + APIC feature flags for processor entries.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ALL_LOCAL_APICS: u8 = 0xff;
const ISA_IRQS: u8 = 16;

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the MP table: {0}")]
pub struct MptableError(#[from] vm_memory::GuestMemoryError);

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer followed by the configuration table, for a
/// table placed at `base`.
pub fn build_mptable(base: u64, vcpus: u8) -> Vec<u8> {
    let ioapic = ioapic_id(vcpus);
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;

    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // Type, interrupt type, flags (conforming), bus 0, bus IRQ, IOAPIC, pin.
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, 0, irq, ioapic, irq]);
        count += 1;
    }
    for (lint, kind) in [(0u8, INT_TYPE_EXTINT), (1, INT_TYPE_NMI)] {
        entries.extend_from_slice(&[
            ENTRY_LOCAL_INTERRUPT,
            kind,
            0,
            0,
            0,
            0,
            ALL_LOCAL_APICS,
            lint,
        ]);
        count += 1;
    }

    let table_len = (HEADER_LEN + entries.len()) as u16;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&table_len.to_le_bytes());
    header.extend_from_slice(&[SPEC_REV, 0]); // checksum patched below
    header.extend_from_slice(b"EVMM    ");
    header.extend_from_slice(b"EVMM-VM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended length, checksum, reserved
    debug_assert_eq!(header.len(), HEADER_LEN);

    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(FLOATING_POINTER_LEN);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&((base + FLOATING_POINTER_LEN as u64) as u32).to_le_bytes());
    fp.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    fp
}

/// Writes the MP table at [`MPTABLE_START`].
pub fn write_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    let bytes = build_mptable(MPTABLE_START, vcpus);
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn floating_pointer_and_table_checksums() {
        let b = build_mptable(MPTABLE_START, 2);
        let fp = &b[..16];
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(sum(fp), 0);
        assert_eq!(u32::from_le_bytes(fp[4..8].try_into().unwrap()), 0xf0010);
        assert_eq!((fp[8], fp[9]), (1, 4));
        let table = &b[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
    }

    #[test]
    fn entries() {
        let vcpus = 4;
        let b = build_mptable(MPTABLE_START, vcpus);
        let table = &b[16..];
        let count = u16::from_le_bytes(table[34..36].try_into().unwrap());
        assert_eq!(count as usize, vcpus as usize + 1 + 1 + 16 + 2);
        assert_eq!(
            u32::from_le_bytes(table[36..40].try_into().unwrap()),
            0xfee0_0000
        );
        // Walk the entries.
        let mut off = HEADER_LEN;
        let mut cpus = Vec::new();
        let mut io_ints = 0;
        while off < table.len() {
            let len = if table[off] == ENTRY_PROCESSOR { 20 } else { 8 };
            match table[off] {
                ENTRY_PROCESSOR => cpus.push((table[off + 1], table[off + 3])),
                ENTRY_IOAPIC => assert_eq!(table[off + 1], vcpus),
                ENTRY_IO_INTERRUPT => io_ints += 1,
                _ => {}
            }
            off += len;
        }
        assert_eq!(off, table.len());
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(io_ints, 16);
    }

    #[test]
    fn fits_below_1mib() {
        let b = build_mptable(MPTABLE_START, 254);
        assert!(MPTABLE_START + b.len() as u64 <= 0x10_0000);
    }
}
