//! Populating memory with `madvise`, on a pool of threads pinned one to each CPU.
//!
//! A pinned pool rather than threads started per call: threads started for a call were often
//! kept on one CPU by the scheduler, pinned long-lived ones were the fastest and steadiest, and a
//! hand-off costs tens of microseconds instead of a thread start (the measurements behind this
//! file's constants are in docs/benchmarks.md, "Figures behind the constants").

use std::io;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, OnceLock};

use log::debug;

use crate::background::SharedWork;
use crate::sys::{last_err, HUGE_PAGE_SIZE, PAGE_SIZE};

/// Most threads one populate uses.
pub const POPULATE_THREADS_MAX: usize = 16;

/// The smallest piece worth its own thread when the memory has 4 KiB pages: several times the
/// cost of a hand-off to a pool thread.
pub const PIECE_MIN_SMALL_PAGES: u64 = 1 << 20;

/// The smallest piece worth its own thread when the memory has 2 MiB pages (THP, hugetlb):
/// below it one thread is as fast as two.
pub const PIECE_MIN_HUGE_PAGES: u64 = 16 << 20;

/// Who waits for a populate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A guest's request waits for it: the pool at the process's own priority, each thread
    /// one piece.
    Foreground,
    /// Populate ahead, which nobody waits for yet: a pool of threads at nice
    /// [`BACKGROUND_NICE`] (so that a PLUG being answered, the guest's vCPUs and the API win
    /// the CPU from it), in pieces of about a millisecond ([`BACKGROUND_PIECE_SMALL_PAGES`],
    /// [`BACKGROUND_PIECE_HUGE_PAGES`]) that its threads claim in order and do not start while
    /// a foreground populate or discard is under way: `MADV_POPULATE_WRITE` holds the mmap
    /// lock for reading through each call, and a PLUG's `mprotect` or `mremap` waits for it.
    /// A PLUG that needs the memory of a background job stops it at a piece boundary and
    /// does the rest itself.
    Background,
}

/// The nice value of the background populate threads.
pub const BACKGROUND_NICE: i32 = 10;
/// Largest background piece of 4 KiB pages (about 0.3-0.4 ms of one core here): a PLUG that
/// stops a populate ahead waits for the pieces in flight, which run at nice
/// [`BACKGROUND_NICE`].
pub const BACKGROUND_PIECE_SMALL_PAGES: u64 = 1 << 20;
/// Largest background piece of 2 MiB pages (about 0.2 ms of one core here).
pub const BACKGROUND_PIECE_HUGE_PAGES: u64 = 4 << 20;

/// The CPUs this process may run on, read once.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is a plain bitmask the call fills; its size is passed.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the calling thread's own affinity, written into `set`.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if r != 0 {
        return (0..n).collect();
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE, the bitmask's size.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect();
    // A cgroup CPU quota below the mask counts too (available_parallelism reads it).
    cpus.into_iter().take(n).collect()
}

/// How many threads populate `bytes`: one per CPU (at most [`POPULATE_THREADS_MAX`]), each
/// with at least [`PIECE_MIN_HUGE_PAGES`] or [`PIECE_MIN_SMALL_PAGES`] of it.
pub fn populate_threads(bytes: u64, huge_pages: bool) -> usize {
    let piece_min = if huge_pages {
        PIECE_MIN_HUGE_PAGES
    } else {
        PIECE_MIN_SMALL_PAGES
    };
    pool(Priority::Foreground)
        .map_or(1, |p| p.workers.len())
        .min((bytes / piece_min).max(1) as usize)
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

/// What a pool thread is handed.
pub(crate) enum Job {
    /// One piece of a populate, and where its result goes.
    Populate {
        addr: usize,
        len: usize,
        done: Sender<io::Result<()>>,
    },
    /// A share of a background job: claim its pieces until none is left.
    Shared(Arc<SharedWork>),
}

/// The populate threads: worker `i` is pinned to the `i`-th CPU this process may use. They
/// live as long as the process and sleep on their queue between populates.
struct Pool {
    workers: Vec<Sender<Job>>,
}

/// The pool of `priority`, started on first use ([`start_pools`] does that when a region is
/// created); `None` when not even one thread could be started (the caller then populates
/// alone).
fn pool(priority: Priority) -> Option<&'static Pool> {
    static FOREGROUND: OnceLock<Option<Pool>> = OnceLock::new();
    static BACKGROUND: OnceLock<Option<Pool>> = OnceLock::new();
    let cell = match priority {
        Priority::Foreground => &FOREGROUND,
        Priority::Background => &BACKGROUND,
    };
    cell.get_or_init(|| start_pool(priority)).as_ref()
}

/// The threads of the background pool (none when it could not start one).
pub(crate) fn background_workers() -> &'static [Sender<Job>] {
    pool(Priority::Background).map_or(&[], |p| &p.workers)
}

/// Starts both pools now (called when a region is created, so that the threads exist before
/// the VM runs rather than appearing at its first plug).
pub(crate) fn start_pools() {
    let _ = pool(Priority::Foreground);
    let _ = pool(Priority::Background);
}

/// Starts one thread per allowed CPU (at most [`POPULATE_THREADS_MAX`]), pinned to it.
fn start_pool(priority: Priority) -> Option<Pool> {
    let mut workers = Vec::new();
    for (i, cpu) in allowed_cpus()
        .into_iter()
        .take(POPULATE_THREADS_MAX)
        .enumerate()
    {
        let (tx, rx) = mpsc::channel::<Job>();
        let started = std::thread::Builder::new()
            .name(match priority {
                Priority::Foreground => format!("populate-{i}"),
                Priority::Background => format!("populate-bg-{i}"),
            })
            .spawn(move || {
                pin_to(cpu);
                if priority == Priority::Background {
                    lower_thread_priority();
                    crate::background::register_background_thread();
                }
                for job in rx {
                    match job {
                        Job::Populate { addr, len, done } => {
                            let _ = done.send(advise_raw(addr, len, libc::MADV_POPULATE_WRITE));
                        }
                        Job::Shared(work) => work.work(),
                    }
                }
            });
        match started {
            Ok(_) => workers.push(tx),
            Err(e) => {
                debug!("cannot start populate thread {i}: {e}");
                break;
            }
        }
    }
    (!workers.is_empty()).then_some(Pool { workers })
}

/// Sets the calling thread's nice value to [`BACKGROUND_NICE`] (background memory work: the
/// populate-ahead pool, the VMM's resident-memory reading); a failure only costs priority, so
/// it is logged.
pub fn lower_thread_priority() {
    // SAFETY: plain syscalls on the calling thread's own id (PRIO_PROCESS with a thread id
    // sets that thread's nice value on Linux).
    let r = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, BACKGROUND_NICE)
    };
    if r != 0 {
        debug!("cannot lower a thread's priority: {}", last_err());
    }
}

/// Pins the calling thread to `cpu`; a failure only costs placement, so it is logged.
fn pin_to(cpu: usize) {
    // SAFETY: `set` is a plain bitmask; CPU_SET writes bit `cpu`, below CPU_SETSIZE (it came
    // from CPU_ISSET over that range).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sets the calling thread's own affinity from a valid mask of the given size.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        debug!("cannot pin a populate thread to CPU {cpu}: {}", last_err());
    }
}

/// `MADV_POPULATE_WRITE` over `[addr, addr + len)`, split into [`populate_threads`] pieces
/// (2 MiB aligned for huge pages; background pieces at most about a millisecond each) that the
/// pool of `priority` populates at once while the caller waits: the kernel zeroes pages on the
/// faulting CPU, so this scales with cores. `huge_pages`: the range is backed by 2 MiB pages
/// (THP or hugetlb). The first error wins; the caller rolls the whole range back.
pub(crate) fn populate_parallel(
    addr: usize,
    len: usize,
    huge_pages: bool,
    priority: Priority,
) -> io::Result<()> {
    let threads = populate_threads(len as u64, huge_pages);
    // Pieces never split a huge page between threads.
    let align = if huge_pages {
        HUGE_PAGE_SIZE
    } else {
        PAGE_SIZE
    } as usize;
    let mut per = len.div_ceil(threads).next_multiple_of(align);
    if priority == Priority::Background {
        let max = if huge_pages {
            BACKGROUND_PIECE_HUGE_PAGES
        } else {
            BACKGROUND_PIECE_SMALL_PAGES
        };
        per = per.min(max as usize);
    }
    // A foreground populate of one piece runs on the caller; a background one always on the
    // low-priority pool.
    let pool = pool(priority).filter(|_| priority == Priority::Background || len > per);
    let Some(pool) = pool else {
        return advise_raw(addr, len, libc::MADV_POPULATE_WRITE);
    };
    let (done, results) = mpsc::channel();
    let mut sent = 0;
    let mut result = Ok(());
    // Piece k goes to worker k mod n; each worker runs its pieces in order.
    for (worker, start) in pool
        .workers
        .iter()
        .cycle()
        .zip((addr..addr + len).step_by(per))
    {
        let piece = per.min(addr + len - start);
        let job = Job::Populate {
            addr: start,
            len: piece,
            done: done.clone(),
        };
        match worker.send(job) {
            Ok(()) => sent += 1,
            // The worker is gone (it cannot panic, but stay correct): do its piece here.
            Err(_) => {
                if let Err(e) = advise_raw(start, piece, libc::MADV_POPULATE_WRITE) {
                    result = result.and(Err(e));
                }
            }
        }
    }
    drop(done);
    for _ in 0..sent {
        let r = results
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("a populate thread stopped")));
        result = result.and(r);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_never_smaller_than_the_minimum() {
        assert_eq!(populate_threads(PIECE_MIN_SMALL_PAGES, false), 1);
        assert_eq!(populate_threads(PIECE_MIN_HUGE_PAGES, true), 1);
        assert_eq!(populate_threads(PIECE_MIN_HUGE_PAGES * 2 - 1, true), 1);
        let n = pool(Priority::Foreground).map_or(1, |p| p.workers.len());
        assert_eq!(populate_threads(128 << 20, false), n.min(128));
        assert_eq!(populate_threads(128 << 20, true), n.min(8));
        assert!(n <= POPULATE_THREADS_MAX);
    }

    #[test]
    fn a_populate_on_the_pool_fills_every_page_and_reports_errors() {
        let len = 8 << 20;
        let addr = crate::sys::map_none(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1).unwrap();
        // SAFETY: our own fresh mapping.
        let r = unsafe { libc::mprotect(addr as _, len, libc::PROT_READ | libc::PROT_WRITE) };
        assert_eq!(r, 0);
        advise_raw(addr, len, libc::MADV_NOHUGEPAGE).unwrap();
        populate_parallel(addr, len, false, Priority::Foreground).unwrap();
        let mut vec = vec![0u8; len / 4096];
        // SAFETY: `vec` has one byte per page of the mapping.
        let r = unsafe { libc::mincore(addr as _, len, vec.as_mut_ptr()) };
        assert_eq!(r, 0);
        assert!(vec.iter().all(|&v| v & 1 == 1), "every page resident");
        // PROT_NONE: MADV_POPULATE_WRITE fails, and the error comes back from the pool.
        // SAFETY: our own mapping.
        let r = unsafe { libc::mprotect(addr as _, len, libc::PROT_NONE) };
        assert_eq!(r, 0);
        assert!(populate_parallel(addr, len, false, Priority::Foreground).is_err());
        assert!(populate_parallel(addr, len, false, Priority::Background).is_err());
        // SAFETY: our own mapping.
        let r = unsafe { libc::mprotect(addr as _, len, libc::PROT_READ | libc::PROT_WRITE) };
        assert_eq!(r, 0);
        advise_raw(addr, len, libc::MADV_DONTNEED).unwrap();
        // Background: 1 MiB pieces on the low-priority pool.
        populate_parallel(addr, len, false, Priority::Background).unwrap();
        // SAFETY: `vec` has one byte per page of the mapping.
        let r = unsafe { libc::mincore(addr as _, len, vec.as_mut_ptr()) };
        assert_eq!(r, 0);
        assert!(vec.iter().all(|&v| v & 1 == 1), "every page resident");
        crate::sys::unmap(addr, len);
    }
}
