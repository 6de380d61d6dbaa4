//! Work done before anyone needs it (populate ahead), made to yield to the work someone waits
//! for (a PLUG):
//!
//! * [`Foreground`]: held by every populate and discard a guest's request waits for. While one
//!   is held, background pieces do not start: they take no CPU from it and no `mmap` lock that
//!   its `mprotect` or `mremap` would queue behind.
//! * [`SharedWork`]: one background job cut into pieces of about a millisecond that the
//!   background pool's threads claim in order. Whoever needs the job's memory now stops it at
//!   the next piece boundary ([`SharedWork::stop`]), waits only for the pieces in flight, and
//!   does the rest itself at its own priority: a PLUG never waits for low-priority work it
//!   could do faster itself. While it waits for the pieces in flight, the background pool runs
//!   at the waiter's priority where the process may raise it (`CAP_SYS_NICE`, `RLIMIT_NICE`);
//!   elsewhere the pieces' small size bounds that wait.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex};

use crate::populate::{advise_raw, background_workers, Job, BACKGROUND_NICE};
use crate::sync::lock;
use crate::sys::last_err;

/// How many foreground populates and discards are under way.
static FOREGROUND: Mutex<usize> = Mutex::new(0);
/// Signalled when the last of them ends.
static FOREGROUND_IDLE: Condvar = Condvar::new();

/// A foreground populate or discard under way (background pieces wait while one exists).
#[must_use]
pub(crate) struct Foreground(());

impl Foreground {
    pub(crate) fn enter() -> Self {
        *lock(&FOREGROUND) += 1;
        Foreground(())
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        let mut n = lock(&FOREGROUND);
        *n -= 1;
        if *n == 0 {
            FOREGROUND_IDLE.notify_all();
        }
    }
}

/// Waits until no foreground populate or discard is under way.
fn wait_foreground_idle() {
    let mut n = lock(&FOREGROUND);
    while *n > 0 {
        n = FOREGROUND_IDLE.wait(n).unwrap_or_else(|e| e.into_inner());
    }
}

/// The thread ids of the background pool.
static BACKGROUND_TIDS: Mutex<Vec<libc::id_t>> = Mutex::new(Vec::new());
/// How many waiters raise the background pool's priority now.
static BOOSTS: Mutex<usize> = Mutex::new(0);

fn gettid() -> libc::id_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::id_t }
}

/// Records the calling thread as one of the background pool's.
pub(crate) fn register_background_thread() {
    lock(&BACKGROUND_TIDS).push(gettid());
}

fn set_background_nice(nice: i32) {
    for &tid in lock(&BACKGROUND_TIDS).iter() {
        // SAFETY: plain syscall on a thread id of this process's own pool (those threads live
        // as long as the process).
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
        if r != 0 {
            // Raising a nice value back needs CAP_SYS_NICE or RLIMIT_NICE: without them the
            // wait is bounded by the pieces' size only.
            log::trace!(
                "cannot set a background populate thread's nice value: {}",
                last_err()
            );
            return;
        }
    }
}

/// While alive, the background pool runs at the creating thread's priority (where allowed).
struct Boost;

impl Boost {
    fn new() -> Boost {
        let mut n = lock(&BOOSTS);
        if *n == 0 {
            // SAFETY: plain syscall on the calling thread's own id. -1 is both a nice value
            // and the error return; an error cannot happen for our own thread id.
            let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, gettid()) };
            set_background_nice(own.clamp(-20, BACKGROUND_NICE));
        }
        *n += 1;
        Boost
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        let mut n = lock(&BOOSTS);
        *n -= 1;
        if *n == 0 {
            set_background_nice(BACKGROUND_NICE);
        }
    }
}

/// What one piece of a [`SharedWork`] does.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PieceOp {
    /// `MADV_POPULATE_WRITE` from `addr` (a mapping owned by the job's owner).
    Populate { addr: usize },
    /// `fallocate` of the file `fd` from `offset` (the descriptor outlives the job).
    Allocate { fd: RawFd, offset: u64 },
}

#[derive(Debug, Default)]
struct Progress {
    /// The next piece to claim.
    next: usize,
    /// No piece from here on is claimed (lowered by [`SharedWork::stop`]).
    end: usize,
    /// Pieces that have ended, well or not.
    finished: usize,
    /// The first error of a piece.
    error: Option<io::Error>,
}

/// One background job cut into pieces claimed in order (see the module's documentation).
#[derive(Debug)]
pub(crate) struct SharedWork {
    op: PieceOp,
    len: usize,
    piece: usize,
    progress: Mutex<Progress>,
    changed: Condvar,
}

fn copy_err(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

impl SharedWork {
    /// `len` bytes of `op` in pieces of `piece` bytes (the last one may be shorter).
    pub(crate) fn new(op: PieceOp, len: usize, piece: usize) -> Arc<Self> {
        let piece = piece.max(1);
        Arc::new(SharedWork {
            op,
            len,
            piece,
            progress: Mutex::new(Progress {
                end: len.div_ceil(piece),
                ..Progress::default()
            }),
            changed: Condvar::new(),
        })
    }

    fn claim(&self) -> Option<usize> {
        let mut p = lock(&self.progress);
        (p.next < p.end).then(|| {
            p.next += 1;
            p.next - 1
        })
    }

    fn run_piece(&self, i: usize) -> io::Result<()> {
        let start = i * self.piece;
        let len = self.piece.min(self.len - start);
        match self.op {
            PieceOp::Populate { addr } => advise_raw(addr + start, len, libc::MADV_POPULATE_WRITE),
            PieceOp::Allocate { fd, offset } => {
                // SAFETY: plain syscall on a descriptor the job's owner keeps open until the
                // job has ended; allocates file pages without mapping them.
                let r = unsafe {
                    libc::fallocate(
                        fd,
                        0,
                        (offset + start as u64) as libc::off_t,
                        len as libc::off_t,
                    )
                };
                if r == 0 {
                    Ok(())
                } else {
                    Err(last_err())
                }
            }
        }
    }

    /// A background thread's part: claims and runs pieces, each after any foreground work has
    /// ended, until none is left (or the job was stopped, or a piece failed).
    pub(crate) fn work(&self) {
        loop {
            wait_foreground_idle();
            let Some(i) = self.claim() else { break };
            let r = self.run_piece(i);
            let mut p = lock(&self.progress);
            p.finished += 1;
            if let Err(e) = r {
                // No further piece is worth starting.
                p.end = p.next;
                p.error.get_or_insert(e);
            }
            self.changed.notify_all();
        }
    }

    /// Runs the job on the background pool (on the caller if the pool has no thread) and
    /// returns when every piece has ended, or when the job was stopped and its pieces in
    /// flight have ended. The first error of a piece, if any.
    pub(crate) fn run(self: &Arc<Self>) -> io::Result<()> {
        let mut sent = 0;
        for worker in background_workers() {
            if worker.send(Job::Shared(self.clone())).is_ok() {
                sent += 1;
            }
        }
        if sent == 0 {
            self.work();
        }
        let mut p = lock(&self.progress);
        while p.next < p.end || p.finished < p.next {
            p = self.changed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        p.error.as_ref().map_or(Ok(()), |e| Err(copy_err(e)))
    }

    /// Stops the job: no piece starts any more; waits for the pieces in flight. Returns the
    /// bytes done from the start of the job, or `None` if a piece failed.
    pub(crate) fn stop(&self) -> Option<usize> {
        let mut p = lock(&self.progress);
        p.end = p.next;
        self.changed.notify_all();
        // The pieces in flight run at nice BACKGROUND_NICE: raise them while we wait.
        let _boost = (p.finished < p.next).then(Boost::new);
        while p.finished < p.next {
            p = self.changed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        p.error
            .is_none()
            .then(|| (p.next * self.piece).min(self.len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(len: usize) -> usize {
        let addr = crate::sys::map_none(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1).unwrap();
        // SAFETY: our own fresh mapping.
        let r = unsafe { libc::mprotect(addr as _, len, libc::PROT_READ | libc::PROT_WRITE) };
        assert_eq!(r, 0);
        advise_raw(addr, len, libc::MADV_NOHUGEPAGE).unwrap();
        addr
    }

    fn resident_pages(addr: usize, len: usize) -> usize {
        let mut vec = vec![0u8; len / 4096];
        // SAFETY: `vec` has one byte per page of the mapping.
        let r = unsafe { libc::mincore(addr as _, len, vec.as_mut_ptr()) };
        assert_eq!(r, 0);
        vec.iter().filter(|&&v| v & 1 == 1).count()
    }

    #[test]
    fn a_shared_job_runs_every_piece_and_a_stopped_one_reports_its_done_prefix() {
        let len = 8 << 20;
        let addr = mapping(len);
        let work = SharedWork::new(PieceOp::Populate { addr }, len, 1 << 20);
        work.run().unwrap();
        assert_eq!(resident_pages(addr, len), len / 4096);
        assert_eq!(work.stop(), Some(len));
        crate::sys::unmap(addr, len);

        // Stopped while a foreground populate is under way: no piece starts, nothing is done.
        let addr = mapping(len);
        let work = SharedWork::new(PieceOp::Populate { addr }, len, 1 << 20);
        let fg = Foreground::enter();
        let runner = {
            let work = work.clone();
            std::thread::spawn(move || work.run())
        };
        assert_eq!(work.stop(), Some(0));
        runner.join().unwrap().unwrap();
        drop(fg);
        assert_eq!(resident_pages(addr, len), 0);
        crate::sys::unmap(addr, len);
    }

    #[test]
    fn a_failed_piece_fails_the_job() {
        let len = 4 << 20;
        let addr = crate::sys::map_none(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1).unwrap();
        // PROT_NONE: MADV_POPULATE_WRITE fails.
        let work = SharedWork::new(PieceOp::Populate { addr }, len, 1 << 20);
        assert!(work.run().is_err());
        assert_eq!(work.stop(), None);
        crate::sys::unmap(addr, len);
    }
}
