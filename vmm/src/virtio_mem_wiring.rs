//! Wires the virtio-mem device to KVM and to threads: its virtio-mmio window on the MMIO bus, an
//! ioeventfd on its queue-notify register, an irqfd for its interrupt, and a worker thread that
//! owns the activated queue and runs it without the transport's lock, so that a long populate
//! never stalls the event loop, the API or a vCPU (guest MMIO accesses to the device, the
//! interrupt status read of the guest's interrupt handler included, take only the transport's
//! lock, which no populate holds). The worker also runs the device's retry timer after BUSY.
//!
//! A second thread populates ahead: when the requested size grows it backs, outside the
//! guest's view, the blocks Linux's driver will plug next (the lowest unplugged ones of the
//! usable region), one 128 MiB memory block at a time, so that the PLUG finds them ready while
//! the guest is still onlining the previous block. It gives them back when the requested size
//! falls, and after [`AHEAD_IDLE`] without a plug.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::{lock, SharedDevice};
use devices::virtio::mem::{VirtioMem, VirtioMemQueue, VirtioMemShared};
use devices::virtio::metrics::VirtioMemMetrics;
use devices::virtio::mmio::{MmioTransport, NOTIFY_REG_OFFSET};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use memory::HotplugRegion;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::event_loop::watch;
use crate::{Error, Result};

/// What is populated ahead at a time, aligned in guest physical memory: Linux's memory block
/// on x86_64, which its driver plugs in one request.
pub const AHEAD_CHUNK: u64 = 128 << 20;
/// Memory populated ahead is given back after this long without a plug.
pub const AHEAD_IDLE: Duration = Duration::from_secs(10);

type Transport = MmioTransport<VirtioMem<HotplugRegion>>;

/// The virtio-mem device as the VMM holds it.
pub struct MemDevice {
    transport: Arc<Mutex<Transport>>,
    shared: Arc<VirtioMemShared>,
    region: Arc<HotplugRegion>,
    stop: Arc<EventFd>,
    changed: Arc<EventFd>,
    worker: Option<JoinHandle<()>>,
    metrics: Arc<VirtioMemMetrics>,
    /// Wakes the populate-ahead thread (resize, request handled); `None` without it.
    ahead_kick: Option<Arc<EventFd>>,
    ahead: Option<JoinHandle<()>>,
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
        let stop = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| Error::Io("cannot create an event fd", e))?;
        let changed = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| Error::Io("cannot create an event fd", e))?;
        let ahead_kick = if populate_ahead {
            let evt = Arc::new(
                EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|e| Error::Io("cannot create an event fd", e))?,
            );
            shared.notify_resize(evt.clone());
            Some(evt)
        } else {
            None
        };
        Ok(Self {
            metrics,
            ahead_kick,
            ahead: None,
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

    /// The device's per-request metrics.
    pub fn metrics(&self) -> &Arc<VirtioMemMetrics> {
        &self.metrics
    }

    /// Whether the guest's driver failed the device during the run, in words: it set FAILED,
    /// the device needed a reset (DEVICE_NEEDS_RESET), or Tide answered a request ERROR (after
    /// which Linux's driver stops using the device). Read from the transport's status register
    /// record and the request counts.
    pub fn driver_failure(&self) -> Option<String> {
        use devices::virtio::mmio::{STATUS_DEVICE_NEEDS_RESET, STATUS_FAILED};
        let seen = lock(&self.transport).failures_seen();
        let m = self.metrics.snapshot();
        let errors = [&m.plug, &m.unplug, &m.unplug_all, &m.state, &m.invalid]
            .iter()
            .map(|r| r.error)
            .sum::<u64>();
        let mut what = Vec::new();
        if seen & STATUS_FAILED != 0 {
            what.push("the driver set FAILED".to_string());
        }
        if seen & STATUS_DEVICE_NEEDS_RESET != 0 {
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
            ahead_kick: self.ahead_kick.clone(),
            done: done.clone(),
        }));
        if let Some(kick) = &self.ahead_kick {
            let ahead = Ahead {
                region: self.region.clone(),
                shared: self.shared.clone(),
                metrics: self.metrics.clone(),
                kick: kick.clone(),
                stop: self.stop.clone(),
            };
            let _ = kick.write(1);
            self.ahead = Some(
                std::thread::Builder::new()
                    .name("virtio-mem-ahead".into())
                    .spawn(move || ahead.run())
                    .map_err(|e| Error::Io("cannot start the populate-ahead thread", e))?,
            );
        }
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
        if let Some(h) = self.ahead.take() {
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
    ahead_kick: Option<Arc<EventFd>>,
    done: Arc<std::sync::atomic::AtomicBool>,
}

const STOP: u32 = u32::MAX;

impl MutEventSubscriber for QueueWorker {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            watch(ops, evt.as_raw_fd(), i as u32, "a virtio-mem queue");
        }
        watch(
            ops,
            self.stop.as_raw_fd(),
            STOP,
            "the virtio-mem worker's stop",
        );
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
                if let Some(kick) = &self.ahead_kick {
                    let _ = kick.write(1);
                }
            }
        }
    }
}

/// The populate-ahead thread (see the module documentation).
struct Ahead {
    region: Arc<HotplugRegion>,
    shared: Arc<VirtioMemShared>,
    metrics: Arc<VirtioMemMetrics>,
    kick: Arc<EventFd>,
    stop: Arc<EventFd>,
}

impl Ahead {
    /// Waits up to `timeout` (`None`: for ever) for a kick or the stop; returns false on stop.
    fn wait(&self, timeout: Option<Duration>) -> bool {
        let mut fds = [
            libc::pollfd {
                fd: self.kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: `fds` is a valid array of two pollfd for the length of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n > 0 && fds[1].revents != 0 {
            return false;
        }
        if n > 0 && fds[0].revents != 0 {
            let _ = self.kick.read();
        }
        true
    }

    fn release(&self, keep: u64) {
        let n = self.region.release_ahead(keep);
        self.metrics.ahead_released_bytes.fetch_add(n, Relaxed);
    }

    fn run(self) {
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
