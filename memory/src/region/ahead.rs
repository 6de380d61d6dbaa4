//! Populate ahead: backing, outside the guest's view, the blocks the guest will plug next, and
//! moving that memory into place when the PLUG comes.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use log::{debug, warn};

use super::{ns_since, HotplugRegion, OpTimes, State};
use crate::backend::Backend;
use crate::populate::{advise_raw, populate_parallel, Priority};
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
    /// inaccessible. Returns the bytes populated ahead (0: nothing left to do). Runs without
    /// the region's lock; a PLUG of these blocks meanwhile waits for it.
    pub fn populate_ahead_next(&self, usable_end: u64, want: u64, chunk: u64) -> Result<u64> {
        if !self.ahead_ok {
            return Ok(0);
        }
        let bs = self.layout.block_size;
        let (s, e) = {
            let mut st = self.lock();
            if st.in_progress.is_some() {
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
            let len = self.byte_len(s, e) as u64;
            if *self.backend() != Backend::Hugetlb {
                if let Some(room) = self.cgroup_room(&mut st, len) {
                    if len.saturating_add(len / 256) > room {
                        return Err(Error::Populate {
                            addr: self.guest_addr(s),
                            len,
                            source: io::Error::from_raw_os_error(libc::ENOMEM),
                        });
                    }
                }
            }
            st.in_progress = Some((s, e));
            (s, e)
        };
        let len = self.byte_len(s, e);
        let staged = match &self.fd {
            None => self.stage_anon(len).map(Some),
            Some(file) => {
                // From before the first page is allocated until `ahead` counts them.
                self.ahead_inflight.store(len as u64, Ordering::Release);
                // Allocates the file's pages of blocks [s, e) without mapping them.
                let flags = rustix::fs::FallocateFlags::empty();
                match rustix::fs::fallocate(file, flags, s as u64 * bs, len as u64) {
                    Ok(()) => Ok(None),
                    Err(errno) => {
                        // Give back whatever the failed call left allocated.
                        if let Err(r) = self.release(s, e) {
                            warn!("giving back a failed populate ahead failed: {r}");
                        }
                        Err(io::Error::from(errno))
                    }
                }
            }
        };
        #[cfg(test)]
        super::fail::ahead_in_flight(self);
        let mut st = self.lock();
        st.in_progress = None;
        self.staging_done.notify_all();
        match staged {
            Ok(host) => {
                st.ahead.set_range(s, e, true);
                if let Some(host) = host {
                    st.staged.push(Staged { a: s, b: e, host });
                }
                // Counted in `ahead` before it leaves `ahead_inflight`: never resident.
                self.ahead.fetch_add(len as u64, Ordering::AcqRel);
                self.ahead_inflight.store(0, Ordering::Release);
                Ok(len as u64)
            }
            Err(source) => {
                // The failed call's pages were given back above.
                self.ahead_inflight.store(0, Ordering::Release);
                Err(Error::Populate {
                    addr: self.guest_addr(s),
                    len: len as u64,
                    source,
                })
            }
        }
    }

    /// A fresh private anonymous mapping of `len` bytes, 2 MiB aligned (huge pages when the
    /// region asks for them), populated.
    pub(super) fn stage_anon(&self, len: usize) -> io::Result<usize> {
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
            advise_raw(start, len, libc::MADV_HUGEPAGE)?;
        }
        if let Err(e) = populate_parallel(start, len, self.thp, Priority::Background) {
            unmap(start, len);
            return Err(e);
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
