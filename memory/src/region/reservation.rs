//! The host side of the hotplug region: the one `MAP_NORESERVE` reservation (private
//! anonymous, memfd, hugetlb or a file) and what is done to the host memory of its blocks:
//! protection, populate, give back, the resident size, the vm-memory view. The plug
//! bookkeeping over it is the parent module's.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use log::{error, warn};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestRegionMmap};

use super::HotplugRegion;
use crate::access::UnpluggedAccess;
use crate::backend::Backend;
use crate::backing::BackingFile;
use crate::layout::HotplugLayout;
use crate::populate::{advise_raw, populate_parallel, Priority};
use crate::sys::{create_memfd, last_err, map_none, prime_anon_vma, unmap, HUGE_PAGE_SIZE};
use crate::{aligned, Error, Result};

/// Options for [`HotplugRegion::with_options`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionOptions {
    /// Ask for transparent huge pages (`MADV_HUGEPAGE`) on the anonymous backend when the block
    /// size is a multiple of 2 MiB. Default: true.
    pub thp: bool,
}

impl Default for RegionOptions {
    fn default() -> Self {
        RegionOptions { thp: true }
    }
}

/// What [`reserve`] mapped.
pub(super) struct Reserved {
    /// Host address of the reservation.
    pub(super) host: usize,
    /// The fd backends' file.
    pub(super) fd: Option<File>,
    /// The `file:` backend's file (owns the lock and the removal of a file Tide created).
    pub(super) backing: Option<BackingFile>,
    /// Whether `MADV_HUGEPAGE` was applied.
    pub(super) thp: bool,
    /// Whether the kernel merges the mappings of adjacent blocks back after a split.
    pub(super) mergeable: bool,
}

/// Maps the `len` bytes of the hotplug window `layout` with `backend`, all `PROT_NONE`.
pub(super) fn reserve(
    len: usize,
    layout: &HotplugLayout,
    backend: &Backend,
    options: RegionOptions,
) -> Result<Reserved> {
    let (size, block_size) = (layout.size, layout.block_size);
    let mmap_err = |source| Error::Mmap { size, source };
    let mut thp = false;
    // Memfd and file mappings merge back; hugetlb ones never do.
    let mut mergeable = *backend != Backend::Hugetlb;
    let mut backing = None;
    let (host, fd) = match &backend {
        Backend::Anon => {
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
            let align = HUGE_PAGE_SIZE as usize;
            let over = len
                .checked_add(align)
                .ok_or_else(|| mmap_err(io::Error::from_raw_os_error(libc::ENOMEM)))?;
            let raw = map_none(over, flags, -1).map_err(mmap_err)?;
            let start = raw.next_multiple_of(align);
            unmap(raw, start - raw);
            unmap(start + len, raw + over - (start + len));
            // Before MADV_HUGEPAGE, so that priming faults in a small page only.
            mergeable = prime_anon_vma(start, len);
            if options.thp && aligned(block_size, HUGE_PAGE_SIZE) {
                // SAFETY: [start, start + len) is our own fresh mapping; madvise only
                // changes its paging policy.
                let r =
                    unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
                if r == 0 {
                    thp = true;
                } else {
                    warn!(
                        "MADV_HUGEPAGE on the hotplug reservation failed: {}",
                        last_err()
                    );
                }
            }
            (start, None)
        }
        Backend::Memfd | Backend::Hugetlb => {
            let file = create_memfd(size, *backend == Backend::Hugetlb)
                .map_err(|source| Error::Memfd { size, source })?;
            probe_hole_punch(&file, block_size, backend)?;
            let flags = libc::MAP_SHARED | libc::MAP_NORESERVE;
            let host = map_none(len, flags, file.as_raw_fd()).map_err(mmap_err)?;
            (host, Some(file))
        }
        Backend::File(path) => {
            // On any error below, dropping `bf` removes a file it created.
            let bf = BackingFile::open(path, size)?;
            probe_hole_punch(&bf.file, block_size, backend)?;
            let flags = libc::MAP_SHARED | libc::MAP_NORESERVE;
            let host = map_none(len, flags, bf.file.as_raw_fd()).map_err(mmap_err)?;
            let file = bf.file.try_clone().map_err(mmap_err);
            match file {
                Ok(f) => {
                    backing = Some(bf);
                    (host, Some(f))
                }
                Err(e) => {
                    unmap(host, len);
                    return Err(e);
                }
            }
        }
    };
    Ok(Reserved {
        host,
        fd,
        backing,
        thp,
        mergeable,
    })
}

/// Punches a hole over the first block of the fresh (empty) `file`: a file system that cannot
/// (ramfs) could never give unplugged memory back, so the backend is refused.
fn probe_hole_punch(file: &File, block_size: u64, backend: &Backend) -> Result<()> {
    use rustix::fs::FallocateFlags;
    let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    rustix::fs::fallocate(file, flags, 0, block_size).map_err(|errno| Error::NoHolePunch {
        backend: backend.to_string(),
        source: errno.into(),
    })
}

impl HotplugRegion {
    pub(super) fn host_ptr(&self, a: usize) -> *mut libc::c_void {
        (self.host + a * self.layout.block_size as usize) as *mut libc::c_void
    }

    pub(super) fn protect(&self, a: usize, b: usize, prot: libc::c_int) -> io::Result<()> {
        #[cfg(test)]
        if super::fail::take(super::fail::PROTECT) {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        // SAFETY: blocks [a, b) lie inside our reservation (checked by callers); changing their
        // protection cannot affect memory outside it. Accesses to PROT_NONE blocks fault, which
        // callers avoid by checking the plug state.
        if unsafe { libc::mprotect(self.host_ptr(a), self.byte_len(a, b), prot) } != 0 {
            return Err(last_err());
        }
        Ok(())
    }

    pub(super) fn advise(&self, a: usize, b: usize, advice: libc::c_int) -> io::Result<()> {
        advise_raw(self.host_ptr(a) as usize, self.byte_len(a, b), advice)
    }

    /// `MADV_POPULATE_WRITE` over blocks `[a, b)`, on [`crate::populate_threads`] threads.
    pub(super) fn populate_blocks(&self, a: usize, b: usize) -> io::Result<()> {
        populate_parallel(
            self.host_ptr(a) as usize,
            self.byte_len(a, b),
            self.huge_pages(),
            Priority::Foreground,
        )
    }

    /// Whether the region's memory comes in 2 MiB pages (THP or hugetlb).
    pub(super) fn huge_pages(&self) -> bool {
        self.thp || self.backend == Backend::Hugetlb
    }

    /// Gives the host memory of blocks `[a, b)` back.
    pub(super) fn release(&self, a: usize, b: usize) -> io::Result<()> {
        #[cfg(test)]
        if super::fail::take(super::fail::RELEASE) {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        match &self.fd {
            None => self.advise(a, b, libc::MADV_DONTNEED),
            Some(file) => {
                use rustix::fs::FallocateFlags;
                let off = a as u64 * self.layout.block_size;
                let len = self.byte_len(a, b) as u64;
                // Punching a hole also unmaps the freed pages from every shared mapping of the
                // file.
                let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                Ok(rustix::fs::fallocate(file, flags, off, len)?)
            }
        }
    }

    /// Re-protects and discards blocks `[a, b)` after a failed populate, in that order (the
    /// guest can no longer write what is being freed; see [`HotplugRegion::discard`]).
    pub(super) fn roll_back(&self, a: usize, b: usize, access: UnpluggedAccess) {
        let addr = self.guest_addr(a);
        let len = self.byte_len(a, b);
        if let Err(e) = self.protect(a, b, access.prot()) {
            error!("roll back of [{addr:#x}, +{len:#x}): re-protect failed: {e}");
        }
        if let Err(e) = self.release(a, b) {
            error!("roll back of [{addr:#x}, +{len:#x}): discard failed: {e}");
        }
    }

    /// Whether [`HotplugRegion::resident_bytes`] is cheap (one `fstat`: fd backends) or walks
    /// the region's page tables through `/proc/self/smaps` (anon: keep it off event loops).
    pub fn resident_bytes_is_cheap(&self) -> bool {
        self.fd.is_some()
    }

    /// Resident host memory of the reservation, without what is populated ahead
    /// ([`Self::ahead_bytes`], reported apart). For fd backends (memfd, hugetlb, file) the
    /// storage allocated to the file (`fstat` blocks) less the part allocated ahead (done, or
    /// under way: counted whole until it is done), which costs one syscall. For anon the `Rss` of the `/proc/self/smaps` entries that overlap it (memory
    /// populated ahead waits in a separate staging mapping), which walks the region's page
    /// tables under the mmap lock: tens of milliseconds with gigabytes plugged in 4 KiB pages.
    pub fn resident_bytes(&self) -> Result<u64> {
        if let Some(f) = &self.fd {
            // What is allocated ahead, done or under way, read before and after the file's
            // size (the larger of the two: a populate ahead may start or be given back in
            // between), is never counted.
            let ahead = || {
                self.ahead_bytes()
                    + self
                        .ahead_inflight
                        .load(std::sync::atomic::Ordering::Acquire)
            };
            let before = ahead();
            let allocated = BackingFile::allocated_bytes(f).map_err(Error::Smaps)?;
            return Ok(allocated.saturating_sub(before.max(ahead())));
        }
        let start = self.host as u64;
        crate::smaps::resident_bytes(start, start + self.layout.size).map_err(Error::Smaps)
    }

    /// Whether a read of an unplugged block would allocate host memory were unplugged blocks
    /// [`UnpluggedAccess::Readable`]: true for the shared backends (memfd, hugetlb, file), where
    /// a read fault of a hole allocates a page-cache (or huge) page; false for private anonymous
    /// memory, which maps the shared zero page.
    pub fn unplugged_reads_allocate(&self) -> bool {
        self.fd.is_some()
    }

    /// A vm-memory region over the whole reservation at [`HotplugRegion::base`], not owning the
    /// mapping.
    ///
    /// Accessing unplugged blocks through it faults when they are
    /// [`UnpluggedAccess::Inaccessible`]; check [`HotplugRegion::state`] first.
    ///
    /// # Safety
    ///
    /// The returned region (and any `GuestMemoryMmap` holding it) must not be used after `self`
    /// is dropped: dropping the `HotplugRegion` unmaps the memory it points to, and the type
    /// system does not tie the two lifetimes.
    pub unsafe fn guest_region(&self) -> Result<GuestRegionMmap> {
        let err = |reason: String| Error::GuestRegion {
            host: self.host as u64,
            size: self.layout.size,
            reason,
        };
        let flags = match self.fd {
            None => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            Some(_) => libc::MAP_SHARED | libc::MAP_NORESERVE,
        };
        // SAFETY: [host, host + size) is our live mapping; the documented contract is that the
        // region does not outlive `self`, which keeps it mapped.
        let builder = unsafe {
            MmapRegionBuilder::new(self.layout.size as usize)
                .with_raw_mmap_pointer(self.host as *mut u8)
        };
        let mapping = builder
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(self.backend == Backend::Hugetlb)
            .build()
            .map_err(|e| err(e.to_string()))?;
        GuestRegionMmap::new(mapping, GuestAddress(self.layout.base.0))
            .ok_or_else(|| err("guest address range overflows".to_string()))
    }
}

impl Drop for HotplugRegion {
    fn drop(&mut self) {
        let bs = self.layout.block_size as usize;
        for s in std::mem::take(&mut self.lock().staged) {
            unmap(s.host, (s.b - s.a) * bs);
        }
        unmap(self.host, self.layout.size as usize);
        // Then `backing` (a field) removes a file Tide created, and `fd` closes.
    }
}
