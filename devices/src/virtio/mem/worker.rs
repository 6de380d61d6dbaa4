//! The device's worker thread: it owns the activated queue's notifications and runs the queue
//! without the transport's lock, so that a long populate never stalls the event loop, the API
//! or a vCPU (guest MMIO accesses to the device, the interrupt status read of the guest's
//! interrupt handler included, take only the transport's lock, which no populate holds). It
//! also runs the retry timer after BUSY, and starts the populate-ahead thread ([`super::ahead`]).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::ahead::Ahead;
use super::hotplug_memory::HotplugMemory;
use super::metrics::VirtioMemMetrics;
use super::queue::QueueRunner;
use super::shared::VirtioMemShared;
use super::VirtioMem;
use crate::virtio::{Error, Result};

/// The longest the worker sleeps between looks at the BUSY retry timer (ms).
const LONGEST_WAIT_MS: i32 = 1000;

/// The threads of one virtio-mem device: the queue worker and, when asked for, the
/// populate-ahead thread.
pub struct VirtioMemWorker<R: HotplugMemory + 'static> {
    runner: QueueRunner<R>,
    shared: Arc<VirtioMemShared>,
    region: Arc<R>,
    metrics: Arc<VirtioMemMetrics>,
    stop: Arc<EventFd>,
    changed: Arc<EventFd>,
    populate_ahead: bool,
    threads: Vec<JoinHandle<()>>,
}

fn event_fd() -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)
}

impl<R: HotplugMemory + 'static> VirtioMemWorker<R> {
    /// The (not yet started) threads of `device`; `populate_ahead` adds the populate-ahead one.
    pub fn new(device: &VirtioMem<R>, populate_ahead: bool) -> Result<Self> {
        Ok(Self {
            runner: device.queue_runner(),
            shared: device.shared(),
            region: device.region().clone(),
            metrics: device.metrics(),
            stop: Arc::new(event_fd()?),
            changed: Arc::new(event_fd()?),
            populate_ahead,
            threads: Vec::new(),
        })
    }

    /// A new handle on the event fd signalled after every batch of requests the worker handled
    /// (the memory state may have changed): the API wakes its long polls with it.
    pub fn changed_evt(&self) -> std::io::Result<EventFd> {
        self.changed.try_clone()
    }

    /// Starts the threads; `queue_evts` are the transport's queue notifications (ioeventfds).
    pub fn start(&mut self, queue_evts: Vec<EventFd>) -> Result<()> {
        let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> =
            EventManager::new().map_err(Error::EventManager)?;
        let done = Arc::new(AtomicBool::new(false));
        let ahead_kick = if self.populate_ahead {
            let kick = Arc::new(event_fd()?);
            self.shared.notify_resize(kick.clone());
            Some(kick)
        } else {
            None
        };
        em.add_subscriber(Box::new(QueueWorker {
            runner: self.runner.clone(),
            queue_evts,
            stop: self.stop.clone(),
            changed: self.changed.clone(),
            ahead_kick: ahead_kick.clone(),
            done: done.clone(),
        }));
        if let Some(kick) = ahead_kick {
            let ahead = Ahead::new(
                self.region.clone(),
                self.shared.clone(),
                self.metrics.clone(),
                kick.clone(),
                self.stop.clone(),
            )?;
            let _ = kick.write(1);
            self.threads.push(
                std::thread::Builder::new()
                    .name("virtio-mem-ahead".into())
                    .spawn(move || ahead.run())
                    .map_err(|e| Error::Thread("the populate-ahead thread", e))?,
            );
        }
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("virtio-mem".into())
            .spawn(move || {
                let mut timeout_ms = LONGEST_WAIT_MS;
                while !done.load(Ordering::SeqCst) {
                    if let Err(e) = em.run_with_timeout(timeout_ms) {
                        log::error!("virtio-mem worker: {e:?}");
                        break;
                    }
                    // After a BUSY, tell the driver when to try again (Linux's own back-off
                    // would wait 50 s or more).
                    timeout_ms = match shared.poll_busy_retry(Instant::now()) {
                        Some(due) => (due.as_millis() as i32).clamp(1, LONGEST_WAIT_MS),
                        None => LONGEST_WAIT_MS,
                    };
                }
            })
            .map_err(|e| Error::Thread("the virtio-mem worker", e))?;
        self.threads.push(handle);
        Ok(())
    }

    /// Stops the threads and waits for them.
    pub fn stop(&mut self) {
        let _ = self.stop.write(1);
        for h in self.threads.drain(..).rev() {
            let _ = h.join();
        }
    }
}

struct QueueWorker<R: HotplugMemory> {
    runner: QueueRunner<R>,
    queue_evts: Vec<EventFd>,
    stop: Arc<EventFd>,
    changed: Arc<EventFd>,
    ahead_kick: Option<Arc<EventFd>>,
    done: Arc<AtomicBool>,
}

const STOP: u32 = u32::MAX;

fn watch(ops: &mut EventOps, fd: &EventFd, data: u32, what: &str) {
    if let Err(e) = ops.add(Events::with_data_raw(fd.as_raw_fd(), data, EventSet::IN)) {
        log::error!("cannot watch {what}: {e:?}");
    }
}

impl<R: HotplugMemory> MutEventSubscriber for QueueWorker<R> {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            watch(ops, evt, i as u32, "a virtio-mem queue");
        }
        watch(ops, &self.stop, STOP, "the virtio-mem worker's stop");
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            STOP => self.done.store(true, Ordering::SeqCst),
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
                    crate::guest_log!(
                        log::Level::Error,
                        "virtio-mem queue failed",
                        "virtio-mem: the queue failed, the device needs reset: {e}"
                    );
                }
                let _ = self.changed.write(1);
                if let Some(kick) = &self.ahead_kick {
                    let _ = kick.write(1);
                }
            }
        }
    }
}
