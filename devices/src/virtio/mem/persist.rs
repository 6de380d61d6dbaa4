//! The saved state of a virtio-mem device ([`VirtioMemState`]), for snapshots: the region's
//! geometry, the plugged blocks, the sizes of the configuration space, the BUSY retry state,
//! the features the driver acknowledged and the ring positions of its active queue.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::Address;

use super::hotplug_memory::HotplugMemory;
use super::queue::Slot;
use super::shared::{BUSY_RETRY_MAX, BUSY_RETRY_MIN};
use super::VirtioMem;
use crate::virtio::mmio::QueuePersist;

/// Why a virtio-mem state cannot be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A request is being carried out (a plug or unplug in flight).
    #[error("a virtio-mem request is in flight (a plug or unplug is under way)")]
    RequestInFlight,
    /// The region the state is restored over has another geometry.
    #[error(
        "the saved virtio-mem region ({saved_base:#x}, {saved_size:#x} bytes, {saved_block:#x}-byte \
         blocks) differs from this one ({base:#x}, {size:#x} bytes, {block:#x}-byte blocks)"
    )]
    Geometry {
        /// Saved base.
        saved_base: u64,
        /// Saved size.
        saved_size: u64,
        /// Saved block size.
        saved_block: u64,
        /// This region's base.
        base: u64,
        /// This region's size.
        size: u64,
        /// This region's block size.
        block: u64,
    },
    /// The saved sizes are not ones this device can be in.
    #[error("the saved virtio-mem sizes are inconsistent: {0}")]
    Inconsistent(&'static str),
    /// The region's plugged blocks are not the saved ones.
    #[error("the region's plugged blocks differ from the saved ones")]
    PluggedMismatch,
}

/// Everything a virtio-mem device holds that a snapshot must carry (Firecracker's `persist`
/// shape: geometry, sizes, the plugged blocks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMemState {
    /// Guest physical base of the region.
    pub addr: u64,
    /// Size of the region.
    pub region_size: u64,
    /// Block size.
    pub block_size: u64,
    /// The usable region size the configuration space shows.
    pub usable_region_size: u64,
    /// The requested size.
    pub requested_size: u64,
    /// The plugged size.
    pub plugged_size: u64,
    /// The plugged blocks as coalesced `(guest address, length)` runs in address order.
    pub plugged: Vec<(u64, u64)>,
    /// The configuration generation.
    pub generation: u32,
    /// A BUSY was answered since the last configuration interrupt.
    pub busy_pending: bool,
    /// The delay before the next retry interrupt after BUSY, in milliseconds.
    pub busy_retry_ms: u64,
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// The ring positions of the activated queue (absent when not activated).
    pub active_queue: Option<QueuePersist>,
}

impl<R: HotplugMemory> VirtioMem<R> {
    /// The device's state. Fails while a request is being carried out (the queue is out of
    /// its slot): its answer would be lost.
    pub fn save_state(&self) -> Result<VirtioMemState, PersistError> {
        let core = &self.core;
        let active_queue = match &core.slot().slot {
            Slot::Idle => None,
            Slot::Ready(a) => Some(QueuePersist::from(a.queue.state())),
            Slot::Taken => return Err(PersistError::RequestInFlight),
        };
        let region = &core.region;
        let state = core.shared.lock();
        Ok(VirtioMemState {
            addr: region.base().raw_value(),
            region_size: region.size(),
            block_size: region.block_size(),
            usable_region_size: state.usable,
            requested_size: state.requested,
            plugged_size: state.plugged,
            plugged: region
                .plugged_ranges()
                .into_iter()
                .map(|(a, l)| (a.raw_value(), l))
                .collect(),
            generation: state.generation,
            busy_pending: state.busy_pending,
            busy_retry_ms: state.busy_retry.as_millis() as u64,
            acked_features: self.acked_features,
            active_queue,
        })
    }

    /// Puts a device freshly created over a region whose plugged blocks are already the saved
    /// ones into `state` (the transport restores the features and the activation). A BUSY
    /// still pending gets its retry interrupt one retry delay after the restore.
    pub fn restore_state(&mut self, state: &VirtioMemState) -> Result<(), PersistError> {
        let region = &self.core.region;
        let (base, size, block) = (
            region.base().raw_value(),
            region.size(),
            region.block_size(),
        );
        if (state.addr, state.region_size, state.block_size) != (base, size, block) {
            return Err(PersistError::Geometry {
                saved_base: state.addr,
                saved_size: state.region_size,
                saved_block: state.block_size,
                base,
                size,
                block,
            });
        }
        let aligned = |v: u64| v.is_multiple_of(block) && v <= size;
        if !aligned(state.requested_size)
            || !aligned(state.usable_region_size)
            || !aligned(state.plugged_size)
        {
            return Err(PersistError::Inconsistent(
                "a size is not a block multiple within the region",
            ));
        }
        let plugged: Vec<(u64, u64)> = region
            .plugged_ranges()
            .into_iter()
            .map(|(a, l)| (a.raw_value(), l))
            .collect();
        if plugged != state.plugged || region.plugged_bytes() != state.plugged_size {
            return Err(PersistError::PluggedMismatch);
        }
        if state
            .plugged
            .last()
            .is_some_and(|&(a, l)| a + l - base > state.usable_region_size)
        {
            return Err(PersistError::Inconsistent(
                "plugged blocks lie past the usable region",
            ));
        }
        let mut s = self.core.shared.lock();
        s.requested = state.requested_size;
        s.usable = state.usable_region_size;
        s.plugged = state.plugged_size;
        s.generation = state.generation;
        s.busy_pending = state.busy_pending;
        s.busy_since = state.busy_pending.then(Instant::now);
        s.busy_retry =
            Duration::from_millis(state.busy_retry_ms).clamp(BUSY_RETRY_MIN, BUSY_RETRY_MAX);
        Ok(())
    }
}

#[cfg(test)]
#[path = "persist_tests.rs"]
mod tests;
