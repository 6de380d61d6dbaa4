//! The device's request queue: takes one chain at a time off it without the transport's lock
//! (a populate can take seconds), has the request carried out, and puts the answer on the used
//! ring. A reset while a request runs drops that request's answer.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use log::Level;

use crate::guest_log;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::hotplug_memory::HotplugMemory;
use super::metrics::{Timing, VirtioMemMetrics};
use super::request::*;
use super::shared::VirtioMemShared;
use super::spec::*;
use super::RangeState;
use crate::virtio::device::VirtioInterrupt;
use crate::virtio::{Error, Result};

/// The most chains one `process_queue` call handles, so that a driver that keeps the queue full
/// cannot hold the event loop for ever. The rest waits for the next notification.
const MAX_CHAINS_PER_CALL: usize = 4 * QUEUE_SIZE as usize;
/// The most descriptors of a chain looked at.
const MAX_CHAIN_DESCRIPTORS: usize = 16;

/// What the device holds while the driver runs it.
pub(super) struct Active {
    pub(super) mem: GuestMemoryMmap,
    pub(super) queue: Queue,
    pub(super) interrupt: Arc<dyn VirtioInterrupt>,
}

/// Where the activated queue lives. The queue's runner takes it out for the length of one
/// request (a populate can take seconds) and puts it back, so that the transport's side
/// (activation, reset) only ever waits for this lock's short critical sections.
pub(super) enum Slot {
    /// Not activated (or reset).
    Idle,
    /// Activated; nobody is processing the queue.
    Ready(Active),
    /// A runner has the queue out.
    Taken,
}

pub(super) struct QueueSlot {
    pub(super) slot: Slot,
    /// Bumped by every activation and reset: a runner that finds another epoch when it comes
    /// back from a request drops its queue without touching the rings.
    pub(super) epoch: u64,
    /// A notification came while the queue was out: the runner looks at the queue again.
    pub(super) pending: bool,
}

/// The part of the device its queue runner needs: shared between [`VirtioMem`] (on the
/// transport's side) and [`QueueRunner`] (on the worker's side).
pub(super) struct Core<R: HotplugMemory> {
    pub(super) region: Arc<R>,
    pub(super) shared: Arc<VirtioMemShared>,
    pub(super) queue: Mutex<QueueSlot>,
    pub(super) metrics: Arc<VirtioMemMetrics>,
}

/// A handle that runs the device's request queue from any thread (the vmm's worker), without
/// the transport's lock: guest MMIO accesses to the transport never wait for a populate.
pub struct QueueRunner<R: HotplugMemory>(pub(super) Arc<Core<R>>);

impl<R: HotplugMemory> Clone for QueueRunner<R> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<R: HotplugMemory> QueueRunner<R> {
    /// Processes what the driver made available, one request at a time. Returns at once when
    /// the device is not activated, or when another thread has the queue out (that thread then
    /// looks at the queue again). An error means the device cannot go on: the transport shows
    /// `DEVICE_NEEDS_RESET` and the driver gets a configuration interrupt.
    pub fn process(&self) -> Result<()> {
        self.0.process()
    }
}

impl<R: HotplugMemory> Core<R> {
    pub(super) fn slot(&self) -> MutexGuard<'_, QueueSlot> {
        // Every update of the slot is a plain store: it stays consistent after a panic.
        memory::lock(&self.queue)
    }

    /// See [`QueueRunner::process`].
    pub(super) fn process(&self) -> Result<()> {
        let (mut active, epoch) = {
            let mut q = self.slot();
            match std::mem::replace(&mut q.slot, Slot::Taken) {
                Slot::Ready(active) => {
                    q.pending = false;
                    (active, q.epoch)
                }
                other => {
                    if matches!(other, Slot::Taken) {
                        q.pending = true;
                    }
                    q.slot = other;
                    return Ok(());
                }
            }
        };
        let mut used = 0usize;
        loop {
            let start = Instant::now();
            let step = if active.queue.ready() && used < MAX_CHAINS_PER_CALL {
                self.next_chain(&mut active, start)
            } else {
                Ok(None)
            };
            // Back under the slot's lock: a reset may have come while the request ran.
            let mut q = self.slot();
            if q.epoch != epoch {
                return Ok(());
            }
            let result = match step {
                Ok(Some((head, reply))) => {
                    used += 1;
                    let (kind, sample, answer) = (
                        reply.timing.kind,
                        reply.timing.sample,
                        reply.response.answer,
                    );
                    let len = self.write_reply(&active.mem, reply);
                    let used = active.queue.add_used(&active.mem, head, len);
                    // The service time ends with the answer on the used ring; the interrupt
                    // that tells the driver is timed apart (on a busy host its eventfd write
                    // can wait for the CPU the woken vCPU takes).
                    let total = start.elapsed().as_nanos() as u64;
                    let t = Instant::now();
                    let r = used
                        .map_err(Error::Queue)
                        .and_then(|()| Self::notify(&mut active))
                        .map(|()| true);
                    let notify = t.elapsed().as_nanos() as u64;
                    self.metrics.of(kind).record(&sample, answer, total, notify);
                    r
                }
                Ok(None) => Ok(false),
                Err(e) => Err(e),
            };
            match result {
                Ok(true) => {}
                Ok(false) if q.pending && used < MAX_CHAINS_PER_CALL => q.pending = false,
                Ok(false) => {
                    q.pending = false;
                    q.slot = Slot::Ready(active);
                    return Ok(());
                }
                Err(e) => {
                    // The queue is broken: the transport shows DEVICE_NEEDS_RESET and stops
                    // forwarding notifications until the driver resets the device.
                    active.interrupt.device_failed();
                    q.pending = false;
                    q.slot = Slot::Ready(active);
                    return Err(e);
                }
            }
        }
    }

    /// Pops and carries out the next available chain; `None` when the queue is empty.
    fn next_chain(&self, active: &mut Active, start: Instant) -> Result<Option<(u16, Reply)>> {
        let chain = active.queue.iter(&active.mem).map_err(Error::Queue)?.next();
        let Some(chain) = chain else {
            return Ok(None);
        };
        let head = chain.head_index();
        let descs: Vec<Descriptor> = chain.take(MAX_CHAIN_DESCRIPTORS).collect();
        Ok(Some((head, self.handle_chain(&active.mem, &descs, start))))
    }

    /// Interrupts the driver for the used buffers, unless it asked not to be.
    fn notify(active: &mut Active) -> Result<()> {
        if active.queue.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.trigger_used()?;
        }
        Ok(())
    }

    /// Carries out the request of one chain; returns the response to write and where.
    fn handle_chain(&self, mem: &GuestMemoryMmap, descs: &[Descriptor], start: Instant) -> Reply {
        let mut timing = Timing::new(start);
        let response = match self.read_request(mem, descs).map(|w| Request::parse(&w)) {
            Some(Ok(req)) => {
                timing.kind = Some(req.kind);
                self.execute(req, &mut timing)
            }
            Some(Err(other)) => {
                guest_log!(
                    Level::Warn,
                    "virtio-mem unknown request type",
                    "virtio-mem: unknown request type {other}"
                );
                ERROR
            }
            None => {
                guest_log!(
                    Level::Warn,
                    "virtio-mem malformed chain",
                    "virtio-mem: malformed request chain"
                );
                ERROR
            }
        };
        timing.validated();
        let out = descs
            .iter()
            .find(|d| d.is_write_only())
            .map(|d| (d.addr(), RESPONSE_SIZE.min(d.len() as usize)));
        Reply {
            response,
            out,
            timing,
        }
    }

    /// The request of a well-shaped chain: a device-readable descriptor of at least 24 bytes
    /// followed by a device-writable one of at least 10, both in guest memory the device may
    /// access (so that no request is carried out whose answer cannot be delivered).
    fn read_request(&self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Option<VirtioMemReq> {
        let (input, output) = (descs.first()?, descs.get(1)?);
        if input.is_write_only()
            || (input.len() as usize) < REQUEST_SIZE
            || !output.is_write_only()
            || (output.len() as usize) < RESPONSE_SIZE
            || !self.buffer_ok(input.addr(), REQUEST_SIZE as u64)
            || !self.buffer_ok(output.addr(), RESPONSE_SIZE as u64)
            || !GuestMemoryBackend::check_range(mem, output.addr(), RESPONSE_SIZE)
        {
            return None;
        }
        mem.read_obj(input.addr()).ok()
    }

    /// Writes a reply into guest memory; returns the number of bytes written for the used ring.
    fn write_reply(&self, mem: &GuestMemoryMmap, reply: Reply) -> u32 {
        let Some((addr, len)) = reply.out else {
            return 0;
        };
        if !self.buffer_ok(addr, len as u64) {
            guest_log!(
                Level::Warn,
                "virtio-mem response in unplugged memory",
                "virtio-mem: response buffer in unplugged hotplug memory"
            );
            return 0;
        }
        match mem.write_slice(&reply.response.to_wire().as_slice()[..len], addr) {
            Ok(()) => len as u32,
            Err(e) => {
                guest_log!(
                    Level::Warn,
                    "virtio-mem response unwritable",
                    "virtio-mem: cannot write the response: {e}"
                );
                0
            }
        }
    }

    /// Whether the guest buffer `[addr, addr + len)` may be accessed: it must not touch blocks
    /// of the hotplug region that are not plugged (they may be inaccessible host memory).
    fn buffer_ok(&self, addr: GuestAddress, len: u64) -> bool {
        let Some(end) = addr.raw_value().checked_add(len) else {
            return false;
        };
        let base = self.shared.layout.base.0;
        let region_end = base + self.shared.layout.size;
        let start = addr.raw_value().max(base);
        let end = end.min(region_end);
        if start >= end {
            return true;
        }
        let bs = self.shared.layout.block_size;
        let first = start - (start - base) % bs;
        let last = end.div_ceil(bs).saturating_mul(bs).min(region_end);
        matches!(
            self.region.state(GuestAddress(first), last - first),
            Ok(RangeState::Plugged)
        )
    }
}

/// A response, the buffer it goes to (address and length) and what the request cost.
struct Reply {
    response: Response,
    out: Option<(GuestAddress, usize)>,
    timing: Timing,
}
