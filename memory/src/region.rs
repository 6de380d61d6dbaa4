//! The hotplug reservation: one `MAP_NORESERVE` mapping of the whole hotplug window, populated
//! and discarded block by block.

use std::fmt;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use log::{debug, error, warn};
use vm_memory::GuestAddress;

use crate::access::{RangeState, UnpluggedAccess};
use crate::backend::Backend;
use crate::backing::BackingFile;
use crate::bitmap::Bitmap;
use crate::cgroup::cgroup_headroom;
use crate::layout::HotplugLayout;
use crate::listener::{ListenerId, RamDiscardListener};
use crate::sys::{
    read_u64_file, FREE_HUGEPAGES, HUGE_PAGE_SIZE, MAX_MAP_COUNT, OVERCOMMIT_MEMORY, PAGE_SIZE,
};
use crate::{aligned, Error, Result};

mod ahead;
mod discard;
#[cfg(test)]
mod fail;
mod limits;
mod reservation;
mod unplugged;

use ahead::{Fill, Staged};
pub use reservation::RegionOptions;
use reservation::{reserve, Reserved};
use unplugged::access_code;

struct State {
    bitmap: Bitmap,
    /// Number of adjacent block pairs in different states; protection runs = transitions + 1.
    transitions: u64,
    /// Where the kernel does not merge mappings back (hugetlb; anonymous memory without a
    /// shared anon_vma), every block boundary that was ever split, and how many there are.
    splits: Option<(Bitmap, u64)>,
    access: UnpluggedAccess,
    listeners: Vec<(ListenerId, Arc<dyn RamDiscardListener>)>,
    next_listener: u64,
    /// The last cgroup headroom read: (headroom, when, plugged bytes then).
    headroom: Option<(Option<u64>, Instant, u64)>,
    /// Unplugged blocks whose memory is populated ahead (set only while unplugged).
    ahead: Bitmap,
    /// Anonymous regions: where the memory of the blocks populated ahead lives.
    staged: Vec<Staged>,
    /// Blocks being populated ahead right now (without the lock); a PLUG of any of them waits.
    in_progress: Option<(usize, usize)>,
}

/// The hot-pluggable memory of a guest: one `MAP_NORESERVE` reservation of the whole hotplug
/// window, with blocks populated (plugged) and discarded (unplugged) on request.
///
/// Unplugged blocks hold no host memory and are protected per [`UnpluggedAccess`]; plugged
/// blocks are read-write. All methods take `&self`; the region is `Send + Sync`.
pub struct HotplugRegion {
    /// Where the region is and its block size: the one record of the region's geometry.
    layout: HotplugLayout,
    backend: Backend,
    host: usize,
    fd: Option<File>,
    /// The `file:` backend's file (owns the lock and the removal of a file Tide created).
    _backing: Option<BackingFile>,
    thp: bool,
    budget: u64,
    plugged: AtomicU64,
    /// Bytes populated ahead (not plugged).
    ahead: AtomicU64,
    /// Bytes of a populate ahead of an fd backend under way (allocated in part, not yet in
    /// `ahead`): never counted as resident.
    ahead_inflight: AtomicU64,
    /// Whether populate ahead may be used (not on anon with `vm.overcommit_memory=2`, where a
    /// staging mapping would be charged and its charge would move into the region).
    ahead_ok: bool,
    state: Mutex<State>,
    /// `state.access`, readable without the lock ([`access_code`]).
    access_now: AtomicU8,
    /// An access change asked for while the lock was held by a populate
    /// ([`HotplugRegion::set_unplugged_access`]); whoever takes the lock next makes it. 0: none.
    access_wanted: AtomicU8,
    /// Set by [`HotplugRegion::stop_populates`]: populates stop at their next slice.
    stopping: AtomicBool,
    /// Populates and discards begun so far, and those under way ([`Self::changes`]).
    changes_begun: AtomicU64,
    changes_running: AtomicU64,
    /// Signalled when a populate ahead ends.
    staging_done: std::sync::Condvar,
}

impl fmt::Debug for HotplugRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HotplugRegion")
            .field("base", &format_args!("{:#x}", self.layout.base.0))
            .field("size", &format_args!("{:#x}", self.layout.size))
            .field("block_size", &format_args!("{:#x}", self.layout.block_size))
            .field("backend", &self.backend)
            .field("host", &format_args!("{:#x}", self.host))
            .field("thp", &self.thp)
            .field("plugged_bytes", &self.plugged_bytes())
            .finish()
    }
}

/// Where the time of one populate or discard went (nanoseconds), for the device's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpTimes {
    /// Protection changes (`mprotect`).
    pub protect_ns: u64,
    /// Backing and giving back memory: `madvise`, `fallocate`, `mremap` of pages populated ahead.
    pub syscall_ns: u64,
    /// Bytes of the range that were populated ahead ([`HotplugRegion::populate_ahead_next`]).
    pub ahead_bytes: u64,
    /// Waiting for a populate ahead of the range that was under way when the PLUG came.
    pub ahead_wait_ns: u64,
}

/// How much of a PLUG is populated between two checks for a stop
/// ([`HotplugRegion::stop_populates`]): a few tens of milliseconds of 4 KiB pages at the
/// populate rates of docs/benchmarks.md.
pub const POPULATE_SLICE: u64 = 64 << 20;

/// A populate or discard under way ([`HotplugRegion::changes`]).
pub(super) struct ChangeGuard<'a>(&'a HotplugRegion);

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        self.0.changes_running.fetch_sub(1, Ordering::SeqCst);
    }
}

fn ns_since(t: Instant) -> u64 {
    t.elapsed().as_nanos() as u64
}

impl HotplugRegion {
    /// Reserves the whole hotplug window `layout` with `backend` and default options.
    ///
    /// One `mmap(MAP_NORESERVE)` of `layout.size` bytes, all `PROT_NONE` (unplugged), so even a
    /// 1 TiB reservation costs no memory and no commit charge. See [`HotplugRegion::with_options`].
    pub fn new(layout: &HotplugLayout, backend: Backend) -> Result<Self> {
        Self::with_options(layout, backend, RegionOptions::default())
    }

    /// Like [`HotplugRegion::new`], with options.
    ///
    /// * `Anon`: private anonymous, 2 MiB aligned; `MADV_HUGEPAGE` when `options.thp` and the
    ///   block size is a multiple of 2 MiB.
    /// * `Memfd`: `memfd_create` + `ftruncate` + `MAP_SHARED`.
    /// * `Hugetlb`: like `Memfd` with `MFD_HUGETLB | MFD_HUGE_2MB`; the block size must be a
    ///   multiple of 2 MiB and the 2 MiB pool must have free pages ([`Error::HugetlbPoolEmpty`]).
    /// * `File(path)`: see [`Backend::File`] for which paths are used; sized and mapped shared.
    ///
    /// The layout must have a power-of-two block size of at least 4 KiB, a non-zero size that
    /// is a multiple of it, and a block-aligned base.
    pub fn with_options(
        layout: &HotplugLayout,
        backend: Backend,
        options: RegionOptions,
    ) -> Result<Self> {
        let HotplugLayout {
            base,
            size,
            block_size,
        } = *layout;
        let base = base.0;
        layout.check(PAGE_SIZE, "must be a power of two of at least 4 KiB")?;
        let len = usize::try_from(size).map_err(|_| Error::AddressSpace {
            base,
            size,
            bits: 64,
        })?;
        let blocks = usize::try_from(size / block_size).map_err(|_| Error::AddressSpace {
            base,
            size,
            bits: usize::BITS,
        })?;
        if backend == Backend::Hugetlb {
            if !aligned(block_size, HUGE_PAGE_SIZE) {
                return Err(Error::HugetlbBlockSize { block_size });
            }
            if read_u64_file(FREE_HUGEPAGES).unwrap_or(0) == 0 {
                return Err(Error::HugetlbPoolEmpty);
            }
        }
        let budget = read_u64_file(MAX_MAP_COUNT)
            .map(|n| n / 2)
            .unwrap_or(limits::MAX_RUN_BUDGET)
            .clamp(1, limits::MAX_RUN_BUDGET);

        let Reserved {
            host,
            fd,
            backing,
            thp,
            mergeable,
        } = reserve(len, layout, &backend, options)?;
        let ahead_ok = fd.is_some() || read_u64_file(OVERCOMMIT_MEMORY) != Some(2);
        // What a PLUG uses, ready before the first one: the populate threads and the open
        // cgroup files.
        crate::populate::start_pools();
        crate::cgroup::prepare();
        debug!(
            "hotplug region [{base:#x}, +{size:#x}) block {block_size:#x} backend {backend} at host {host:#x} thp {thp}"
        );
        Ok(HotplugRegion {
            layout: *layout,
            backend,
            host,
            fd,
            _backing: backing,
            thp,
            budget,
            plugged: AtomicU64::new(0),
            ahead: AtomicU64::new(0),
            ahead_inflight: AtomicU64::new(0),
            ahead_ok,
            access_now: AtomicU8::new(access_code(UnpluggedAccess::default())),
            access_wanted: AtomicU8::new(0),
            stopping: AtomicBool::new(false),
            changes_begun: AtomicU64::new(0),
            changes_running: AtomicU64::new(0),
            staging_done: std::sync::Condvar::new(),
            state: Mutex::new(State {
                bitmap: Bitmap::new(blocks),
                transitions: 0,
                splits: (!mergeable).then(|| (Bitmap::new(blocks + 1), 0)),
                access: UnpluggedAccess::default(),
                listeners: Vec::new(),
                next_listener: 0,
                headroom: None,
                ahead: Bitmap::new(blocks),
                staged: Vec::new(),
                in_progress: None,
            }),
        })
    }

    /// First guest physical address of the region.
    pub fn base(&self) -> GuestAddress {
        self.layout.base
    }

    /// The region's geometry: base, size and block size.
    pub fn layout(&self) -> HotplugLayout {
        self.layout
    }

    /// Size of the region in bytes.
    pub fn size(&self) -> u64 {
        self.layout.size
    }

    /// Plug granularity in bytes.
    pub fn block_size(&self) -> u64 {
        self.layout.block_size
    }

    /// The backend the region was created with.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Host virtual address of the first byte of the region.
    pub fn host_addr(&self) -> u64 {
        self.host as u64
    }

    /// Whether transparent huge pages were requested (`MADV_HUGEPAGE`) for the reservation.
    pub fn thp(&self) -> bool {
        self.thp
    }

    /// Bytes currently plugged. Never blocks, even while a populate runs.
    pub fn plugged_bytes(&self) -> u64 {
        self.plugged.load(Ordering::Acquire)
    }

    /// How many protection runs (mappings) the region may be split into.
    pub fn fragmentation_budget(&self) -> u64 {
        self.budget
    }

    /// The state's lock; an access change asked for while a populate held it is made first.
    fn lock(&self) -> MutexGuard<'_, State> {
        let mut st = crate::lock(&self.state);
        self.apply_wanted_access(&mut st);
        st
    }

    /// From now on every populate (a PLUG's) stops at its next slice ([`POPULATE_SLICE`]),
    /// rolls back and fails with [`Error::Stopped`]: the VMM's stop never waits for a big one.
    pub fn stop_populates(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    pub(super) fn stop_requested(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// (populates and discards begun so far, those under way now): a measurement of resident
    /// memory taken between two equal readings with none under way saw no change in flight.
    pub fn changes(&self) -> (u64, u64) {
        // Running first: a change that begins in between shows in `begun`.
        let running = self.changes_running.load(Ordering::SeqCst);
        (self.changes_begun.load(Ordering::SeqCst), running)
    }

    /// Counts a populate or discard from now until the guard drops.
    pub(super) fn change(&self) -> ChangeGuard<'_> {
        self.changes_running.fetch_add(1, Ordering::SeqCst);
        self.changes_begun.fetch_add(1, Ordering::SeqCst);
        ChangeGuard(self)
    }

    /// Checks a guest range and returns its block indices `[first, end)`.
    fn check(&self, addr: GuestAddress, len: u64) -> Result<(usize, usize)> {
        let addr = addr.0;
        let end = addr.checked_add(len);
        let inside = addr >= self.layout.base.0
            && end.is_some_and(|e| e <= self.layout.base.0 + self.layout.size);
        if !inside {
            return Err(Error::OutOfRange {
                addr,
                len,
                base: self.layout.base.0,
                size: self.layout.size,
            });
        }
        if len == 0
            || !aligned(addr, self.layout.block_size)
            || !aligned(len, self.layout.block_size)
        {
            return Err(Error::Misaligned {
                addr,
                len,
                block_size: self.layout.block_size,
            });
        }
        // Both fit in usize: they are at most size / block_size, which fit when created.
        let first = ((addr - self.layout.base.0) / self.layout.block_size) as usize;
        Ok((first, first + (len / self.layout.block_size) as usize))
    }

    fn byte_len(&self, a: usize, b: usize) -> usize {
        (b - a) * self.layout.block_size as usize
    }

    fn guest_addr(&self, a: usize) -> u64 {
        self.layout.base.0 + a as u64 * self.layout.block_size
    }

    /// Plugs `[addr, addr + len)`: makes it read-write and backs it with host memory
    /// (`MADV_POPULATE_WRITE`), then tells the listeners.
    ///
    /// The range must be non-empty, block aligned, inside the region and wholly unplugged.
    /// If the host cannot back it (out of memory, a full tmpfs, an empty hugetlb pool, a cgroup
    /// limit), the range is discarded and re-protected and [`Error::Populate`] is returned; a
    /// listener veto likewise rolls back and returns [`Error::ListenerVeto`].
    pub fn populate(&self, addr: GuestAddress, len: u64) -> Result<()> {
        self.populate_timed(addr, len, &mut OpTimes::default())
    }

    /// [`HotplugRegion::populate`], adding where its time went to `times`. Blocks of the range
    /// populated ahead are taken as they are (moved into place on anonymous regions); a
    /// populate ahead of any of them still under way is waited for.
    pub fn populate_timed(&self, addr: GuestAddress, len: u64, times: &mut OpTimes) -> Result<()> {
        let _change = self.change();
        let (a, b) = self.check(addr, len)?;
        let mut st = self.lock();
        if st.in_progress.is_some_and(|(x, y)| x < b && a < y) {
            let t = Instant::now();
            while st.in_progress.is_some_and(|(x, y)| x < b && a < y) {
                st = self
                    .staging_done
                    .wait(st)
                    .unwrap_or_else(|e| e.into_inner());
            }
            times.ahead_wait_ns += ns_since(t);
        }
        if st.bitmap.count(a, b) != 0 {
            return Err(Error::NotUnplugged { addr: addr.0, len });
        }
        let ahead = st.ahead.count(a, b) as u64 * self.layout.block_size;
        // Staged memory moved in keeps mapping boundaries the kernel never merges: count them.
        let moved_edges = 2 * st.staged.iter().filter(|s| s.a < b && a < s.b).count() as u64;
        let transitions = self.check_budget(&st, a, b, true, moved_edges)?;
        // Past a memory cgroup's limit the kernel does not fail MADV_POPULATE_WRITE: its OOM
        // killer kills this process. Refuse what cannot fit (hugetlb pages are not charged there).
        let fresh = len - ahead;
        if *self.backend() != Backend::Hugetlb && fresh > 0 {
            let mut room = self.cgroup_room(&mut st, fresh);
            // len / 256: the page tables of the range, with room to spare.
            let short =
                |room: Option<u64>| room.is_some_and(|r| fresh.saturating_add(len / 256) > r);
            if short(room) && self.ahead_bytes() > ahead {
                // Memory populated ahead for other blocks must never turn a PLUG into BUSY:
                // give it back and look again.
                for (x, y) in st.ahead.runs(true) {
                    for (x, y) in [(x, y.min(a)), (x.max(b), y)] {
                        if x < y {
                            self.drop_ahead(&mut st, x, y);
                        }
                    }
                }
                room = cgroup_headroom();
                st.headroom = Some((room, Instant::now(), self.plugged_bytes()));
            }
            if let Some(room) = room {
                if short(Some(room)) {
                    return Err(Error::Populate {
                        addr: addr.0,
                        len,
                        source: io::Error::from_raw_os_error(libc::ENOMEM),
                    });
                }
            }
        }
        // From here on the range's ahead memory belongs to this populate (or its roll back).
        st.ahead.set_range(a, b, false);
        self.ahead.fetch_sub(ahead, Ordering::AcqRel);
        times.ahead_bytes += ahead;
        let pieces = Self::take_staged(&mut st, self.layout.block_size as usize, a, b);
        if !pieces.is_empty() {
            Self::ensure_splits(&mut st);
        }
        if let Err(e) = self.fill(&mut st, a, b, &pieces, times) {
            self.roll_back(a, b, st.access);
            return Err(match e {
                Fill::Stopped => Error::Stopped { addr: addr.0, len },
                Fill::Protect(source) => Error::Protect {
                    addr: addr.0,
                    len,
                    source,
                },
                Fill::Populate(source) => Error::Populate {
                    addr: addr.0,
                    len,
                    source,
                },
            });
        }
        for (i, (_, l)) in st.listeners.iter().enumerate() {
            if let Err(reason) = l.on_populate(addr, len) {
                if let Err(e) = self.protect(a, b, st.access.prot()) {
                    error!(
                        "roll back of [{:#x}, +{len:#x}): re-protect failed: {e}",
                        addr.0
                    );
                }
                for (_, accepted) in st.listeners[..i].iter().rev() {
                    accepted.on_discard(addr, len);
                }
                self.roll_back(a, b, st.access);
                return Err(Error::ListenerVeto {
                    addr: addr.0,
                    len,
                    reason,
                });
            }
        }
        st.bitmap.set_range(a, b, true);
        st.transitions = transitions;
        Self::mark_split(&mut st, a, b);
        self.plugged.fetch_add(len, Ordering::AcqRel);
        Ok(())
    }

    /// The plug state of `[addr, addr + len)`, validated like [`HotplugRegion::populate`].
    pub fn state(&self, addr: GuestAddress, len: u64) -> Result<RangeState> {
        let (a, b) = self.check(addr, len)?;
        let st = self.lock();
        let n = st.bitmap.count(a, b);
        Ok(if n == 0 {
            RangeState::Unplugged
        } else if n == b - a {
            RangeState::Plugged
        } else {
            RangeState::Mixed
        })
    }

    /// Registers a listener and replays every plugged run to it through
    /// [`RamDiscardListener::on_populate`] (a veto during replay is only logged).
    pub fn add_listener(&self, listener: Arc<dyn RamDiscardListener>) -> ListenerId {
        let mut st = self.lock();
        for (a, b) in st.bitmap.runs(true) {
            let (addr, len) = (self.guest_addr(a), self.byte_len(a, b) as u64);
            if let Err(e) = listener.on_populate(GuestAddress(addr), len) {
                warn!("listener refused replay of plugged [{addr:#x}, +{len:#x}): {e}");
            }
        }
        let id = ListenerId(st.next_listener);
        st.next_listener += 1;
        st.listeners.push((id, listener));
        id
    }

    /// Unregisters a listener (no events are sent to it). Unknown ids are ignored.
    pub fn remove_listener(&self, id: ListenerId) {
        self.lock().listeners.retain(|(i, _)| *i != id);
    }

    /// The plugged memory as coalesced `(start, length)` runs, in address order.
    pub fn plugged_ranges(&self) -> Vec<(GuestAddress, u64)> {
        let st = self.lock();
        st.bitmap
            .runs(true)
            .into_iter()
            .map(|(a, b)| (GuestAddress(self.guest_addr(a)), self.byte_len(a, b) as u64))
            .collect()
    }
}
