//! Wires the virtio-mem device to KVM and to threads: its virtio-mmio window on the MMIO bus, an
//! ioeventfd on its queue-notify register, an irqfd for its interrupt, and a worker thread that
//! owns the activated queue and runs it without the transport's lock, so that a long populate
//! never stalls the event loop, the API or a vCPU (guest MMIO accesses to the device, the
//! interrupt status read of the guest's interrupt handler included, take only the transport's
//! lock, which no populate holds). The worker also runs the device's retry timer after BUSY.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::bus::{lock, SharedDevice};
use devices::virtio::mem::{VirtioMem, VirtioMemQueue, VirtioMemShared};
use devices::virtio::mmio::MmioTransport;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use memory::HotplugRegion;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::{Error, Result};

/// Offset of the QueueNotify register in a virtio-mmio window.
const QUEUE_NOTIFY: u64 = 0x50;

type Transport = MmioTransport<VirtioMem<HotplugRegion>>;

/// The virtio-mem device as the VMM holds it.
pub struct MemDevice {
    transport: Arc<Mutex<Transport>>,
    shared: Arc<VirtioMemShared>,
    region: Arc<HotplugRegion>,
    stop: Arc<EventFd>,
    changed: Arc<EventFd>,
    worker: Option<JoinHandle<()>>,
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
    ) -> Result<Self> {
        let dev_err = |e: devices::virtio::Error| Error::Device(format!("virtio-mem: {e}"));
        let mem = VirtioMem::new(region.clone(), requested).map_err(dev_err)?;
        let shared = mem.shared();
        let transport = MmioTransport::new(mem, boot_mem).map_err(dev_err)?;
        for (i, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), i as u32)
                .map_err(|e| Error::Vm("register the virtio-mem ioeventfd", e))?;
        }
        vm.register_irqfd(transport.interrupt().evt(), irq)
            .map_err(|e| Error::Vm("register the virtio-mem irqfd", e))?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| Error::Io("cannot create an event fd", e))?;
        let changed = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| Error::Io("cannot create an event fd", e))?;
        Ok(Self {
            transport: Arc::new(Mutex::new(transport)),
            shared,
            region,
            stop: Arc::new(stop),
            changed: Arc::new(changed),
            worker: None,
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

    /// A new handle on the event fd signalled after every batch of requests the worker handled
    /// (the memory state may have changed): the API wakes its long polls with it.
    pub fn changed_evt(&self) -> Result<EventFd> {
        self.changed
            .try_clone()
            .map_err(|e| Error::Io("cannot duplicate an event fd", e))
    }

    /// Starts the queue worker thread.
    pub fn start(&mut self) -> Result<()> {
        let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> =
            EventManager::new().map_err(Error::EventManager)?;
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (runner, queue_evts) = {
            let t = lock(&self.transport);
            let evts = t
                .queue_evts()
                .iter()
                .map(EventFd::try_clone)
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| Error::Io("cannot duplicate an event fd", e))?;
            (t.device().queue_runner(), evts)
        };
        em.add_subscriber(Box::new(QueueWorker {
            runner,
            queue_evts,
            stop: self.stop.clone(),
            changed: self.changed.clone(),
            done: done.clone(),
        }));
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("virtio-mem".into())
            .spawn(move || {
                let mut timeout_ms = 1000;
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Err(e) = em.run_with_timeout(timeout_ms) {
                        log::error!("virtio-mem worker: {e:?}");
                        break;
                    }
                    // After a BUSY, tell the driver when to try again (Linux's own back-off
                    // would wait 50 s or more).
                    timeout_ms = match shared.poll_busy_retry(std::time::Instant::now()) {
                        Some(due) => (due.as_millis() as i32).clamp(1, 1000),
                        None => 1000,
                    };
                }
            })
            .map_err(|e| Error::Io("cannot start the virtio-mem worker", e))?;
        self.worker = Some(handle);
        Ok(())
    }

    /// Stops the worker thread and unplugs everything (the host gets the memory back).
    pub fn stop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
        if let Err(e) = self.region.discard_all() {
            log::warn!("cannot discard the hotplug region at exit: {e}");
        }
    }
}

struct QueueWorker {
    runner: VirtioMemQueue<HotplugRegion>,
    queue_evts: Vec<EventFd>,
    stop: Arc<EventFd>,
    changed: Arc<EventFd>,
    done: Arc<std::sync::atomic::AtomicBool>,
}

const STOP: u32 = u32::MAX;

impl MutEventSubscriber for QueueWorker {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data_raw(
                evt.as_raw_fd(),
                i as u32,
                EventSet::IN,
            )) {
                log::error!("virtio-mem worker cannot watch queue {i}: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::with_data_raw(
            self.stop.as_raw_fd(),
            STOP,
            EventSet::IN,
        )) {
            log::error!("virtio-mem worker cannot watch its stop fd: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            STOP => self.done.store(true, std::sync::atomic::Ordering::SeqCst),
            i => {
                if let Some(evt) = self.queue_evts.get(i as usize) {
                    if let Err(e) = evt.read() {
                        if e.kind() != std::io::ErrorKind::WouldBlock {
                            log::warn!("virtio-mem worker: cannot read queue {i} event fd: {e}");
                        }
                    }
                }
                // Without the transport's lock; a failure marks the device DEVICE_NEEDS_RESET
                // through its interrupt.
                if let Err(e) = self.runner.process() {
                    log::error!("virtio-mem: the queue failed, the device needs reset: {e}");
                }
                let _ = self.changed.write(1);
            }
        }
    }
}
