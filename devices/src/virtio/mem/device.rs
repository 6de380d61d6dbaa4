//! The virtio-mem device: creation over a hotplug region, feature negotiation, activation and
//! reset. Its queue runs in [`super::queue`], its requests in `handler`.

use std::sync::{Arc, Mutex};

use log::debug;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::Queue;
use vm_memory::{ByteValued, GuestMemoryMmap};

use super::hotplug_memory::HotplugMemory;
use super::metrics::VirtioMemMetrics;
use super::queue::{Active, Core, QueueRunner, QueueSlot, Slot};
use super::shared::{SizeState, VirtioMemShared, BUSY_RETRY_MIN};
use super::spec::*;
use super::UnpluggedAccess;
use crate::virtio::device::{VirtioDevice, VirtioInterrupt};
use crate::virtio::{Error, Result};

/// The virtio-mem device over the hotplug memory `R`.
pub struct VirtioMem<R: HotplugMemory> {
    core: Arc<Core<R>>,
    acked_features: u64,
    queue_sizes: [u16; 1],
}

impl<R: HotplugMemory> VirtioMem<R> {
    /// A virtio-mem device over `region` that asks the guest to plug `requested_size` bytes.
    ///
    /// The region's block size must be a power of two, its base and size non-zero multiples of
    /// it; `requested_size` must be a multiple of the block size no larger than the region.
    /// Blocks already plugged in the region count as plugged.
    pub fn new(region: Arc<R>, requested_size: u64) -> Result<Self> {
        let layout = memory::HotplugLayout {
            base: region.base(),
            size: region.size(),
            block_size: region.block_size(),
        };
        layout.check(1, "").map_err(|_| Error::BadRegion {
            base: layout.base.0,
            size: layout.size,
            block_size: layout.block_size,
        })?;
        let shared = Arc::new(VirtioMemShared {
            layout,
            state: Mutex::new(SizeState {
                requested: 0,
                plugged: 0,
                usable: 0,
                generation: 0,
                busy_pending: false,
                busy_since: None,
                busy_retry: BUSY_RETRY_MIN,
                interrupt: None,
            }),
            resize_evt: Mutex::new(None),
        });
        let core = Core {
            region,
            shared,
            queue: Mutex::new(QueueSlot {
                slot: Slot::Idle,
                epoch: 0,
                pending: false,
            }),
            metrics: Arc::default(),
        };
        // Blocks plugged before: the usable region must cover them (it never shrinks below).
        let plugged = core.region.plugged_bytes();
        if plugged != 0 {
            let mut state = core.shared.lock();
            state.usable = core.highest_plugged_end();
        }
        core.shared.set_plug_state(plugged, false);
        core.shared.set_requested_size(requested_size)?;
        Ok(Self {
            core: Arc::new(core),
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE],
        })
    }

    /// The state the vmm's API thread uses.
    pub fn shared(&self) -> Arc<VirtioMemShared> {
        self.core.shared.clone()
    }

    /// The device's per-request metrics.
    pub fn metrics(&self) -> Arc<VirtioMemMetrics> {
        self.core.metrics.clone()
    }

    /// The hotplug memory behind the device.
    pub fn region(&self) -> &Arc<R> {
        &self.core.region
    }

    /// The handle that runs the request queue off the transport's lock.
    pub(crate) fn queue_runner(&self) -> QueueRunner<R> {
        QueueRunner(self.core.clone())
    }
}

impl<R: HotplugMemory> VirtioDevice for VirtioMem<R> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_MEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)
    }

    /// A driver that does not accept `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE` may read unplugged
    /// memory. That costs nothing on private anonymous memory (the zero page), but a read of a
    /// hole in shared file-backed memory (memfd, hugetlb, files) allocates: there the features
    /// are refused (so is `FEATURES_OK`), as Firecracker does.
    fn set_acked_features(&mut self, features: u64) -> Result<()> {
        let features = features & self.avail_features();
        let region = &self.core.region;
        let access = if features & (1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE) != 0 {
            UnpluggedAccess::Inaccessible
        } else if region.unplugged_reads_allocate() {
            return Err(Error::UnpluggedInaccessibleRequired);
        } else {
            UnpluggedAccess::Readable
        };
        region
            .set_unplugged_access(access)
            .map_err(|e| Error::Hotplug(Box::new(e)))?;
        self.acked_features = features;
        Ok(())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let config = self.core.shared.config();
        let config = config.as_slice();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= CONFIG_SIZE {
            return;
        }
        let n = data.len().min(CONFIG_SIZE - start);
        data[..n].copy_from_slice(&config[start..start + n]);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        debug!("virtio-mem: write to read-only config at {offset:#x} ignored");
    }

    fn config_generation(&self) -> u32 {
        self.core.shared.config_generation()
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<()> {
        let got = queues.len();
        let Ok([queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err(Error::QueueCount { expected: 1, got });
        };
        self.core.shared.lock().interrupt = Some(interrupt.clone());
        let mut q = self.core.slot();
        q.epoch = q.epoch.wrapping_add(1);
        q.pending = false;
        q.slot = Slot::Ready(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<()> {
        if index != 0 {
            return Err(Error::BadQueueIndex(index));
        }
        if matches!(self.core.slot().slot, Slot::Idle) {
            return Err(Error::NotActivated);
        }
        self.core.process()
    }

    /// A device reset keeps the plug state (virtio 1.2 section 5.15.5: the device MUST NOT
    /// change the state of memory blocks during device reset): Linux resets the device with
    /// memory online (driver unbind, kexec), and the next driver finds `plugged_size` and sends
    /// UNPLUG_ALL itself. It never waits for a request in flight: that request completes in
    /// the region, but its answer is dropped.
    fn reset(&mut self) {
        {
            let mut q = self.core.slot();
            q.epoch = q.epoch.wrapping_add(1);
            q.pending = false;
            q.slot = Slot::Idle;
        }
        self.acked_features = 0;
        let mut state = self.core.shared.lock();
        state.interrupt = None;
        VirtioMemShared::clear_busy(&mut state);
    }
}
