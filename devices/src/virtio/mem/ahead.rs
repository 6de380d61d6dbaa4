//! The populate-ahead policy: when the requested size grows, a thread backs, outside the
//! guest's view, the blocks Linux's driver will plug next (the lowest unplugged ones of the
//! usable region), one 128 MiB memory block at a time, so that the PLUG finds them ready while
//! the guest is still onlining the previous block. It gives them back when the requested size
//! falls, and after [`AHEAD_IDLE`] without a plug. The mechanism (the staging mapping, the
//! low-priority pieces a PLUG takes over) is the hotplug memory's
//! ([`HotplugMemory::populate_ahead_next`]).
//!
//! Speculation has a budget: at most [`AHEAD_MAX`] bytes are populated ahead and not plugged,
//! and once memory prepared ahead was given back unplugged (the requested size fell, the guest
//! plugged elsewhere, or it did not plug for [`AHEAD_IDLE`]), nothing more is prepared until
//! the guest plugs again: a guest that does not follow the requested size costs one
//! preparation, not one per resize.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::hotplug_memory::HotplugMemory;
use super::metrics::VirtioMemMetrics;
use super::shared::VirtioMemShared;
use crate::virtio::{Error, Result};

/// What is populated ahead at a time, aligned in guest physical memory: Linux's memory block
/// on x86_64, which its driver plugs in one request.
pub const AHEAD_CHUNK: u64 = memory::LINUX_MEMORY_BLOCK;
/// The most memory populated ahead and not plugged at a time: two of Linux's memory blocks,
/// the one the guest plugs next and the one after.
pub const AHEAD_MAX: u64 = 2 * AHEAD_CHUNK;
/// Memory populated ahead is given back after this long without a plug.
pub const AHEAD_IDLE: Duration = Duration::from_secs(10);

const KICK: u64 = 0;
const STOP: u64 = 1;

/// The populate-ahead thread's state.
pub(super) struct Ahead<R: HotplugMemory> {
    region: Arc<R>,
    shared: Arc<VirtioMemShared>,
    metrics: Arc<VirtioMemMetrics>,
    kick: Arc<EventFd>,
    epoll: Epoll,
}

impl<R: HotplugMemory> Ahead<R> {
    /// The policy over `region`, woken by `kick` (resize, request handled), ended by `stop`.
    pub(super) fn new(
        region: Arc<R>,
        shared: Arc<VirtioMemShared>,
        metrics: Arc<VirtioMemMetrics>,
        kick: Arc<EventFd>,
        stop: Arc<EventFd>,
    ) -> Result<Self> {
        let epoll = Epoll::new().map_err(Error::EventFd)?;
        for (fd, data) in [(kick.as_raw_fd(), KICK), (stop.as_raw_fd(), STOP)] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, data),
                )
                .map_err(Error::EventFd)?;
        }
        Ok(Self {
            region,
            shared,
            metrics,
            kick,
            epoll,
        })
    }

    /// Waits up to `timeout` (`None`: for ever) for a kick or the stop; returns false on stop.
    fn wait(&self, timeout: Option<Duration>) -> bool {
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        let mut events = [EpollEvent::default(); 2];
        let n = self.epoll.wait(ms, &mut events).unwrap_or(0);
        let ready = &events[..n];
        if ready.iter().any(|e| e.data() == STOP) {
            return false;
        }
        if ready.iter().any(|e| e.data() == KICK) {
            let _ = self.kick.read();
        }
        true
    }

    /// Gives back what is populated ahead beyond its lowest `keep` bytes; returns the bytes
    /// given back.
    fn release(&self, keep: u64) -> u64 {
        let n = self.region.release_ahead(keep);
        self.metrics.ahead_released_bytes.fetch_add(n, Relaxed);
        n
    }

    pub(super) fn run(self) {
        // Nobody waits for this thread's work yet (fd backends allocate here, anon ones on the
        // background populate pool): a PLUG being answered and the vCPUs win the CPU from it.
        memory::lower_thread_priority();
        let mut policy = Policy::default();
        loop {
            let timeout = if policy.more {
                Some(Duration::ZERO)
            } else if self.region.ahead_bytes() > 0 {
                Some(AHEAD_IDLE.saturating_sub(policy.since.elapsed()))
            } else {
                None
            };
            if !self.wait(timeout) {
                break;
            }
            let requested = self.shared.requested_size();
            self.step(&mut policy, requested);
            if !policy.more {
                self.metrics
                    .ahead_settled_requested_bytes
                    .store(requested, Relaxed);
            }
        }
        self.release(0);
    }

    /// One look at the sizes: gives back what is not wanted any more, and populates the next
    /// chunk ahead if the budget allows.
    fn step(&self, p: &mut Policy, requested: u64) {
        let plugged = self.region.plugged_bytes();
        if p.last_plugged.is_some_and(|last| plugged > last) {
            // The guest plugs again: prepare for it again.
            p.held_back = false;
        }
        if requested > p.last_requested || p.last_plugged != Some(plugged) {
            p.more = true;
            p.since = Instant::now();
        }
        (p.last_requested, p.last_plugged) = (requested, Some(plugged));
        let want = requested.saturating_sub(plugged).min(AHEAD_MAX);
        if self.region.ahead_bytes() > want && self.release(want) > 0 {
            // Prepared and not plugged (the requested size fell, or the guest plugged other
            // blocks): the guest does not take what is prepared for it.
            p.held_back = true;
        }
        if self.region.ahead_bytes() > 0 && p.since.elapsed() >= AHEAD_IDLE {
            log::debug!(
                "virtio-mem: no plug for {AHEAD_IDLE:?}: giving back what was populated ahead"
            );
            if self.release(0) > 0 {
                p.held_back = true;
            }
            p.more = false;
            return;
        }
        if !p.more || self.region.ahead_bytes() >= want {
            p.more = false;
            return;
        }
        if p.held_back {
            log::debug!("virtio-mem: not populating ahead until the guest plugs again");
            self.metrics.ahead_held_back.fetch_add(1, Relaxed);
            p.more = false;
            return;
        }
        let t = Instant::now();
        let usable = self.shared.usable_region_size();
        match self.region.populate_ahead_next(usable, want, AHEAD_CHUNK) {
            Ok(n) => {
                self.metrics.ahead_populated_bytes.fetch_add(n, Relaxed);
                self.metrics
                    .ahead_ns
                    .fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
                // 0: nothing left to do, or a PLUG took the work over (its end kicks us).
                p.more = n > 0;
            }
            Err(e) => {
                log::debug!("virtio-mem: populate ahead failed (the PLUG will populate): {e}");
                p.more = false;
            }
        }
    }
}

/// The populate-ahead thread's view of the guest.
struct Policy {
    /// Populate the next chunk without waiting (cleared when nothing is left to do, or a
    /// populate ahead failed: that is not an error, the PLUG then populates itself).
    more: bool,
    last_requested: u64,
    last_plugged: Option<u64>,
    /// Memory populated ahead was given back unplugged and the guest has not plugged since:
    /// nothing more is prepared until it does.
    held_back: bool,
    /// The last plug or rise of the requested size.
    since: Instant,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            more: false,
            last_requested: 0,
            last_plugged: None,
            held_back: false,
            since: Instant::now(),
        }
    }
}
