//! Wires the virtio-mem device to KVM: its virtio-mmio window on the MMIO bus, an ioeventfd on
//! its queue-notify register, an irqfd for its interrupt, and the start of the device's own
//! threads ([`VirtioMemWorker`]: the queue worker, the BUSY retry timer, populate ahead).

use std::sync::{Arc, Mutex};

use devices::bus::{lock, SharedDevice};
use devices::virtio::mem::metrics::VirtioMemMetrics;
use devices::virtio::mem::{VirtioMem, VirtioMemShared, VirtioMemWorker};
use devices::virtio::mmio::{MmioTransport, NOTIFY_REG_OFFSET};
use kvm_ioctls::{IoEventAddress, VmFd};
use memory::HotplugRegion;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::{Error, Result};

type Transport = MmioTransport<VirtioMem<HotplugRegion>>;

/// The virtio-mem device as the VMM holds it.
pub struct MemDevice {
    transport: Arc<Mutex<Transport>>,
    shared: Arc<VirtioMemShared>,
    region: Arc<HotplugRegion>,
    metrics: Arc<VirtioMemMetrics>,
    worker: VirtioMemWorker<HotplugRegion>,
}

impl MemDevice {
    /// Creates the device over `region` with `requested` bytes requested, its transport at `base`
    /// and its interrupt on IOAPIC pin `irq`. Queues live in `boot_mem`.
    pub fn new(
        vm: &VmFd,
        region: Arc<HotplugRegion>,
        requested: u64,
        boot_mem: GuestMemoryMmap,
        base: u64,
        irq: u32,
        populate_ahead: bool,
    ) -> Result<Self> {
        let mem = VirtioMem::new(region.clone(), requested).map_err(Error::VirtioMem)?;
        let shared = mem.shared();
        let metrics = mem.metrics();
        let transport = MmioTransport::new(mem, boot_mem).map_err(Error::VirtioMem)?;
        for (i, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET),
                i as u32,
            )
            .map_err(|e| Error::Vm("register the virtio-mem ioeventfd", e))?;
        }
        vm.register_irqfd(transport.interrupt().evt(), irq)
            .map_err(|e| Error::Vm("register the virtio-mem irqfd", e))?;
        let worker =
            VirtioMemWorker::new(transport.device(), populate_ahead).map_err(Error::VirtioMem)?;
        Ok(Self {
            metrics,
            transport: Arc::new(Mutex::new(transport)),
            shared,
            region,
            worker,
        })
    }

    /// The transport as a bus device (for the MMIO bus).
    pub fn bus_device(&self) -> SharedDevice {
        self.transport.clone()
    }

    /// What the API reads and changes without taking the device lock.
    pub fn shared(&self) -> &Arc<VirtioMemShared> {
        &self.shared
    }

    /// The hotplug region.
    pub fn region(&self) -> &Arc<HotplugRegion> {
        &self.region
    }

    /// The device's per-request metrics.
    pub fn metrics(&self) -> &Arc<VirtioMemMetrics> {
        &self.metrics
    }

    /// Whether the guest's driver failed the device during the run, in words: it set FAILED,
    /// the device needed a reset (DEVICE_NEEDS_RESET), or Tide answered a request ERROR (after
    /// which Linux's driver stops using the device). Read from the transport's status register
    /// record and the request counts.
    pub fn driver_failure(&self) -> Option<String> {
        use virtio_bindings::virtio_config::{
            VIRTIO_CONFIG_S_FAILED as FAILED, VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
        };
        let seen = lock(&self.transport).failures_seen();
        let m = self.metrics.snapshot();
        let errors = [&m.plug, &m.unplug, &m.unplug_all, &m.state, &m.invalid]
            .iter()
            .map(|r| r.error)
            .sum::<u64>();
        let mut what = Vec::new();
        if seen & FAILED != 0 {
            what.push("the driver set FAILED".to_string());
        }
        if seen & NEEDS_RESET != 0 {
            what.push("the device needed a reset (DEVICE_NEEDS_RESET)".to_string());
        }
        if errors > 0 {
            what.push(format!("Tide answered {errors} request(s) ERROR"));
        }
        (!what.is_empty()).then(|| {
            format!(
                "the guest's virtio-mem driver failed the device: {}",
                what.join(", ")
            )
        })
    }

    /// A new handle on the event fd signalled after every batch of requests the worker handled
    /// (the memory state may have changed): the API wakes its long polls with it.
    pub fn changed_evt(&self) -> Result<EventFd> {
        self.worker
            .changed_evt()
            .map_err(|e| Error::Io("cannot duplicate an event fd", e))
    }

    /// Starts the device's threads.
    pub fn start(&mut self) -> Result<()> {
        let queue_evts = lock(&self.transport)
            .queue_evts()
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Error::Io("cannot duplicate an event fd", e))?;
        self.worker.start(queue_evts).map_err(Error::VirtioMem)
    }

    /// Stops the device's threads and unplugs everything (the host gets the memory back).
    pub fn stop(&mut self) {
        self.region.stop_populates();
        self.worker.stop();
        if let Err(e) = self.region.discard_all() {
            log::warn!("cannot discard the hotplug region at exit: {e}");
        }
    }
}
