//! Guest physical memory layout: boot RAM around the 32-bit MMIO gap, and the hotplug window.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::size::{GIB, MIB};
use crate::sys::PAGE_SIZE;
use crate::{aligned, Error, Result};

/// First guest physical address of the 32-bit MMIO gap (3 GiB).
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// First guest physical address after the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Width of the guest physical address space the layout must fit in.
pub const GUEST_PHYS_BITS: u32 = 46;
/// Smallest allowed hotplug block size (2 MiB).
pub const MIN_BLOCK_SIZE: u64 = 2 * MIB;
/// The hotplug block size when none is given: the smallest.
pub const DEFAULT_BLOCK_SIZE: u64 = MIN_BLOCK_SIZE;
/// Linux's memory block on x86_64: the unit its virtio-mem driver plugs and unplugs in, and
/// the alignment it wants of hotplug memory.
pub const LINUX_MEMORY_BLOCK: u64 = 128 * MIB;

/// Where the guest's memory lives in guest physical address space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    /// Boot RAM ranges `(start, length)`, sorted, not overlapping, skipping the MMIO gap.
    pub boot_ranges: Vec<(GuestAddress, u64)>,
    /// The hotplug window, if any.
    pub hotplug: Option<HotplugLayout>,
}

/// The guest physical window that hot-pluggable memory is plugged into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotplugLayout {
    /// First guest physical address of the window (1 GiB aligned).
    pub base: GuestAddress,
    /// Size of the window in bytes (a multiple of `block_size`).
    pub size: u64,
    /// Granularity of plug and unplug (a power of two, at least 2 MiB).
    pub block_size: u64,
}

impl HotplugLayout {
    /// The geometry rule of a hotplug window: a power-of-two block size of at least
    /// `min_block_size` (else [`Error::BlockSize`] with `reason`), a block-aligned base, a
    /// non-zero size that is a multiple of the block size, and an end within 64 bits.
    pub fn check(&self, min_block_size: u64, reason: &'static str) -> Result<()> {
        let (base, size, block_size) = (self.base.0, self.size, self.block_size);
        check_block_size(block_size, min_block_size, reason)?;
        if !aligned(base, block_size) {
            return Err(Error::BlockSize {
                block_size,
                reason: "the hotplug base address is not aligned to it",
            });
        }
        if size == 0 || !aligned(size, block_size) {
            return Err(Error::HotplugSize {
                size,
                block_size,
                reason: "must be a non-zero multiple of the block size",
            });
        }
        if base.checked_add(size).is_none() {
            return Err(Error::AddressSpace {
                base,
                size,
                bits: 64,
            });
        }
        Ok(())
    }
}

impl MemoryLayout {
    /// Computes the layout for `boot_ram` bytes of boot RAM and a hotplug window of
    /// `hotplug_size` bytes plugged in `block_size` units.
    ///
    /// Boot RAM is `[0, min(boot_ram, 3 GiB))` and, for the rest, `[4 GiB, 4 GiB + rest)`.
    /// `boot_ram` must be non-zero and a multiple of 4 KiB. The hotplug window starts at the
    /// first 1 GiB boundary (or `block_size` boundary, if that is larger) at or above both the
    /// end of boot RAM and 4 GiB; `block_size` must be
    /// a power of two of at least 2 MiB and `hotplug_size` a multiple of it. A `hotplug_size`
    /// of 0 means no hotplug window (and `block_size` is then not checked). Everything must fit
    /// in the 46-bit guest physical address space.
    pub fn new(boot_ram: u64, hotplug_size: u64, block_size: u64) -> Result<Self> {
        if boot_ram == 0 {
            return Err(Error::BootRam {
                size: boot_ram,
                reason: "boot RAM must not be empty",
            });
        }
        if !aligned(boot_ram, PAGE_SIZE) {
            return Err(Error::BootRam {
                size: boot_ram,
                reason: "boot RAM must be a multiple of 4 KiB",
            });
        }
        let low = boot_ram.min(MMIO_GAP_START);
        let high = boot_ram - low;
        let mut boot_ranges = vec![(GuestAddress(0), low)];
        let mut boot_end = low;
        if high > 0 {
            boot_end = MMIO_GAP_END
                .checked_add(high)
                .filter(|end| *end <= 1u64 << GUEST_PHYS_BITS)
                .ok_or(Error::AddressSpace {
                    base: MMIO_GAP_END,
                    size: high,
                    bits: GUEST_PHYS_BITS,
                })?;
            boot_ranges.push((GuestAddress(MMIO_GAP_END), high));
        }

        let hotplug = if hotplug_size == 0 {
            None
        } else {
            check_block_size(
                block_size,
                MIN_BLOCK_SIZE,
                "must be a power of two of at least 2 MiB",
            )?;
            if !aligned(hotplug_size, block_size) {
                return Err(Error::HotplugSize {
                    size: hotplug_size,
                    block_size,
                    reason: "must be a multiple of the block size",
                });
            }
            // boot_end <= 2^46 and align <= 2^63, so this cannot overflow.
            let align = block_size.max(GIB);
            let base = boot_end.max(MMIO_GAP_END).div_ceil(align) * align;
            let fits = base
                .checked_add(hotplug_size)
                .is_some_and(|end| end <= 1u64 << GUEST_PHYS_BITS);
            if !fits {
                return Err(Error::AddressSpace {
                    base,
                    size: hotplug_size,
                    bits: GUEST_PHYS_BITS,
                });
            }
            Some(HotplugLayout {
                base: GuestAddress(base),
                size: hotplug_size,
                block_size,
            })
        };
        Ok(MemoryLayout {
            boot_ranges,
            hotplug,
        })
    }

    /// The highest boot RAM address plus one (0 if there is no boot RAM).
    #[cfg(test)]
    fn boot_ram_end(&self) -> u64 {
        self.boot_ranges
            .iter()
            .map(|(start, len)| start.0.saturating_add(*len))
            .max()
            .unwrap_or(0)
    }

    /// Total boot RAM in bytes.
    #[cfg(test)]
    fn boot_ram_size(&self) -> u64 {
        self.boot_ranges.iter().map(|(_, len)| *len).sum()
    }
}

/// Maps the boot RAM ranges of `layout` as private anonymous memory.
pub fn create_boot_memory(layout: &MemoryLayout) -> Result<GuestMemoryMmap> {
    let mut ranges = Vec::with_capacity(layout.boot_ranges.len());
    for (start, len) in &layout.boot_ranges {
        let len = usize::try_from(*len).map_err(|_| Error::AddressSpace {
            base: start.0,
            size: *len,
            bits: usize::BITS,
        })?;
        ranges.push((*start, len));
    }
    GuestMemoryMmap::from_ranges(&ranges).map_err(Error::BootMemory)
}

/// Checks that `block_size` is a power of two of at least `min`; `reason` says so in the error.
pub(crate) fn check_block_size(block_size: u64, min: u64, reason: &'static str) -> Result<()> {
    if !block_size.is_power_of_two() || block_size < min {
        return Err(Error::BlockSize { block_size, reason });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_boot_ram() {
        let l = MemoryLayout::new(512 * MIB, 0, 0).unwrap();
        assert_eq!(l.boot_ranges, vec![(GuestAddress(0), 512 * MIB)]);
        assert_eq!(l.boot_ram_end(), 512 * MIB);
        assert!(l.hotplug.is_none());
    }

    #[test]
    fn boot_ram_split_around_gap() {
        let l = MemoryLayout::new(8 * GIB, 16 * GIB, 128 * MIB).unwrap();
        assert_eq!(
            l.boot_ranges,
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), 5 * GIB)]
        );
        assert_eq!(l.boot_ram_end(), 9 * GIB);
        assert_eq!(l.boot_ram_size(), 8 * GIB);
        let h = l.hotplug.unwrap();
        assert_eq!(h.base, GuestAddress(9 * GIB));
        assert_eq!(h.size, 16 * GIB);
        assert_eq!(h.block_size, 128 * MIB);
    }

    #[test]
    fn hotplug_base_is_aligned_and_above_4g() {
        let l = MemoryLayout::new(MIB, 2 * MIB, 2 * MIB).unwrap();
        assert_eq!(l.hotplug.unwrap().base, GuestAddress(4 * GIB));
        let l = MemoryLayout::new(3 * GIB + 4096, 2 * MIB, 2 * MIB).unwrap();
        assert_eq!(l.boot_ram_end(), 4 * GIB + 4096);
        assert_eq!(l.hotplug.unwrap().base, GuestAddress(5 * GIB));
        let l = MemoryLayout::new(3 * GIB, 2 * MIB, 2 * MIB).unwrap();
        assert_eq!(l.boot_ranges.len(), 1);
        assert_eq!(l.hotplug.unwrap().base, GuestAddress(4 * GIB));
    }

    #[test]
    fn rejects_bad_layouts() {
        assert!(matches!(
            MemoryLayout::new(0, 0, 0),
            Err(Error::BootRam { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(4097, 0, 0),
            Err(Error::BootRam { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(GIB, GIB, MIB),
            Err(Error::BlockSize { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(GIB, GIB, 3 * MIB),
            Err(Error::BlockSize { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(GIB, 3 * MIB, 2 * MIB),
            Err(Error::HotplugSize { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(GIB, 1 << 46, 2 * MIB),
            Err(Error::AddressSpace { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(1 << 46, 0, 0),
            Err(Error::AddressSpace { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(!4095, 0, 0),
            Err(Error::AddressSpace { .. })
        ));
        // Largest hotplug that fits.
        let l = MemoryLayout::new(GIB, (1 << 46) - 4 * GIB, 1 << 30).unwrap();
        assert_eq!(l.hotplug.unwrap().base, GuestAddress(4 * GIB));
    }

    #[test]
    fn boot_memory() {
        let l = MemoryLayout::new(3 * GIB + 64 * MIB, 0, 0).unwrap();
        let mem = create_boot_memory(&l).unwrap();
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0x1234_5678u32, GuestAddress(4 * GIB + 8))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(4 * GIB + 8)).unwrap(),
            0x1234_5678
        );
        assert!(mem.read_obj::<u32>(GuestAddress(3 * GIB)).is_err());
    }
}
