//! The saved state of a virtio-mmio transport ([`MmioTransportState`]), for snapshots: the
//! registers the driver wrote, the interrupt status and each queue's configuration.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK as STATUS_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK as STATUS_FEATURES_OK,
};

use super::MmioTransport;
use crate::virtio::device::VirtioDevice;
use crate::virtio::{Error, Result};

/// One virtqueue's configuration and ring positions (virtio-queue's `QueueState`, with serde).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePersist {
    /// Largest size the device offers.
    pub max_size: u16,
    /// The driver's chosen size.
    pub size: u16,
    /// Whether the driver made the queue ready.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
    /// Next available-ring entry the device takes.
    pub next_avail: u16,
    /// Next used-ring entry the device fills.
    pub next_used: u16,
    /// Whether `VIRTIO_F_RING_EVENT_IDX` is in use.
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueuePersist {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl QueuePersist {
    /// A queue with this state, validated by virtio-queue (an untrusted file may hold any
    /// values).
    pub fn to_queue(self) -> Result<Queue> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(Error::Queue)
    }
}

/// What a virtio-mmio transport holds besides its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The device-features page the driver selected.
    pub device_features_select: u32,
    /// The driver-features page the driver selected.
    pub driver_features_select: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// The queue the driver selected.
    pub queue_select: u32,
    /// The status bits the driver set.
    pub status: u32,
    /// Whether the device needs a reset.
    pub needs_reset: bool,
    /// Whether the device was activated.
    pub activated: bool,
    /// The interrupt status register.
    pub interrupt_status: u32,
    /// Whether the device failed on its own thread.
    pub failed: bool,
    /// The transport's copy of each queue (the configuration the driver wrote).
    pub queues: Vec<QueuePersist>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// The device behind the transport, mutably: to restore its own state before
    /// [`Self::restore_state`].
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The transport's state (its device's own state is saved by the device).
    pub fn save_state(&self) -> MmioTransportState {
        MmioTransportState {
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            status: self.status,
            needs_reset: self.needs_reset,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            failed: self.interrupt.has_failed(),
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
        }
    }

    /// Puts a fresh transport (its device freshly created) into `state`. The features are
    /// acknowledged to the device again when the saved status has `FEATURES_OK`; when the
    /// device was activated, it is activated again with `active` (the device's own queues,
    /// whose ring positions moved on since activation), or with the transport's copies when
    /// `active` is `None`. Fails on state no transport of this device can be in.
    pub fn restore_state(
        &mut self,
        state: &MmioTransportState,
        active: Option<Vec<QueuePersist>>,
    ) -> Result<()> {
        if state.queues.len() != self.queues.len() {
            return Err(Error::QueueCount {
                expected: self.queues.len(),
                got: state.queues.len(),
            });
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (saved, own) in state.queues.iter().zip(&self.queues) {
            if saved.max_size != own.max_size() {
                return Err(Error::QueueCount {
                    expected: usize::from(own.max_size()),
                    got: usize::from(saved.max_size),
                });
            }
            queues.push(saved.to_queue()?);
        }
        self.queues = queues;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.driver_features = state.driver_features;
        self.queue_select = state.queue_select;
        self.status = state.status;
        self.needs_reset = state.needs_reset;
        self.activated = false;
        if state.status & STATUS_FEATURES_OK != 0 {
            self.device.set_acked_features(state.driver_features)?;
        }
        if state.activated {
            if state.status & STATUS_DRIVER_OK == 0 {
                return Err(Error::NotActivated);
            }
            let saved = active.unwrap_or_else(|| state.queues.clone());
            let copies = saved
                .into_iter()
                .map(QueuePersist::to_queue)
                .collect::<Result<Vec<_>>>()?;
            self.device
                .activate(self.mem.clone(), copies, self.interrupt.clone())?;
            self.activated = true;
        }
        self.interrupt.restore(state.interrupt_status, state.failed);
        // The device's record of its driver (health) follows the restored status register.
        let status = self.status();
        self.device.driver_status(status, None);
        Ok(())
    }
}
