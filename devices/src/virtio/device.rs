//! What a virtio device and its transport know of each other, whatever the transport: the
//! [`VirtioDevice`] a transport drives, and the [`VirtioInterrupt`] a device raises.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::Result;

/// The interrupt line a transport gives an activated device. Devices keep an `Arc` of it and
/// raise it from whatever thread they run on.
pub trait VirtioInterrupt: Send + Sync + std::fmt::Debug {
    /// Tells the driver that the device used buffers.
    fn trigger_used(&self) -> Result<()>;
    /// Tells the driver that the device configuration changed.
    fn trigger_config(&self) -> Result<()>;
    /// The device cannot go on (called from whatever thread runs its queue): the transport
    /// shows that the device needs a reset, and the driver gets a configuration interrupt.
    fn device_failed(&self);
}

/// A virtio device, whatever transport it sits behind (Tide has [`super::MmioTransport`]).
pub trait VirtioDevice: Send {
    /// The virtio device ID (24 for virtio-mem).
    fn device_type(&self) -> u32;
    /// The maximum size of each of the device's queues; its length is the number of queues.
    /// Each size must be a power of two no larger than 32768.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers, `VIRTIO_F_VERSION_1` (bit 32) included.
    fn avail_features(&self) -> u64;
    /// The features the driver acknowledged (a subset of [`Self::avail_features`] with
    /// `VIRTIO_F_VERSION_1`). An error makes the transport refuse `FEATURES_OK`.
    fn set_acked_features(&mut self, features: u64) -> Result<()>;
    /// Reads `data.len()` bytes (1, 2, 4 or 8) of the configuration space at `offset`.
    /// Bytes past the end of the configuration space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes `data` into the configuration space at `offset`; read-only fields ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The configuration generation: it changes whenever the configuration space changes.
    fn config_generation(&self) -> u32 {
        0
    }
    /// The driver set `DRIVER_OK`: from now on the device uses `queues` (one per entry of
    /// [`Self::queue_max_sizes`], validated when ready) over `mem` and signals `interrupt`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<()>;
    /// The driver notified queue `index`: process what it made available. An error means the
    /// device cannot go on; the transport then sets `DEVICE_NEEDS_RESET`.
    fn process_queue(&mut self, index: usize) -> Result<()>;
    /// The driver reset the device: go back to the state before activation.
    fn reset(&mut self);
}
