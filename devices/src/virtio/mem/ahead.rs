//! The populate-ahead policy: when the requested size grows, a thread backs, outside the
//! guest's view, the blocks Linux's driver will plug next (the lowest unplugged ones of the
//! usable region), one 128 MiB memory block at a time, so that the PLUG finds them ready while
//! the guest is still onlining the previous block. It gives them back when the requested size
//! falls, and after [`AHEAD_IDLE`] without a plug. The mechanism (the staging mapping) is the
//! hotplug memory's ([`HotplugMemory::populate_ahead_next`]).

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

    fn release(&self, keep: u64) {
        let n = self.region.release_ahead(keep);
        self.metrics.ahead_released_bytes.fetch_add(n, Relaxed);
    }

    pub(super) fn run(self) {
        // Nobody waits for this thread's work yet (fd backends allocate here, anon ones on the
        // background populate pool): a PLUG being answered and the vCPUs win the CPU from it.
        memory::lower_thread_priority();
        // `more`: populate the next chunk without waiting (cleared when nothing is left to do
        // or a populate ahead failed: that is not an error, the PLUG then populates itself).
        let (mut more, mut last_requested, mut last_plugged) = (false, 0, u64::MAX);
        let mut since = Instant::now();
        loop {
            let timeout = if more {
                Some(Duration::ZERO)
            } else if self.region.ahead_bytes() > 0 {
                Some(AHEAD_IDLE.saturating_sub(since.elapsed()))
            } else {
                None
            };
            if !self.wait(timeout) {
                break;
            }
            let requested = self.shared.requested_size();
            let plugged = self.region.plugged_bytes();
            if requested > last_requested || plugged != last_plugged {
                more = true;
                since = Instant::now();
            }
            (last_requested, last_plugged) = (requested, plugged);
            let want = requested.saturating_sub(plugged);
            if self.region.ahead_bytes() > want {
                self.release(want);
            }
            if self.region.ahead_bytes() > 0 && since.elapsed() >= AHEAD_IDLE {
                log::debug!(
                    "virtio-mem: no plug for {AHEAD_IDLE:?}: giving back what was populated ahead"
                );
                self.release(0);
                more = false;
                continue;
            }
            if !more || self.region.ahead_bytes() >= want {
                more = false;
                continue;
            }
            let t = Instant::now();
            let usable = self.shared.usable_region_size();
            match self.region.populate_ahead_next(usable, want, AHEAD_CHUNK) {
                Ok(0) => more = false,
                Ok(n) => {
                    self.metrics.ahead_populated_bytes.fetch_add(n, Relaxed);
                    self.metrics
                        .ahead_ns
                        .fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
                }
                Err(e) => {
                    log::debug!("virtio-mem: populate ahead failed (the PLUG will populate): {e}");
                    more = false;
                }
            }
        }
        self.release(0);
    }
}
