//! What each request does to the hotplug memory, and its answer: the rules of virtio 1.2
//! section 5.15.6 as Linux's driver relies on them.

use std::time::Instant;

use log::{debug, Level};

use crate::guest_log;
use vm_memory::GuestAddress;

use super::hotplug_memory::HotplugMemory;
use super::metrics::Timing;
use super::queue::Core;
use super::request::*;
use super::shared::BUSY_RETRY_MIN;
use super::RangeState;

impl<R: HotplugMemory> Core<R> {
    pub(super) fn execute(&self, req: Request, m: &mut Timing) -> Response {
        match req.kind {
            RequestKind::Plug => self.plug(req.addr, req.nb_blocks, m),
            RequestKind::Unplug => self.unplug(req.addr, req.nb_blocks, m),
            RequestKind::UnplugAll => self.unplug_all(m),
            RequestKind::State => self.state(req.addr, req.nb_blocks),
        }
    }

    pub(super) fn plug(&self, addr: u64, nb_blocks: u16, m: &mut Timing) -> Response {
        // NACK first, whatever the range (as Cloud Hypervisor does): a driver whose plug raced
        // with a smaller requested size must get NACK, never an ERROR that breaks it for good.
        if let Some(len) = self.range_len(nb_blocks) {
            let (plugged, requested) = {
                let state = self.shared.lock();
                (state.plugged, state.requested)
            };
            if plugged
                .checked_add(len)
                .is_none_or(|total| total > requested)
            {
                debug!("virtio-mem: PLUG of {len:#x} at {addr:#x} would exceed the requested size");
                return NACK;
            }
        }
        let len = match self.validate("PLUG", addr, nb_blocks, RangeState::Unplugged, m) {
            Ok(len) => len,
            Err(response) => return response,
        };
        let gaddr = GuestAddress(addr);
        match m.time(|t| self.region.populate_timed(gaddr, len, t)) {
            Ok(()) => {
                self.publish(false);
                self.shared.lock().busy_retry = BUSY_RETRY_MIN;
                ACK
            }
            Err(e) => {
                guest_log!(
                    Level::Warn,
                    "virtio-mem plug BUSY",
                    "virtio-mem: cannot back {len:#x} at {addr:#x}, answering BUSY: {e}"
                );
                // Leave nothing of the failed plug behind (the region should have rolled back).
                if !matches!(self.region.state(gaddr, len), Ok(RangeState::Unplugged)) {
                    // The roll-back's time counts as bookkeeping, not as a phase.
                    let untimed = &mut memory::OpTimes::default();
                    if let Err(e) = self.region.discard_timed(gaddr, len, untimed) {
                        guest_log!(
                            Level::Error,
                            "virtio-mem discard failed",
                            "virtio-mem: cannot discard {len:#x} at {addr:#x}: {e}"
                        );
                    }
                }
                self.publish(false);
                self.busy()
            }
        }
    }

    pub(super) fn unplug(&self, addr: u64, nb_blocks: u16, m: &mut Timing) -> Response {
        let len = match self.validate("UNPLUG", addr, nb_blocks, RangeState::Plugged, m) {
            Ok(len) => len,
            Err(response) => return response,
        };
        let gaddr = GuestAddress(addr);
        let result = m.time(|t| self.region.discard_timed(gaddr, len, t));
        self.publish(false);
        match result {
            Ok(()) => ACK,
            Err(e) => {
                guest_log!(
                    Level::Error,
                    "virtio-mem discard failed",
                    "virtio-mem: cannot discard {len:#x} at {addr:#x}: {e}"
                );
                self.busy()
            }
        }
    }

    pub(super) fn unplug_all(&self, m: &mut Timing) -> Response {
        m.sample.bytes = self.region.plugged_bytes();
        m.validated();
        let result = m.time(|t| self.region.discard_all_timed(t));
        self.publish(true);
        match result {
            Ok(()) => ACK,
            Err(e) => {
                guest_log!(
                    Level::Error,
                    "virtio-mem discard failed",
                    "virtio-mem: cannot unplug all: {e}"
                );
                self.busy()
            }
        }
    }

    pub(super) fn state(&self, addr: u64, nb_blocks: u16) -> Response {
        let Some(len) = self.check_range(addr, nb_blocks) else {
            guest_log!(
                Level::Warn,
                "virtio-mem invalid range",
                "virtio-mem: STATE of {nb_blocks} blocks at {addr:#x}: invalid range"
            );
            return ERROR;
        };
        match self.region.state(GuestAddress(addr), len) {
            Ok(state) => Response::state(state),
            Err(e) => {
                guest_log!(
                    Level::Error,
                    "virtio-mem state unreadable",
                    "virtio-mem: cannot get the state of {len:#x} at {addr:#x}: {e}"
                );
                self.busy()
            }
        }
    }

    /// The checks PLUG and UNPLUG share: a valid range whose blocks are all in state `want`.
    /// Returns the range's length in bytes (and ends the validation time), or the answer.
    pub(super) fn validate(
        &self,
        op: &str,
        addr: u64,
        nb_blocks: u16,
        want: RangeState,
        m: &mut Timing,
    ) -> std::result::Result<u64, Response> {
        let Some(len) = self.check_range(addr, nb_blocks) else {
            guest_log!(
                Level::Warn,
                "virtio-mem invalid range",
                "virtio-mem: {op} of {nb_blocks} blocks at {addr:#x}: invalid range"
            );
            return Err(ERROR);
        };
        match self.region.state(GuestAddress(addr), len) {
            Ok(state) if state == want => {}
            Ok(state) => {
                guest_log!(
                    Level::Warn,
                    "virtio-mem range in the wrong state",
                    "virtio-mem: {op} of {len:#x} at {addr:#x}: range is {state:?}"
                );
                return Err(ERROR);
            }
            Err(e) => {
                guest_log!(
                    Level::Error,
                    "virtio-mem state unreadable",
                    "virtio-mem: cannot get the state of {len:#x} at {addr:#x}: {e}"
                );
                return Err(self.busy());
            }
        }
        m.sample.bytes = len;
        m.validated();
        Ok(len)
    }

    /// Checks that `[addr, addr + nb_blocks * block_size)` is a block-aligned, non-empty range
    /// inside the usable region; returns its length.
    pub(super) fn check_range(&self, addr: u64, nb_blocks: u16) -> Option<u64> {
        let bs = self.shared.layout.block_size;
        let len = self.range_len(nb_blocks)?;
        if addr & (bs - 1) != 0 || addr < self.shared.layout.base.0 {
            return None;
        }
        let end = addr.checked_add(len)?;
        let usable_end = self.shared.layout.base.0 + self.shared.usable_region_size();
        (end <= usable_end).then_some(len)
    }

    /// The length of `nb_blocks` blocks; `None` for 0 blocks.
    pub(super) fn range_len(&self, nb_blocks: u16) -> Option<u64> {
        (nb_blocks != 0).then(|| u64::from(nb_blocks) * self.shared.layout.block_size)
    }

    /// Answers BUSY and arms the retry timer ([`VirtioMemShared::poll_busy_retry`]) if it is
    /// not armed yet.
    pub(super) fn busy(&self) -> Response {
        let mut state = self.shared.lock();
        if !state.busy_pending {
            state.busy_pending = true;
            state.busy_since = Some(Instant::now());
        }
        BUSY
    }

    /// Publishes the region's plugged size to the configuration space.
    pub(super) fn publish(&self, all_unplugged: bool) {
        self.shared
            .set_plug_state(self.region.plugged_bytes(), all_unplugged);
    }

    /// The end (offset from the base) of the highest plugged block, searched once when the
    /// device is created over a region that already has plugged blocks.
    pub(super) fn highest_plugged_end(&self) -> u64 {
        let bs = self.shared.layout.block_size;
        let blocks = self.shared.layout.size / bs;
        let base = self.shared.layout.base.0;
        let (mut lo, mut hi) = (0u64, blocks);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let rest_unplugged = matches!(
                self.region
                    .state(GuestAddress(base + mid * bs), (blocks - mid) * bs),
                Ok(RangeState::Unplugged)
            );
            if rest_unplugged {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        lo * bs
    }
}
