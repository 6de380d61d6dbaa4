//! Host system calls and `/proc` files the region uses: mappings, memfds, tunables.

use std::fs::File;
use std::io;

use log::{debug, error};

pub(crate) const PAGE_SIZE: u64 = 4096;
pub(crate) const HUGE_PAGE_SIZE: u64 = 2 * crate::size::MIB;
pub(crate) const FREE_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
pub(crate) const MAX_MAP_COUNT: &str = "/proc/sys/vm/max_map_count";
pub(crate) const OVERCOMMIT_MEMORY: &str = "/proc/sys/vm/overcommit_memory";

pub(crate) fn last_err() -> io::Error {
    io::Error::last_os_error()
}

pub(crate) fn read_u64_file(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `mmap(NULL, len, PROT_NONE, flags, fd, 0)`.
pub(crate) fn map_none(len: usize, flags: libc::c_int, fd: libc::c_int) -> io::Result<usize> {
    // SAFETY: a fresh mapping at a kernel-chosen address (no MAP_FIXED) cannot alias any
    // existing memory; the result is checked.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, flags, fd, 0) };
    if p == libc::MAP_FAILED {
        Err(last_err())
    } else {
        Ok(p as usize)
    }
}

/// `munmap(addr, len)` of a range this crate mapped and nothing else refers to.
pub(crate) fn unmap(addr: usize, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: callers only pass ranges of mappings this crate created and owns.
    if unsafe { libc::munmap(addr as *mut libc::c_void, len) } != 0 {
        error!("munmap({addr:#x}, {len:#x}) failed: {}", last_err());
    }
}

pub(crate) fn create_memfd(size: u64, hugetlb: bool) -> io::Result<File> {
    use rustix::fs::MemfdFlags;
    let mut flags = MemfdFlags::CLOEXEC;
    if hugetlb {
        flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
    }
    let file = File::from(rustix::fs::memfd_create(c"tide-hotplug", flags)?);
    file.set_len(size)?;
    Ok(file)
}

/// Gives the whole anonymous reservation one anon_vma while it is still a single mapping, so
/// that the pieces later split off by `mprotect` can merge back. Without it every block that is
/// written first gets its own anon_vma and neighbouring pieces never merge again. Returns
/// whether it worked. Skipped with `vm.overcommit_memory=2`, where making the whole mapping
/// writable would charge its full size.
pub(crate) fn prime_anon_vma(host: usize, len: usize) -> bool {
    if read_u64_file(OVERCOMMIT_MEMORY) == Some(2) {
        return false;
    }
    let p = host as *mut libc::c_void;
    let page = PAGE_SIZE as usize;
    // SAFETY: [host, host + len) is our own fresh, unshared reservation; we make it writable,
    // fault in and drop its first page, and make it inaccessible again. No Rust reference
    // points into it.
    let ok = unsafe {
        libc::mprotect(p, len, libc::PROT_READ | libc::PROT_WRITE) == 0
            && libc::madvise(p, page, libc::MADV_POPULATE_WRITE) == 0
            && libc::madvise(p, len.min(HUGE_PAGE_SIZE as usize), libc::MADV_DONTNEED) == 0
    };
    if !ok {
        debug!(
            "priming the anon_vma of the hotplug reservation failed: {}",
            last_err()
        );
    }
    // SAFETY: as above; back to PROT_NONE, which cannot fail for lack of memory on a whole VMA.
    if unsafe { libc::mprotect(p, len, libc::PROT_NONE) } != 0 {
        error!("cannot re-protect the hotplug reservation: {}", last_err());
        return false;
    }
    ok
}
