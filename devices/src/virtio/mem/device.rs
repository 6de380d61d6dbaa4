//! The virtio-mem device: feature negotiation, activation and reset, and its request queue.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use log::{debug, Level};

use crate::guest_log;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::hotplug_memory::HotplugMemory;
use super::request::*;
use super::shared::{SizeState, VirtioMemShared, BUSY_RETRY_MIN};
use super::spec::*;
use super::{RangeState, UnpluggedAccess};
use crate::virtio::metrics::{Sample, VirtioMemMetrics};
use crate::virtio::mmio::{Interrupt, VirtioDevice};
use crate::virtio::{Error, Result};

/// The most chains one `process_queue` call handles, so that a driver that keeps the queue full
/// cannot hold the event loop for ever. The rest waits for the next notification.
const MAX_CHAINS_PER_CALL: usize = 4 * QUEUE_SIZE as usize;
/// The most descriptors of a chain looked at.
const MAX_CHAIN_DESCRIPTORS: usize = 16;

/// What the device holds while the driver runs it.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// Where the activated queue lives. The queue's runner takes it out for the length of one
/// request (a populate can take seconds) and puts it back, so that the transport's side
/// (activation, reset) only ever waits for this lock's short critical sections.
enum Slot {
    /// Not activated (or reset).
    Idle,
    /// Activated; nobody is processing the queue.
    Ready(Active),
    /// A runner has the queue out.
    Taken,
}

struct QueueSlot {
    slot: Slot,
    /// Bumped by every activation and reset: a runner that finds another epoch when it comes
    /// back from a request drops its queue without touching the rings.
    epoch: u64,
    /// A notification came while the queue was out: the runner looks at the queue again.
    pending: bool,
}

/// The part of the device its queue runner needs: shared between [`VirtioMem`] (on the
/// transport's side) and [`VirtioMemQueue`] (on the worker's side).
struct Core<R: HotplugMemory> {
    region: Arc<R>,
    shared: Arc<VirtioMemShared>,
    queue: Mutex<QueueSlot>,
    metrics: Arc<VirtioMemMetrics>,
}

/// The virtio-mem device over the hotplug memory `R`.
pub struct VirtioMem<R: HotplugMemory> {
    core: Arc<Core<R>>,
    acked_features: u64,
    queue_sizes: [u16; 1],
}

/// A handle that runs the device's request queue from any thread (the vmm's worker), without
/// the transport's lock: guest MMIO accesses to the transport never wait for a populate.
pub struct VirtioMemQueue<R: HotplugMemory>(Arc<Core<R>>);

impl<R: HotplugMemory> Clone for VirtioMemQueue<R> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<R: HotplugMemory> VirtioMemQueue<R> {
    /// Processes what the driver made available, one request at a time. Returns at once when
    /// the device is not activated, or when another thread has the queue out (that thread then
    /// looks at the queue again). An error means the device cannot go on: the transport shows
    /// `DEVICE_NEEDS_RESET` and the driver gets a configuration interrupt.
    pub fn process(&self) -> Result<()> {
        self.0.process()
    }
}

impl<R: HotplugMemory> VirtioMem<R> {
    /// A virtio-mem device over `region` that asks the guest to plug `requested_size` bytes.
    ///
    /// The region's block size must be a power of two, its base and size non-zero multiples of
    /// it; `requested_size` must be a multiple of the block size no larger than the region.
    /// Blocks already plugged in the region count as plugged.
    pub fn new(region: Arc<R>, requested_size: u64) -> Result<Self> {
        let base = region.base().raw_value();
        let size = region.size();
        let block_size = region.block_size();
        let bad = Error::BadRegion {
            base,
            size,
            block_size,
        };
        if !block_size.is_power_of_two()
            || size == 0
            || size & (block_size - 1) != 0
            || base & (block_size - 1) != 0
            || base.checked_add(size).is_none()
        {
            return Err(bad);
        }
        let shared = Arc::new(VirtioMemShared {
            layout: memory::HotplugLayout {
                base: GuestAddress(base),
                size,
                block_size,
            },
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
    pub fn queue_runner(&self) -> VirtioMemQueue<R> {
        VirtioMemQueue(self.core.clone())
    }
}

impl<R: HotplugMemory> Core<R> {
    fn slot(&self) -> MutexGuard<'_, QueueSlot> {
        // Every update of the slot is a plain store: it stays consistent after a panic.
        memory::lock(&self.queue)
    }

    /// Publishes the region's plugged size to the configuration space.
    fn publish(&self, all_unplugged: bool) {
        self.shared
            .set_plug_state(self.region.plugged_bytes(), all_unplugged);
    }

    /// The end (offset from the base) of the highest plugged block, searched once when the
    /// device is created over a region that already has plugged blocks.
    fn highest_plugged_end(&self) -> u64 {
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

    /// The length of `nb_blocks` blocks; `None` for 0 blocks.
    fn range_len(&self, nb_blocks: u16) -> Option<u64> {
        (nb_blocks != 0).then(|| u64::from(nb_blocks) * self.shared.layout.block_size)
    }

    /// Checks that `[addr, addr + nb_blocks * block_size)` is a block-aligned, non-empty range
    /// inside the usable region; returns its length.
    fn check_range(&self, addr: u64, nb_blocks: u16) -> Option<u64> {
        let bs = self.shared.layout.block_size;
        let len = self.range_len(nb_blocks)?;
        if addr & (bs - 1) != 0 || addr < self.shared.layout.base.0 {
            return None;
        }
        let end = addr.checked_add(len)?;
        let usable_end = self.shared.layout.base.0 + self.shared.usable_region_size();
        (end <= usable_end).then_some(len)
    }

    fn execute(&self, req: Request, m: &mut Timing) -> Response {
        match req.kind {
            VIRTIO_MEM_REQ_PLUG => self.plug(req.addr, req.nb_blocks, m),
            VIRTIO_MEM_REQ_UNPLUG => self.unplug(req.addr, req.nb_blocks, m),
            VIRTIO_MEM_REQ_UNPLUG_ALL => self.unplug_all(m),
            VIRTIO_MEM_REQ_STATE => self.state(req.addr, req.nb_blocks),
            other => {
                guest_log!(
                    Level::Warn,
                    "virtio-mem unknown request type",
                    "virtio-mem: unknown request type {other}"
                );
                ERROR
            }
        }
    }

    fn plug(&self, addr: u64, nb_blocks: u16, m: &mut Timing) -> Response {
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

    /// The checks PLUG and UNPLUG share: a valid range whose blocks are all in state `want`.
    /// Returns the range's length in bytes (and ends the validation time), or the answer.
    fn validate(
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

    fn unplug(&self, addr: u64, nb_blocks: u16, m: &mut Timing) -> Response {
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

    fn unplug_all(&self, m: &mut Timing) -> Response {
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

    fn state(&self, addr: u64, nb_blocks: u16) -> Response {
        let Some(len) = self.check_range(addr, nb_blocks) else {
            guest_log!(
                Level::Warn,
                "virtio-mem invalid range",
                "virtio-mem: STATE of {nb_blocks} blocks at {addr:#x}: invalid range"
            );
            return ERROR;
        };
        let state = match self.region.state(GuestAddress(addr), len) {
            Ok(RangeState::Plugged) => VIRTIO_MEM_STATE_PLUGGED,
            Ok(RangeState::Unplugged) => VIRTIO_MEM_STATE_UNPLUGGED,
            Ok(RangeState::Mixed) => VIRTIO_MEM_STATE_MIXED,
            Err(e) => {
                guest_log!(
                    Level::Error,
                    "virtio-mem state unreadable",
                    "virtio-mem: cannot get the state of {len:#x} at {addr:#x}: {e}"
                );
                return self.busy();
            }
        };
        Response {
            kind: VIRTIO_MEM_RESP_ACK,
            state,
        }
    }

    /// Answers BUSY and arms the retry timer ([`VirtioMemShared::poll_busy_retry`]) if it is
    /// not armed yet.
    fn busy(&self) -> Response {
        let mut state = self.shared.lock();
        if !state.busy_pending {
            state.busy_pending = true;
            state.busy_since = Some(Instant::now());
        }
        BUSY
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

    /// Carries out the request of one chain; returns the response to write and where.
    fn handle_chain(&self, mem: &GuestMemoryMmap, descs: &[Descriptor], start: Instant) -> Reply {
        let mut timing = Timing {
            start,
            kind: None,
            sample: Sample::default(),
            validated: false,
        };
        let response = match self.read_request(mem, descs) {
            Some(req) => {
                timing.kind = Some(req.kind);
                self.execute(req, &mut timing)
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
        match mem.write_slice(&reply.response.bytes()[..len], addr) {
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

    /// The request of a well-shaped chain: a device-readable descriptor of at least 24 bytes
    /// followed by a device-writable one of at least 10, both in guest memory the device may
    /// access (so that no request is carried out whose answer cannot be delivered).
    fn read_request(&self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Option<Request> {
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
        let mut bytes = [0u8; REQUEST_SIZE];
        mem.read_slice(&mut bytes, input.addr()).ok()?;
        Some(Request::parse(&bytes))
    }

    /// See [`VirtioMemQueue::process`].
    fn process(&self) -> Result<()> {
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
                    let (kind, sample, answer) =
                        (reply.timing.kind, reply.timing.sample, reply.response.kind);
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
}

/// A response, the buffer it goes to (address and length) and what the request cost.
struct Reply {
    response: Response,
    out: Option<(GuestAddress, usize)>,
    timing: Timing,
}

/// The timing of one request while it is carried out.
struct Timing {
    /// When the device took the chain off the queue.
    start: Instant,
    /// The request type, once parsed.
    kind: Option<u16>,
    sample: Sample,
    /// Whether validation time was taken already.
    validated: bool,
}

impl Timing {
    /// Validation ends here (the first call counts).
    fn validated(&mut self) {
        if !self.validated {
            self.validated = true;
            self.sample.validate_ns = self.start.elapsed().as_nanos() as u64;
        }
    }

    /// Runs a memory operation, adding where its time went to the sample.
    fn time<T>(&mut self, op: impl FnOnce(&mut memory::OpTimes) -> T) -> T {
        let mut t = memory::OpTimes::default();
        let result = op(&mut t);
        self.sample.protect_ns += t.protect_ns;
        self.sample.syscall_ns += t.syscall_ns;
        self.sample.ahead_bytes += t.ahead_bytes;
        self.sample.ahead_wait_ns += t.ahead_wait_ns;
        result
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
        let config = self.core.shared.config_bytes();
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
        interrupt: Arc<Interrupt>,
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
