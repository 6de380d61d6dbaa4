//! The sizes of a virtio-mem device that change at run time, which the vmm reads and changes
//! without the device's lock, and the configuration space made from them.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::error;
use memory::HotplugLayout;
use vm_memory::GuestAddress;

use super::request::VirtioMemConfig;
use crate::virtio::device::VirtioInterrupt;
use crate::virtio::{Error, Result};

/// The least headroom the usable region keeps above the requested size (as QEMU does).
pub(super) const MIN_USABLE_HEADROOM: u64 = 1 << 30;
/// After a BUSY, the driver gets a configuration-change interrupt (its cue to try again) after
/// this long; the delay doubles while plugs keep failing, up to [`BUSY_RETRY_MAX`]. Linux's own
/// back-off after BUSY starts at 50 s and grows to 300 s.
pub const BUSY_RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest delay between a BUSY and the configuration interrupt that follows it.
pub const BUSY_RETRY_MAX: Duration = Duration::from_secs(32);

/// The sizes that change at run time, kept together under one lock so that a configuration read
/// never sees a half-made update.
#[derive(Debug)]
pub(super) struct SizeState {
    pub(super) requested: u64,
    /// The plugged size the configuration space shows: the region's count, published after
    /// every request together with a generation bump (the region owns the number).
    pub(super) plugged: u64,
    pub(super) usable: u64,
    pub(super) generation: u32,
    /// A plug was answered BUSY since the last configuration interrupt.
    pub(super) busy_pending: bool,
    /// When the first BUSY since the last configuration interrupt was answered.
    pub(super) busy_since: Option<Instant>,
    /// How long after a BUSY the driver is told to try again (doubles while BUSY goes on).
    pub(super) busy_retry: Duration,
    /// Present while the driver has the device running (DRIVER_OK).
    pub(super) interrupt: Option<Arc<dyn VirtioInterrupt>>,
}

/// The sizes of a virtio-mem device at one instant (read under one lock: they never tear).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeSnapshot {
    /// The size of the hotplug region.
    pub region_size: u64,
    /// The block size: the unit of plug and unplug.
    pub block_size: u64,
    /// The size the host asks the guest to plug.
    pub requested_size: u64,
    /// The size the guest has plugged.
    pub plugged_size: u64,
    /// The part of the region, from its start, that the driver may plug in.
    pub usable_region_size: u64,
}

/// The state of a [`VirtioMem`](super::VirtioMem) that the vmm reads and changes without the device's lock.
#[derive(Debug)]
pub struct VirtioMemShared {
    /// The region's geometry (owned by `memory`: [`HotplugLayout`]).
    pub(super) layout: HotplugLayout,
    pub(super) state: Mutex<SizeState>,
    /// Signalled after every change of the requested size (the vmm's populate-ahead thread).
    pub(super) resize_evt: Mutex<Option<Arc<vmm_sys_util::eventfd::EventFd>>>,
}

impl VirtioMemShared {
    /// Has `evt` signalled after every change of the requested size.
    pub(crate) fn notify_resize(&self, evt: Arc<vmm_sys_util::eventfd::EventFd>) {
        *memory::lock(&self.resize_evt) = Some(evt);
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, SizeState> {
        // The state stays consistent even if a holder panicked: every update is a plain store.
        memory::lock(&self.state)
    }

    /// All the sizes at once, under one lock.
    pub fn status(&self) -> SizeSnapshot {
        let state = self.lock();
        SizeSnapshot {
            region_size: self.layout.size,
            block_size: self.layout.block_size,
            requested_size: state.requested,
            plugged_size: state.plugged,
            usable_region_size: state.usable,
        }
    }

    /// The size the host asks the guest to plug, in bytes.
    pub fn requested_size(&self) -> u64 {
        self.lock().requested
    }

    /// The size the guest has plugged, in bytes.
    pub fn plugged_size(&self) -> u64 {
        self.lock().plugged
    }

    /// The size of the part of the region, from its start, that the driver may plug in.
    pub fn usable_region_size(&self) -> u64 {
        self.lock().usable
    }

    /// The size of the hotplug region in bytes.
    pub fn region_size(&self) -> u64 {
        self.layout.size
    }

    /// The block size in bytes: the unit of plug and unplug.
    pub fn block_size(&self) -> u64 {
        self.layout.block_size
    }

    /// The guest physical address of the region.
    pub fn addr(&self) -> GuestAddress {
        self.layout.base
    }

    /// The configuration generation, bumped on every change of the configuration space.
    pub fn config_generation(&self) -> u32 {
        self.lock().generation
    }

    /// Asks the guest to plug `bytes` in all. `bytes` must be a multiple of the block size and
    /// no larger than the region. The usable region grows with it (it never shrinks here); a
    /// running driver gets a configuration-change interrupt.
    pub fn set_requested_size(&self, bytes: u64) -> Result<()> {
        if bytes & (self.layout.block_size - 1) != 0 {
            return Err(Error::RequestedSizeUnaligned {
                requested: bytes,
                block_size: self.layout.block_size,
            });
        }
        if bytes > self.layout.size {
            return Err(Error::RequestedSizeTooLarge {
                requested: bytes,
                region_size: self.layout.size,
            });
        }
        let interrupt = {
            let mut state = self.lock();
            state.requested = bytes;
            self.grow_usable(&mut state);
            state.generation = state.generation.wrapping_add(1);
            Self::clear_busy(&mut state);
            state.interrupt.clone()
        };
        if let Some(evt) = &*memory::lock(&self.resize_evt) {
            let _ = evt.write(1);
        }
        if let Some(interrupt) = interrupt {
            if let Err(e) = interrupt.trigger_config() {
                error!("virtio-mem: {e}");
            }
        }
        Ok(())
    }

    /// Tells a driver that got BUSY that trying again makes sense now (e.g. host memory was
    /// freed). Returns whether a configuration interrupt was raised: only if a BUSY was
    /// answered since the last one and the driver is running.
    pub fn retry_after_busy(&self) -> bool {
        let interrupt = {
            let mut state = self.lock();
            if !state.busy_pending {
                return false;
            }
            let Some(interrupt) = state.interrupt.clone() else {
                return false;
            };
            state.busy_pending = false;
            state.busy_since = None;
            state.generation = state.generation.wrapping_add(1);
            interrupt
        };
        if let Err(e) = interrupt.trigger_config() {
            error!("virtio-mem: {e}");
        }
        true
    }

    /// The retry timer after BUSY: at `now`, if a BUSY has waited its delay, raises the
    /// configuration interrupt that tells the driver to try again ([`Self::retry_after_busy`])
    /// and returns `None`; otherwise returns how long until it is due (`None` when no BUSY is
    /// pending). The vmm calls it from the device's worker loop.
    pub fn poll_busy_retry(&self, now: Instant) -> Option<Duration> {
        {
            let state = self.lock();
            let since = state.busy_since.filter(|_| state.busy_pending)?;
            let due = since + state.busy_retry;
            if now < due {
                return Some(due - now);
            }
        }
        if self.retry_after_busy() {
            // If the retry fails again, the next one waits twice as long.
            let mut state = self.lock();
            state.busy_retry = (state.busy_retry * 2).min(BUSY_RETRY_MAX);
        }
        None
    }

    pub(super) fn clear_busy(state: &mut SizeState) {
        state.busy_pending = false;
        state.busy_since = None;
        state.busy_retry = BUSY_RETRY_MIN;
    }

    /// The usable region wanted for the requested size: min(region, requested + max(requested,
    /// 1 GiB)) rounded up to a block.
    pub(super) fn usable_for(&self, requested: u64) -> u64 {
        let headroom = requested.max(MIN_USABLE_HEADROOM);
        let wanted = requested.saturating_add(headroom).min(self.layout.size);
        // region_size is a multiple of block_size, so rounding up cannot pass it.
        wanted.div_ceil(self.layout.block_size) * self.layout.block_size
    }

    /// Grows the usable region to what the requested size wants; it never shrinks here (virtio
    /// 1.2 section 5.15: the driver may plug anywhere in it, and a shrink under a plug in
    /// flight would turn the driver's next request into an ERROR).
    pub(super) fn grow_usable(&self, state: &mut SizeState) {
        state.usable = state.usable.max(self.usable_for(state.requested));
    }

    /// Publishes the plugged size after a request; `all_unplugged` after UNPLUG_ALL, the only
    /// request that may shrink the usable region (nothing is plugged any more).
    pub(super) fn set_plug_state(&self, plugged: u64, all_unplugged: bool) {
        let mut state = self.lock();
        let usable = if all_unplugged && plugged == 0 {
            self.usable_for(state.requested)
        } else {
            state.usable.max(self.usable_for(state.requested))
        };
        if state.plugged != plugged || state.usable != usable {
            state.plugged = plugged;
            state.usable = usable;
            state.generation = state.generation.wrapping_add(1);
        }
    }

    /// The configuration space now.
    pub(super) fn config(&self) -> VirtioMemConfig {
        let state = self.lock();
        VirtioMemConfig {
            block_size: self.layout.block_size.into(),
            addr: self.layout.base.0.into(),
            region_size: self.layout.size.into(),
            usable_region_size: state.usable.into(),
            plugged_size: state.plugged.into(),
            requested_size: state.requested.into(),
            ..Default::default()
        }
    }
}
