//! Populating memory with `madvise`, one thread per CPU.

use std::io;

use crate::sys::{last_err, HUGE_PAGE_SIZE};

/// Most threads one populate uses.
pub const POPULATE_THREADS_MAX: usize = 16;
/// Each populate thread gets at least this much of a range. Why (measured here, 2 cores): two
/// threads populate 128 MiB in about half the time of one for 4 KiB pages and THP alike, and a
/// thread start and join costs ~30-60 us, under 5% of populating 16 MiB of THP (~0.8 ms).
pub const POPULATE_CHUNK_MIN: u64 = 16 << 20;

/// The CPUs this process may run on, read once (`available_parallelism` reads cgroup files).
fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// How many threads populate `bytes`: one per CPU, each with at least [`POPULATE_CHUNK_MIN`].
pub fn populate_threads(bytes: u64) -> usize {
    cpus()
        .min(POPULATE_THREADS_MAX)
        .min((bytes / POPULATE_CHUNK_MIN).max(1) as usize)
}

/// `madvise(addr, len, advice)`, retried on EINTR and EAGAIN.
pub(crate) fn advise_raw(addr: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: callers pass ranges of mappings this crate owns; the advice either faults
        // pages in or drops them, both only within that range.
        if unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) } == 0 {
            return Ok(());
        }
        let e = last_err();
        if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) {
            return Err(e);
        }
    }
}

/// `MADV_POPULATE_WRITE` over `[addr, addr + len)`, split into [`populate_threads`] pieces
/// (2 MiB aligned) populated at once: the kernel zeroes pages on the faulting CPU, so this
/// scales with cores. The first error wins; the caller rolls the whole range back.
pub(crate) fn populate_parallel(addr: usize, len: usize) -> io::Result<()> {
    let threads = populate_threads(len as u64);
    if threads <= 1 {
        return advise_raw(addr, len, libc::MADV_POPULATE_WRITE);
    }
    let per = len
        .div_ceil(threads)
        .next_multiple_of(HUGE_PAGE_SIZE as usize);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (addr..addr + len)
            .step_by(per)
            .skip(1)
            .map(|s| {
                let e = (s + per).min(addr + len);
                scope.spawn(move || advise_raw(s, e - s, libc::MADV_POPULATE_WRITE))
            })
            .collect();
        // The first piece on this thread.
        let mut result = advise_raw(addr, per.min(len), libc::MADV_POPULATE_WRITE);
        for w in workers {
            let r = w
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("populate thread panicked")));
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}
