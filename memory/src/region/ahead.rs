//! Populate ahead: backing, outside the guest's view, the blocks the guest will plug next, and
//! moving that memory into place when the PLUG comes.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use log::{debug, warn};

use super::{ns_since, HotplugRegion, OpTimes, State};
use crate::backend::Backend;
use crate::background::{PieceOp, SharedWork};
use crate::populate::{advise_raw, BACKGROUND_PIECE_HUGE_PAGES, BACKGROUND_PIECE_SMALL_PAGES};
use crate::sys::{last_err, unmap, HUGE_PAGE_SIZE};
use crate::{Error, Result};

/// Why [`HotplugRegion::fill`] failed.
pub(super) enum Fill {
    /// A stop of the VMM came between two slices ([`HotplugRegion::stop_populates`]).
    Stopped,
    /// Making blocks read-write.
    Protect(io::Error),
    /// Backing them.
    Populate(io::Error),
}

/// A populate ahead under way for blocks `[a, b)` (see [`HotplugRegion::populate_ahead_next`]).
pub(super) struct StageJob {
    pub(super) a: usize,
    pub(super) b: usize,
    /// Anonymous regions: the staging mapping.
    host: Option<usize>,
    work: Arc<SharedWork>,
    /// What a PLUG that took the job over kept as populated ahead (bytes).
    kept: AtomicU64,
}

/// Memory populated ahead for blocks `[a, b)` of an anonymous region, in a separate mapping
/// (never the guest's) at `host`, moved into place by the PLUG that takes it.
pub(super) struct Staged {
    pub(super) a: usize,
    pub(super) b: usize,
    pub(super) host: usize,
}

impl HotplugRegion {
    /// Backs blocks `[a, b)` and makes them read-write: moves the staged `pieces` into place
    /// (the moved mapping is read-write already, so those blocks need no `mprotect`; a piece
    /// that cannot be moved is dropped and populated like the rest), then protects and
    /// populates the rest. Adds where the time went to `times`.
    pub(super) fn fill(
        &self,
        st: &mut State,
        a: usize,
        b: usize,
        pieces: &[(usize, usize, usize)],
        times: &mut OpTimes,
    ) -> std::result::Result<(), Fill> {
        let t = Instant::now();
        let mut moved = Vec::with_capacity(pieces.len());
        for &(x, y, host) in pieces {
            let len = self.byte_len(x, y);
            // SAFETY: [host, host + len) is a staging mapping this region owns and nothing
            // else refers to; the destination is blocks [x, y) of our own reservation, whose
            // old (empty) mapping MREMAP_FIXED replaces.
            let r = unsafe {
                libc::mremap(
                    host as *mut libc::c_void,
                    len,
                    len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    self.host_ptr(x),
                )
            };
            if r == libc::MAP_FAILED {
                debug!("moving memory populated ahead failed: {}", last_err());
                unmap(host, len);
            } else {
                moved.push((x, y));
                if let Some((splits, n)) = &mut st.splits {
                    for i in [x, y] {
                        if i > 0 && i < splits.len() - 1 && !splits.get(i) {
                            splits.set(i, true);
                            *n += 1;
                        }
                    }
                }
            }
        }
        times.syscall_ns += ns_since(t);
        moved.sort_unstable();
        let mut i = a;
        for (x, y) in moved.into_iter().chain(std::iter::once((b, b))) {
            if i < x {
                let t = Instant::now();
                let protected = self.protect(i, x, libc::PROT_READ | libc::PROT_WRITE);
                times.protect_ns += ns_since(t);
                protected.map_err(Fill::Protect)?;
                // Blocks of fd backends populated ahead are in the file already: this only
                // maps them.
                // In slices, with a check for a stop before each.
                let slice = (super::POPULATE_SLICE / self.layout.block_size).max(1) as usize;
                let mut j = i;
                while j < x {
                    if self.stop_requested() {
                        return Err(Fill::Stopped);
                    }
                    let k = (j + slice).min(x);
                    let t = Instant::now();
                    let populated = self.populate_blocks(j, k);
                    times.syscall_ns += ns_since(t);
                    populated.map_err(Fill::Populate)?;
                    #[cfg(test)]
                    super::fail::after_slice(self);
                    j = k;
                }
            }
            i = y;
        }
        Ok(())
    }

    /// Removes the staged memory of blocks `[a, b)` from `st.staged` and returns it as
    /// `(first block, end block, host address)` pieces (the rest stays staged).
    pub(super) fn take_staged(
        st: &mut State,
        bs: usize,
        a: usize,
        b: usize,
    ) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        let mut keep = Vec::with_capacity(st.staged.len());
        for s in st.staged.drain(..) {
            let (lo, hi) = (s.a.max(a), s.b.min(b));
            if lo >= hi {
                keep.push(s);
                continue;
            }
            let host_of = |i: usize| s.host + (i - s.a) * bs;
            out.push((lo, hi, host_of(lo)));
            if s.a < lo {
                keep.push(Staged {
                    a: s.a,
                    b: lo,
                    host: s.host,
                });
            }
            if hi < s.b {
                keep.push(Staged {
                    a: hi,
                    b: s.b,
                    host: host_of(hi),
                });
            }
        }
        st.staged = keep;
        out
    }

    /// Bytes populated ahead of the guest's PLUG (not plugged, not visible to the guest).
    pub fn ahead_bytes(&self) -> u64 {
        self.ahead.load(Ordering::Acquire)
    }

    /// Populates ahead the next blocks the guest will plug: Linux's driver plugs the lowest
    /// unplugged blocks of the usable region first, so the candidates are the lowest
    /// `want / block_size` unplugged blocks below `usable_end` (bytes from the base). Takes the
    /// first run of them not populated ahead yet, at most up to the next `chunk`-aligned guest
    /// address, and backs it outside the guest's view: a staging mapping on anonymous regions
    /// (moved into place by the PLUG), `fallocate` on the others. The blocks stay unplugged and
    /// inaccessible. Returns the bytes populated ahead (0: nothing left to do, a PLUG took the
    /// job over before any of it was done, or the last PLUG failed for lack of memory).
    ///
    /// The work runs without the region's lock on the background pool, in pieces that do not
    /// start while a PLUG or an UNPLUG is under way. A PLUG of these blocks (or one short of
    /// memory) meanwhile stops the job at a piece boundary and does the rest itself
    /// ([`Self::stop_staging`]): it never waits for more than the pieces in flight.
    pub fn populate_ahead_next(&self, usable_end: u64, want: u64, chunk: u64) -> Result<u64> {
        if !self.ahead_ok {
            return Ok(0);
        }
        let bs = self.layout.block_size;
        let job = {
            let mut st = self.lock();
            if st.in_progress.is_some() || st.short_of_memory {
                return Ok(0);
            }
            let limit = st.bitmap.len().min((usable_end / bs) as usize);
            let chunk_blocks = (chunk / bs).max(1) as usize;
            let mut need = (want / bs) as usize;
            let mut found = None;
            for (ra, rb) in st.bitmap.runs(false) {
                if ra >= limit || need == 0 {
                    break;
                }
                let rb = rb.min(limit);
                let j = st.ahead.find(ra, rb.min(ra + need), false);
                need -= j - ra;
                if j < rb && need > 0 {
                    let g = (self.layout.base.0 / bs) as usize + j;
                    let boundary = j + (chunk_blocks - g % chunk_blocks);
                    let end = st.ahead.find(j, rb.min(j + need).min(boundary), true);
                    found = Some((j, end));
                    break;
                }
            }
            let Some((s, e)) = found else { return Ok(0) };
            let len = self.byte_len(s, e);
            let short = |source| Error::Populate {
                addr: self.guest_addr(s),
                len: len as u64,
                source,
            };
            if *self.backend() != Backend::Hugetlb {
                if let Some(room) = self.cgroup_room(&mut st, len as u64) {
                    if (len as u64).saturating_add(len as u64 / 256) > room {
                        return Err(short(io::Error::from_raw_os_error(libc::ENOMEM)));
                    }
                }
            }
            let (host, op) = match &self.fd {
                None => {
                    let host = self.map_staging(len).map_err(short)?;
                    (Some(host), PieceOp::Populate { addr: host })
                }
                Some(file) => {
                    // From before the first page is allocated until `ahead` counts them
                    // ([`Self::end_staging`]).
                    self.ahead_inflight.store(len as u64, Ordering::Release);
                    (
                        None,
                        PieceOp::Allocate {
                            fd: file.as_raw_fd(),
                            offset: s as u64 * bs,
                        },
                    )
                }
            };
            let piece = if self.huge_pages() {
                BACKGROUND_PIECE_HUGE_PAGES
            } else {
                BACKGROUND_PIECE_SMALL_PAGES
            } as usize;
            let job = Arc::new(StageJob {
                a: s,
                b: e,
                host,
                work: SharedWork::new(op, len, piece),
                kept: AtomicU64::new(0),
            });
            st.in_progress = Some(job.clone());
            job
        };
        let result = job.work.run();
        #[cfg(test)]
        super::fail::ahead_in_flight(self);
        let mut st = self.lock();
        if !st
            .in_progress
            .as_ref()
            .is_some_and(|j| Arc::ptr_eq(j, &job))
        {
            // A PLUG took it over (and kept what was done as populated ahead).
            return Ok(job.kept.load(Ordering::Acquire));
        }
        st.in_progress = None;
        let done = result.as_ref().ok().map(|()| self.byte_len(job.a, job.b));
        let kept = self.end_staging(&mut st, &job, done);
        result.map(|()| kept).map_err(|source| Error::Populate {
            addr: self.guest_addr(job.a),
            len: self.byte_len(job.a, job.b) as u64,
            source,
        })
    }

    /// Stops the populate ahead under way, if any (a PLUG needs its blocks, or the memory it
    /// holds): no piece of it starts any more, the pieces in flight are waited for, and the
    /// whole blocks done from its start are kept as populated ahead when `keep` (the rest is
    /// given back). Returns the bytes kept.
    pub(super) fn stop_staging(&self, st: &mut State, keep: bool) -> u64 {
        let Some(job) = st.in_progress.take() else {
            return 0;
        };
        let done = job.work.stop().filter(|_| keep);
        let kept = self.end_staging(st, &job, done);
        job.kept.store(kept, Ordering::Release);
        kept
    }

    /// Ends a populate ahead (done or stopped) with `done` bytes done from its start (`None`:
    /// it failed): keeps the whole blocks done as populated ahead and gives back the rest.
    /// Returns the bytes kept.
    fn end_staging(&self, st: &mut State, job: &StageJob, done: Option<usize>) -> u64 {
        let bs = self.layout.block_size as usize;
        let mid = job.a + (done.unwrap_or(0) / bs).min(job.b - job.a);
        if mid < job.b {
            match job.host {
                Some(host) => unmap(host + (mid - job.a) * bs, self.byte_len(mid, job.b)),
                // Never plugged meanwhile: a PLUG of them stops the job first.
                None => {
                    if let Err(e) = self.release(mid, job.b) {
                        warn!("giving back a populate ahead failed: {e}");
                    }
                }
            }
        }
        if mid == job.a {
            self.ahead_inflight.store(0, Ordering::Release);
            return 0;
        }
        st.ahead.set_range(job.a, mid, true);
        if let Some(host) = job.host {
            st.staged.push(Staged {
                a: job.a,
                b: mid,
                host,
            });
        }
        let kept = self.byte_len(job.a, mid) as u64;
        // Counted in `ahead` before it leaves `ahead_inflight`: never resident.
        self.ahead.fetch_add(kept, Ordering::AcqRel);
        self.ahead_inflight.store(0, Ordering::Release);
        kept
    }

    /// Gives back everything populated ahead except for blocks `[a, b)` (a PLUG of them is
    /// short of memory), the populate ahead under way included. Returns the bytes given back
    /// (besides that of the populate under way).
    pub(super) fn give_back_ahead(&self, st: &mut State, a: usize, b: usize) -> u64 {
        self.stop_staging(st, false);
        let mut n = 0;
        for (x, y) in st.ahead.runs(true) {
            for (x, y) in [(x, y.min(a)), (x.max(b), y)] {
                if x < y {
                    n += self.drop_ahead(st, x, y);
                }
            }
        }
        n
    }

    /// A fresh private anonymous mapping of `len` bytes, 2 MiB aligned (huge pages when the
    /// region asks for them), not populated.
    fn map_staging(&self, len: usize) -> io::Result<usize> {
        let align = HUGE_PAGE_SIZE as usize;
        let over = len + align;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: a fresh mapping at a kernel-chosen address; the result is checked.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                over,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(last_err());
        }
        let raw = raw as usize;
        let start = raw.next_multiple_of(align);
        unmap(raw, start - raw);
        unmap(start + len, raw + over - (start + len));
        if self.thp {
            if let Err(e) = advise_raw(start, len, libc::MADV_HUGEPAGE) {
                unmap(start, len);
                return Err(e);
            }
        }
        Ok(start)
    }

    /// Gives back the memory populated ahead beyond the lowest `keep` bytes of it (all of it
    /// for 0). Returns the bytes given back.
    pub fn release_ahead(&self, keep: u64) -> u64 {
        let mut st = self.lock();
        let mut left = (keep / self.layout.block_size) as usize;
        let mut released = 0;
        for (x, y) in st.ahead.runs(true) {
            let k = (y - x).min(left);
            left -= k;
            if x + k < y {
                released += self.drop_ahead(&mut st, x + k, y);
            }
        }
        released
    }

    /// Gives back the memory populated ahead for blocks `[x, y)` (all unplugged).
    pub(super) fn drop_ahead(&self, st: &mut State, x: usize, y: usize) -> u64 {
        let len = st.ahead.count(x, y) as u64 * self.layout.block_size;
        st.ahead.set_range(x, y, false);
        self.ahead.fetch_sub(len, Ordering::AcqRel);
        if self.fd.is_some() {
            // Unplugged blocks are never mapped: the hole frees the file's pages only.
            if let Err(e) = self.release(x, y) {
                warn!("giving back memory populated ahead failed: {e}");
            }
        } else {
            for (a, b, host) in Self::take_staged(st, self.layout.block_size as usize, x, y) {
                unmap(host, self.byte_len(a, b));
            }
        }
        len
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use vm_memory::GuestAddress;

    use super::*;
    use crate::background::Foreground;
    use crate::{HotplugLayout, OpTimes, RegionOptions};

    const MIB: u64 = 1 << 20;
    const BASE: u64 = 4 << 30;

    /// A PLUG of blocks being populated ahead never waits for the low-priority work: with the
    /// background pieces held back, the PLUG stops the job and populates the blocks itself.
    #[test]
    fn a_plug_takes_over_a_populate_ahead_of_its_blocks() {
        for backend in [Backend::Anon, Backend::Memfd] {
            let layout = HotplugLayout {
                base: GuestAddress(BASE),
                size: 1 << 30,
                block_size: 2 * MIB,
            };
            let options = RegionOptions { thp: false };
            let r = Arc::new(HotplugRegion::with_options(&layout, backend, options).unwrap());
            // No background piece starts while this is held: the populate ahead is stuck.
            let held = Foreground::enter();
            let (tx, rx) = mpsc::channel();
            let ahead = {
                let r = r.clone();
                std::thread::spawn(move || {
                    let _ = tx.send(r.populate_ahead_next(1 << 30, 128 * MIB, 128 * MIB));
                })
            };
            // Wait for the job to be under way (or for the call to have failed).
            while r.lock().in_progress.is_none() {
                if let Ok(result) = rx.try_recv() {
                    panic!("populate ahead ended before it started: {result:?}");
                }
                std::thread::yield_now();
            }
            let mut times = OpTimes::default();
            r.populate_timed(GuestAddress(BASE), 128 * MIB, &mut times)
                .unwrap();
            assert_eq!(rx.recv().unwrap().unwrap(), 0, "nothing was done ahead");
            ahead.join().unwrap();
            drop(held);
            assert_eq!(times.ahead_bytes, 0);
            assert_eq!(r.ahead_bytes(), 0);
            assert_eq!(r.plugged_bytes(), 128 * MIB);
            assert!(r.lock().in_progress.is_none());
            assert!(r.lock().staged.is_empty());
            // The next populate ahead starts after the plugged block.
            assert_eq!(
                r.populate_ahead_next(1 << 30, 128 * MIB, 128 * MIB)
                    .unwrap(),
                128 * MIB
            );
            r.discard_all().unwrap();
        }
    }
}
