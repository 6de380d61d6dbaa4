//! The zero page (`struct boot_params`), its e820 map, and the boot page tables.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{Error, Result, CMDLINE_ADDR, EBDA_START, HIMEM_START, PML4_ADDR, ZERO_PAGE_ADDR};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const LOADFLAGS_LOADED_HIGH: u8 = 0x01;

/// What the zero page must say besides the memory map.
#[derive(Debug, Clone, Default)]
pub struct BootInfo {
    /// The setup header of a bzImage (None for an ELF kernel: a default header is written).
    pub setup_header: Option<setup_header>,
    /// Length of the command line written at [`CMDLINE_ADDR`], NUL included.
    pub cmdline_size: u32,
    /// Initramfs location and size, if any.
    pub initrd: Option<(GuestAddress, u32)>,
}

/// Builds the e820 map from the boot RAM ranges (the hotplug region is never listed: the guest
/// learns of it from the virtio-mem device alone).
pub fn e820_map(boot_ranges: &[(GuestAddress, u64)]) -> Vec<boot_e820_entry> {
    let mut map = Vec::new();
    for &(start, len) in boot_ranges {
        let (s, e) = (start.0, start.0 + len);
        if s < HIMEM_START.0 {
            map.push(entry(s, EBDA_START.min(e) - s, E820_RAM));
            if e > HIMEM_START.0 {
                map.push(entry(HIMEM_START.0, e - HIMEM_START.0, E820_RAM));
            }
        } else {
            map.push(entry(s, len, E820_RAM));
        }
    }
    map
}

fn entry(addr: u64, size: u64, r#type: u32) -> boot_e820_entry {
    boot_e820_entry { addr, size, r#type }
}

/// Writes the zero page at [`ZERO_PAGE_ADDR`].
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    info: &BootInfo,
    e820: &[boot_e820_entry],
) -> Result<()> {
    let mut params = boot_params::default();
    if let Some(hdr) = info.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADFLAGS_LOADED_HIGH;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = info.cmdline_size;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size;
    }
    if e820.len() > params.e820_table.len() {
        return Err(Error::E820Full(e820.len()));
    }
    params.e820_table[..e820.len()].copy_from_slice(e820);
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|_| Error::GuestWrite("zero page"))
}

/// Writes identity-mapping page tables for the first 4 GiB (2 MiB pages) at [`PML4_ADDR`] and
/// returns the CR3 value. Layout: PML4, PDPT, then four page directories.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<u64> {
    let pml4 = PML4_ADDR;
    let pdpt = pml4 + 0x1000;
    let pd = pdpt + 0x1000;
    let err = |_| Error::GuestWrite("page tables");
    mem.write_obj(pdpt | 0x03, GuestAddress(pml4))
        .map_err(err)?;
    for i in 0..4u64 {
        mem.write_obj((pd + i * 0x1000) | 0x03, GuestAddress(pdpt + i * 8))
            .map_err(err)?;
    }
    let mut table = vec![0u8; 4 * 512 * 8];
    for (i, chunk) in table.chunks_exact_mut(8).enumerate() {
        // Present, writable, 2 MiB page.
        chunk.copy_from_slice(&(((i as u64) << 21) | 0x83).to_le_bytes());
    }
    mem.write_slice(&table, GuestAddress(pd)).map_err(err)?;
    Ok(pml4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn e820_skips_the_bios_hole_and_lists_high_ram() {
        let m = e820_map(&[(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 1 << 30)]);
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].addr, m[0].size), (0, EBDA_START));
        assert_eq!(
            (m[1].addr, m[1].size),
            (HIMEM_START.0, (3 << 30) - HIMEM_START.0)
        );
        assert_eq!((m[2].addr, m[2].size), (4 << 30, 1 << 30));
        assert!(m.iter().all(|e| e.r#type == E820_RAM));
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_map() {
        let m = mem();
        let info = BootInfo {
            setup_header: None,
            cmdline_size: 12,
            initrd: Some((GuestAddress(0x80_0000), 4096)),
        };
        write_zero_page(&m, &info, &e820_map(&[(GuestAddress(0), 16 << 20)])).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x80_0000);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!(p.e820_entries, 2);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let m = mem();
        assert_eq!(write_page_tables(&m).unwrap(), PML4_ADDR);
        let last_pd: u64 = m
            .read_obj(GuestAddress(PML4_ADDR + 0x2000 + 4 * 4096 - 8))
            .unwrap();
        assert_eq!(last_pd, ((2047u64) << 21) | 0x83);
    }
}
