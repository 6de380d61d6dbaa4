//! The Intel MultiProcessor table (spec 1.4): how a guest without ACPI finds its vCPUs, the
//! IOAPIC and the ISA interrupt routing.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{Error, Result, APIC_BASE, IOAPIC_BASE, IOAPIC_PINS, MPTABLE_ADDR};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the MP table bytes for `cpus` vCPUs, to live at `addr`.
pub fn build(cpus: u8, addr: u64) -> Result<Vec<u8>> {
    if cpus == 0 || cpus > 254 {
        return Err(Error::TooManyCpus(cpus));
    }
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    count += 2;
    for pin in 0..IOAPIC_PINS {
        // INT, conforming polarity and trigger, from ISA bus irq `pin` to IOAPIC pin `pin`.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // ExtINT to LINT0 and NMI to LINT1 of every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = addr + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.extend_from_slice(&[4, 0]); // revision, checksum (below)
    table.extend_from_slice(b"TIDE    ");
    table.extend_from_slice(b"TIDE-VMM    ");
    table.extend_from_slice(&[0; 6]); // OEM table pointer and size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_BASE as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `cpus` vCPUs at [`MPTABLE_ADDR`].
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<()> {
    let bytes = build(cpus, MPTABLE_ADDR)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_ADDR))
        .map_err(|_| Error::GuestWrite("MP table"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts_hold() {
        let t = build(4, MPTABLE_ADDR).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let len = u16::from_le_bytes([t[20], t[21]]) as usize;
        assert_eq!(
            t[16..16 + len].iter().fold(0u8, |a, b| a.wrapping_add(*b)),
            0
        );
        // Four 20-byte processor entries come first, with the BSP flag on the first only.
        let procs: Vec<&[u8]> = t[16 + 44..16 + 44 + 80].chunks(20).collect();
        assert!(procs
            .iter()
            .enumerate()
            .all(|(i, c)| c[0] == 0 && c[1] == i as u8));
        assert_eq!(procs.iter().filter(|c| c[3] & CPU_BSP != 0).count(), 1);
        assert_eq!(u16::from_le_bytes([t[16 + 34], t[16 + 35]]), 4 + 2 + 24 + 2);
        assert!(matches!(build(0, 0), Err(Error::TooManyCpus(0))));
        assert!(matches!(build(255, 0), Err(Error::TooManyCpus(255))));
    }
}
