//! What a virtio-mem device plugs and unplugs: the [`HotplugMemory`] trait, and its
//! implementation by [`memory::HotplugRegion`].

use vm_memory::GuestAddress;

use super::{RangeState, UnpluggedAccess};

/// The hotplug memory a [`VirtioMem`](super::VirtioMem) plugs and unplugs: `memory::HotplugRegion` in Tide, a fake
/// in tests. Addresses are guest physical; ranges are block aligned.
pub trait HotplugMemory: Send + Sync {
    /// The error of the memory operations.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Guest physical address of the region's first byte.
    fn base(&self) -> GuestAddress;
    /// Size of the region in bytes.
    fn size(&self) -> u64;
    /// Size of a block in bytes: a power of two dividing the base and the size.
    fn block_size(&self) -> u64;
    /// Backs `[addr, addr + len)` with host memory and marks its blocks plugged, adding where
    /// the time went to `times`.
    fn populate_timed(
        &self,
        addr: GuestAddress,
        len: u64,
        times: &mut memory::OpTimes,
    ) -> std::result::Result<(), Self::Error>;
    /// Gives the host memory of `[addr, addr + len)` back and marks its blocks unplugged,
    /// adding where the time went to `times`.
    fn discard_timed(
        &self,
        addr: GuestAddress,
        len: u64,
        times: &mut memory::OpTimes,
    ) -> std::result::Result<(), Self::Error>;
    /// Unplugs every block, adding where the time went to `times`.
    fn discard_all_timed(
        &self,
        times: &mut memory::OpTimes,
    ) -> std::result::Result<(), Self::Error>;
    /// The plug state of `[addr, addr + len)`.
    fn state(&self, addr: GuestAddress, len: u64) -> std::result::Result<RangeState, Self::Error>;
    /// Bytes currently plugged.
    fn plugged_bytes(&self) -> u64;
    /// The plugged blocks as coalesced `(start, length)` runs in address order.
    fn plugged_ranges(&self) -> Vec<(GuestAddress, u64)> {
        let (base, block) = (self.base().0, self.block_size());
        let mut runs: Vec<(GuestAddress, u64)> = Vec::new();
        for i in 0..self.size() / block {
            let addr = base + i * block;
            if !matches!(
                self.state(GuestAddress(addr), block),
                Ok(RangeState::Plugged)
            ) {
                continue;
            }
            match runs.last_mut() {
                Some((start, len)) if start.0 + *len == addr => *len += block,
                _ => runs.push((GuestAddress(addr), block)),
            }
        }
        runs
    }
    /// Sets what guest accesses to unplugged blocks do.
    fn set_unplugged_access(&self, access: UnpluggedAccess)
        -> std::result::Result<(), Self::Error>;
    /// Whether a guest read of an unplugged block would make the host allocate memory when
    /// unplugged blocks are [`UnpluggedAccess::Readable`] (true for shared file-backed memory:
    /// a read fault of a hole allocates a page-cache page; false for private anonymous memory,
    /// which maps the shared zero page).
    fn unplugged_reads_allocate(&self) -> bool {
        true
    }
    /// Bytes populated ahead of the guest's PLUG (not plugged). Memory that cannot populate
    /// ahead has none.
    fn ahead_bytes(&self) -> u64 {
        0
    }
    /// Populates ahead up to `chunk` bytes of the lowest unplugged blocks below `usable_end`
    /// (an offset from the base), so that at most `want` bytes are populated ahead; returns
    /// the bytes populated (0: nothing to do, or memory that cannot populate ahead).
    fn populate_ahead_next(
        &self,
        _usable_end: u64,
        _want: u64,
        _chunk: u64,
    ) -> std::result::Result<u64, Self::Error> {
        Ok(0)
    }
    /// Gives back what was populated ahead beyond its lowest `keep` bytes; returns the bytes
    /// given back.
    fn release_ahead(&self, _keep: u64) -> u64 {
        0
    }
}

impl HotplugMemory for memory::HotplugRegion {
    type Error = memory::Error;

    fn base(&self) -> GuestAddress {
        memory::HotplugRegion::base(self)
    }

    fn size(&self) -> u64 {
        memory::HotplugRegion::size(self)
    }

    fn block_size(&self) -> u64 {
        memory::HotplugRegion::block_size(self)
    }

    fn populate_timed(
        &self,
        addr: GuestAddress,
        len: u64,
        times: &mut memory::OpTimes,
    ) -> memory::Result<()> {
        memory::HotplugRegion::populate_timed(self, addr, len, times)
    }

    fn discard_timed(
        &self,
        addr: GuestAddress,
        len: u64,
        times: &mut memory::OpTimes,
    ) -> memory::Result<()> {
        memory::HotplugRegion::discard_timed(self, addr, len, times)
    }

    fn discard_all_timed(&self, times: &mut memory::OpTimes) -> memory::Result<()> {
        memory::HotplugRegion::discard_all_timed(self, times)
    }

    fn state(&self, addr: GuestAddress, len: u64) -> memory::Result<RangeState> {
        memory::HotplugRegion::state(self, addr, len)
    }

    fn plugged_bytes(&self) -> u64 {
        memory::HotplugRegion::plugged_bytes(self)
    }

    fn plugged_ranges(&self) -> Vec<(GuestAddress, u64)> {
        memory::HotplugRegion::plugged_ranges(self)
    }

    fn set_unplugged_access(&self, access: UnpluggedAccess) -> memory::Result<()> {
        memory::HotplugRegion::set_unplugged_access(self, access)
    }

    fn unplugged_reads_allocate(&self) -> bool {
        memory::HotplugRegion::unplugged_reads_allocate(self)
    }

    fn ahead_bytes(&self) -> u64 {
        memory::HotplugRegion::ahead_bytes(self)
    }

    fn populate_ahead_next(&self, usable_end: u64, want: u64, chunk: u64) -> memory::Result<u64> {
        memory::HotplugRegion::populate_ahead_next(self, usable_end, want, chunk)
    }

    fn release_ahead(&self, keep: u64) -> u64 {
        memory::HotplugRegion::release_ahead(self, keep)
    }
}
