//! virtio-mem (virtio 1.2 section 5.15): a device that plugs and unplugs blocks of a hotplug
//! region on the driver's request, growing or shrinking guest memory toward the size the host
//! asks for.
//!
//! The device answers requests the way QEMU does, since that is what Linux's driver is tested
//! against: ERROR only for malformed requests, NACK when a plug would exceed the requested size,
//! BUSY when the host cannot back a plug (the driver retries later).
//!
//! The sizes live in [`VirtioMemShared`] so that the vmm's API thread can read them and change
//! the requested size without taking the device's lock.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub use memory::{RangeState, UnpluggedAccess};

use super::metrics::{Sample, VirtioMemMetrics};
use super::mmio::{Interrupt, VirtioDevice};
use super::{Error, Result};

/// The virtio device ID of virtio-mem.
pub const VIRTIO_ID_MEM: u32 = 24;
/// Feature bit: the device reports an ACPI proximity domain in `node_id` (not offered).
pub const VIRTIO_MEM_F_ACPI_PXM: u32 = 0;
/// Feature bit: the driver will not access unplugged memory.
pub const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: u32 = 1;
/// Feature bit: plugged memory survives suspend (not offered).
pub const VIRTIO_MEM_F_PERSISTENT_SUSPEND: u32 = 2;

/// Request type: plug blocks.
pub const VIRTIO_MEM_REQ_PLUG: u16 = 0;
/// Request type: unplug blocks.
pub const VIRTIO_MEM_REQ_UNPLUG: u16 = 1;
/// Request type: unplug every block.
pub const VIRTIO_MEM_REQ_UNPLUG_ALL: u16 = 2;
/// Request type: report the plug state of blocks.
pub const VIRTIO_MEM_REQ_STATE: u16 = 3;

/// Response type: the request was carried out.
pub const VIRTIO_MEM_RESP_ACK: u16 = 0;
/// Response type: the request was refused for now (the configuration says otherwise).
pub const VIRTIO_MEM_RESP_NACK: u16 = 1;
/// Response type: the device cannot carry out the request now; retry later.
pub const VIRTIO_MEM_RESP_BUSY: u16 = 2;
/// Response type: the request is malformed.
pub const VIRTIO_MEM_RESP_ERROR: u16 = 3;

/// STATE answer: every block of the range is plugged.
pub const VIRTIO_MEM_STATE_PLUGGED: u16 = 0;
/// STATE answer: every block of the range is unplugged.
pub const VIRTIO_MEM_STATE_UNPLUGGED: u16 = 1;
/// STATE answer: the range has plugged and unplugged blocks.
pub const VIRTIO_MEM_STATE_MIXED: u16 = 2;

/// The size of the device's only queue.
pub const QUEUE_SIZE: u16 = 128;
/// The size of a request in bytes.
pub const REQUEST_SIZE: usize = 24;
/// The size of a response in bytes.
pub const RESPONSE_SIZE: usize = 10;
/// The size of the configuration space in bytes.
pub const CONFIG_SIZE: usize = 0x38;

/// The least headroom the usable region keeps above the requested size (as QEMU does).
const MIN_USABLE_HEADROOM: u64 = 1 << 30;
/// After a BUSY, the driver gets a configuration-change interrupt (its cue to try again) after
/// this long; the delay doubles while plugs keep failing, up to [`BUSY_RETRY_MAX`]. Linux's own
/// back-off after BUSY starts at 50 s and grows to 300 s.
pub const BUSY_RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest delay between a BUSY and the configuration interrupt that follows it.
pub const BUSY_RETRY_MAX: Duration = Duration::from_secs(32);
/// The most chains one `process_queue` call handles, so that a driver that keeps the queue full
/// cannot hold the event loop for ever. The rest waits for the next notification.
const MAX_CHAINS_PER_CALL: usize = 4 * QUEUE_SIZE as usize;
/// The most descriptors of a chain looked at.
const MAX_CHAIN_DESCRIPTORS: usize = 16;

/// The hotplug memory a [`VirtioMem`] plugs and unplugs: `memory::HotplugRegion` in Tide, a fake
/// in tests. Addresses are guest physical; ranges are block aligned.
pub trait HotplugMemory: Send + Sync {
    /// The error of the memory operations.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Guest physical address of the region's first byte.
    fn base(&self) -> GuestAddress;
    /// Size of the region in bytes.
    fn size(&self) -> u64;
    /// Size of a block in bytes: a power of two dividing the base and the size.
    fn block_size(&self) -> u64;
    /// Backs `[addr, addr + len)` with host memory and marks its blocks plugged.
    fn populate(&self, addr: GuestAddress, len: u64) -> std::result::Result<(), Self::Error>;
    /// Gives the host memory of `[addr, addr + len)` back and marks its blocks unplugged.
    fn discard(&self, addr: GuestAddress, len: u64) -> std::result::Result<(), Self::Error>;
    /// Unplugs every block.
    fn discard_all(&self) -> std::result::Result<(), Self::Error>;
    /// [`HotplugMemory::populate`], adding where its time went to `times`.
    fn populate_timed(
        &self,
        addr: GuestAddress,
        len: u64,
        times: &mut memory::OpTimes,
    ) -> std::result::Result<(), Self::Error> {
        let _ = times;
        self.populate(addr, len)
    }
    /// [`HotplugMemory::discard`], adding where its time went to `times`.
    fn discard_timed(
        &self,
        addr: GuestAddress,
        len: u64,
        times: &mut memory::OpTimes,
    ) -> std::result::Result<(), Self::Error> {
        let _ = times;
        self.discard(addr, len)
    }
    /// [`HotplugMemory::discard_all`], adding where its time went to `times`.
    fn discard_all_timed(
        &self,
        times: &mut memory::OpTimes,
    ) -> std::result::Result<(), Self::Error> {
        let _ = times;
        self.discard_all()
    }
    /// The plug state of `[addr, addr + len)`.
    fn state(&self, addr: GuestAddress, len: u64) -> std::result::Result<RangeState, Self::Error>;
    /// Bytes currently plugged.
    fn plugged_bytes(&self) -> u64;
    /// Sets what guest accesses to unplugged blocks do.
    fn set_unplugged_access(&self, access: UnpluggedAccess)
        -> std::result::Result<(), Self::Error>;
    /// Whether a guest read of an unplugged block would make the host allocate memory when
    /// unplugged blocks are [`UnpluggedAccess::Readable`] (true for shared file-backed memory:
    /// a read fault of a hole allocates a page-cache page; false for private anonymous memory,
    /// which maps the shared zero page).
    fn unplugged_reads_allocate(&self) -> bool {
        true
    }
}

/// The sizes that change at run time, kept together under one lock so that a configuration read
/// never sees a half-made update.
#[derive(Debug)]
struct SizeState {
    requested: u64,
    /// The plugged size the configuration space shows: the region's count, published after
    /// every request together with a generation bump (the region owns the number).
    plugged: u64,
    usable: u64,
    generation: u32,
    /// A plug was answered BUSY since the last configuration interrupt.
    busy_pending: bool,
    /// When the first BUSY since the last configuration interrupt was answered.
    busy_since: Option<Instant>,
    /// How long after a BUSY the driver is told to try again (doubles while BUSY goes on).
    busy_retry: Duration,
    /// Present while the driver has the device running (DRIVER_OK).
    interrupt: Option<Arc<Interrupt>>,
}

/// The state of a [`VirtioMem`] that the vmm reads and changes without the device's lock.
#[derive(Debug)]
pub struct VirtioMemShared {
    addr: u64,
    region_size: u64,
    block_size: u64,
    state: Mutex<SizeState>,
    /// Signalled after every change of the requested size (the vmm's populate-ahead thread).
    resize_evt: Mutex<Option<Arc<vmm_sys_util::eventfd::EventFd>>>,
}

impl VirtioMemShared {
    /// Has `evt` signalled after every change of the requested size.
    pub fn notify_resize(&self, evt: Arc<vmm_sys_util::eventfd::EventFd>) {
        *self.resize_evt.lock().unwrap_or_else(|e| e.into_inner()) = Some(evt);
    }

    fn lock(&self) -> MutexGuard<'_, SizeState> {
        // The state stays consistent even if a holder panicked: every update is a plain store.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The size the host asks the guest to plug, in bytes.
    pub fn requested_size(&self) -> u64 {
        self.lock().requested
    }

    /// The size the guest has plugged, in bytes.
    pub fn plugged_size(&self) -> u64 {
        self.lock().plugged
    }

    /// The size of the part of the region, from its start, that the driver may plug in.
    pub fn usable_region_size(&self) -> u64 {
        self.lock().usable
    }

    /// The size of the hotplug region in bytes.
    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    /// The block size in bytes: the unit of plug and unplug.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// The guest physical address of the region.
    pub fn addr(&self) -> GuestAddress {
        GuestAddress(self.addr)
    }

    /// The configuration generation, bumped on every change of the configuration space.
    pub fn config_generation(&self) -> u32 {
        self.lock().generation
    }

    /// Asks the guest to plug `bytes` in all. `bytes` must be a multiple of the block size and
    /// no larger than the region. The usable region grows with it (it never shrinks here); a
    /// running driver gets a configuration-change interrupt.
    pub fn set_requested_size(&self, bytes: u64) -> Result<()> {
        if bytes & (self.block_size - 1) != 0 {
            return Err(Error::RequestedSizeUnaligned {
                requested: bytes,
                block_size: self.block_size,
            });
        }
        if bytes > self.region_size {
            return Err(Error::RequestedSizeTooLarge {
                requested: bytes,
                region_size: self.region_size,
            });
        }
        let interrupt = {
            let mut state = self.lock();
            state.requested = bytes;
            self.grow_usable(&mut state);
            state.generation = state.generation.wrapping_add(1);
            Self::clear_busy(&mut state);
            state.interrupt.clone()
        };
        if let Some(evt) = &*self.resize_evt.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = evt.write(1);
        }
        if let Some(interrupt) = interrupt {
            if let Err(e) = interrupt.trigger_config() {
                error!("virtio-mem: {e}");
            }
        }
        Ok(())
    }

    /// Tells a driver that got BUSY that trying again makes sense now (e.g. host memory was
    /// freed). Returns whether a configuration interrupt was raised: only if a BUSY was
    /// answered since the last one and the driver is running.
    pub fn retry_after_busy(&self) -> bool {
        let interrupt = {
            let mut state = self.lock();
            if !state.busy_pending {
                return false;
            }
            let Some(interrupt) = state.interrupt.clone() else {
                return false;
            };
            state.busy_pending = false;
            state.busy_since = None;
            state.generation = state.generation.wrapping_add(1);
            interrupt
        };
        if let Err(e) = interrupt.trigger_config() {
            error!("virtio-mem: {e}");
        }
        true
    }

    /// The retry timer after BUSY: at `now`, if a BUSY has waited its delay, raises the
    /// configuration interrupt that tells the driver to try again ([`Self::retry_after_busy`])
    /// and returns `None`; otherwise returns how long until it is due (`None` when no BUSY is
    /// pending). The vmm calls it from the device's worker loop.
    pub fn poll_busy_retry(&self, now: Instant) -> Option<Duration> {
        {
            let state = self.lock();
            let since = state.busy_since.filter(|_| state.busy_pending)?;
            let due = since + state.busy_retry;
            if now < due {
                return Some(due - now);
            }
        }
        if self.retry_after_busy() {
            // If the retry fails again, the next one waits twice as long.
            let mut state = self.lock();
            state.busy_retry = (state.busy_retry * 2).min(BUSY_RETRY_MAX);
        }
        None
    }

    fn clear_busy(state: &mut SizeState) {
        state.busy_pending = false;
        state.busy_since = None;
        state.busy_retry = BUSY_RETRY_MIN;
    }

    /// The usable region wanted for the requested size: min(region, requested + max(requested,
    /// 1 GiB)) rounded up to a block.
    fn usable_for(&self, requested: u64) -> u64 {
        let headroom = requested.max(MIN_USABLE_HEADROOM);
        let wanted = requested.saturating_add(headroom).min(self.region_size);
        // region_size is a multiple of block_size, so rounding up cannot pass it.
        wanted.div_ceil(self.block_size) * self.block_size
    }

    /// Grows the usable region to what the requested size wants; it never shrinks here (virtio
    /// 1.2 section 5.15: the driver may plug anywhere in it, and a shrink under a plug in
    /// flight would turn the driver's next request into an ERROR).
    fn grow_usable(&self, state: &mut SizeState) {
        state.usable = state.usable.max(self.usable_for(state.requested));
    }

    /// Publishes the plugged size after a request; `all_unplugged` after UNPLUG_ALL, the only
    /// request that may shrink the usable region (nothing is plugged any more).
    fn set_plug_state(&self, plugged: u64, all_unplugged: bool) {
        let mut state = self.lock();
        let usable = if all_unplugged && plugged == 0 {
            self.usable_for(state.requested)
        } else {
            state.usable.max(self.usable_for(state.requested))
        };
        if state.plugged != plugged || state.usable != usable {
            state.plugged = plugged;
            state.usable = usable;
            state.generation = state.generation.wrapping_add(1);
        }
    }
    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let state = self.lock();
        let mut bytes = [0u8; CONFIG_SIZE];
        let fields = [
            (0x00, self.block_size),
            (0x10, self.addr),
            (0x18, self.region_size),
            (0x20, state.usable),
            (0x28, state.plugged),
            (0x30, state.requested),
        ];
        for (offset, value) in fields {
            bytes[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
        }
        // node_id (u16 at 0x08) stays 0: VIRTIO_MEM_F_ACPI_PXM is not offered.
        bytes
    }
}

/// A parsed request.
#[derive(Debug, Clone, Copy)]
struct Request {
    kind: u16,
    addr: u64,
    nb_blocks: u16,
}

impl Request {
    fn parse(bytes: &[u8; REQUEST_SIZE]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&bytes[8..16]);
        Self {
            kind: u16_at(0),
            addr: u64::from_le_bytes(addr),
            nb_blocks: u16_at(16),
        }
    }
}

/// A response: its type and, for STATE, the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Response {
    kind: u16,
    state: u16,
}

impl Response {
    const fn of(kind: u16) -> Self {
        Self { kind, state: 0 }
    }

    fn bytes(self) -> [u8; RESPONSE_SIZE] {
        let mut bytes = [0u8; RESPONSE_SIZE];
        bytes[0..2].copy_from_slice(&self.kind.to_le_bytes());
        bytes[8..10].copy_from_slice(&self.state.to_le_bytes());
        bytes
    }
}

const ACK: Response = Response::of(VIRTIO_MEM_RESP_ACK);
const NACK: Response = Response::of(VIRTIO_MEM_RESP_NACK);
const BUSY: Response = Response::of(VIRTIO_MEM_RESP_BUSY);
const ERROR: Response = Response::of(VIRTIO_MEM_RESP_ERROR);

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
            addr: base,
            region_size: size,
            block_size,
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
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the region's plugged size to the configuration space.
    fn publish(&self, all_unplugged: bool) {
        self.shared
            .set_plug_state(self.region.plugged_bytes(), all_unplugged);
    }

    /// The end (offset from the base) of the highest plugged block, searched once when the
    /// device is created over a region that already has plugged blocks.
    fn highest_plugged_end(&self) -> u64 {
        let bs = self.shared.block_size;
        let blocks = self.shared.region_size / bs;
        let base = self.shared.addr;
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
        (nb_blocks != 0).then(|| u64::from(nb_blocks) * self.shared.block_size)
    }

    /// Checks that `[addr, addr + nb_blocks * block_size)` is a block-aligned, non-empty range
    /// inside the usable region; returns its length.
    fn check_range(&self, addr: u64, nb_blocks: u16) -> Option<u64> {
        let bs = self.shared.block_size;
        let len = self.range_len(nb_blocks)?;
        if addr & (bs - 1) != 0 || addr < self.shared.addr {
            return None;
        }
        let end = addr.checked_add(len)?;
        let usable_end = self.shared.addr + self.shared.usable_region_size();
        (end <= usable_end).then_some(len)
    }

    fn execute(&self, req: Request, m: &mut Timing) -> Response {
        match req.kind {
            VIRTIO_MEM_REQ_PLUG => self.plug(req.addr, req.nb_blocks, m),
            VIRTIO_MEM_REQ_UNPLUG => self.unplug(req.addr, req.nb_blocks, m),
            VIRTIO_MEM_REQ_UNPLUG_ALL => self.unplug_all(m),
            VIRTIO_MEM_REQ_STATE => self.state(req.addr, req.nb_blocks),
            other => {
                warn!("virtio-mem: unknown request type {other}");
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
        let Some(len) = self.check_range(addr, nb_blocks) else {
            warn!("virtio-mem: PLUG of {nb_blocks} blocks at {addr:#x}: invalid range");
            return ERROR;
        };
        let gaddr = GuestAddress(addr);
        match self.region.state(gaddr, len) {
            Ok(RangeState::Unplugged) => {}
            Ok(state) => {
                warn!("virtio-mem: PLUG of {len:#x} at {addr:#x}: range is {state:?}");
                return ERROR;
            }
            Err(e) => {
                error!("virtio-mem: cannot get the state of {len:#x} at {addr:#x}: {e}");
                return self.busy();
            }
        }
        m.sample.bytes = len;
        m.validated();
        let mut times = memory::OpTimes::default();
        let result = self.region.populate_timed(gaddr, len, &mut times);
        m.add(&times);
        match result {
            Ok(()) => {
                self.publish(false);
                self.shared.lock().busy_retry = BUSY_RETRY_MIN;
                ACK
            }
            Err(e) => {
                warn!("virtio-mem: cannot back {len:#x} at {addr:#x}, answering BUSY: {e}");
                // Leave nothing of the failed plug behind (the region should have rolled back).
                if !matches!(self.region.state(gaddr, len), Ok(RangeState::Unplugged)) {
                    if let Err(e) = self.region.discard(gaddr, len) {
                        error!("virtio-mem: cannot discard {len:#x} at {addr:#x}: {e}");
                    }
                }
                self.publish(false);
                self.busy()
            }
        }
    }

    fn unplug(&self, addr: u64, nb_blocks: u16, m: &mut Timing) -> Response {
        let Some(len) = self.check_range(addr, nb_blocks) else {
            warn!("virtio-mem: UNPLUG of {nb_blocks} blocks at {addr:#x}: invalid range");
            return ERROR;
        };
        let gaddr = GuestAddress(addr);
        match self.region.state(gaddr, len) {
            Ok(RangeState::Plugged) => {}
            Ok(state) => {
                warn!("virtio-mem: UNPLUG of {len:#x} at {addr:#x}: range is {state:?}");
                return ERROR;
            }
            Err(e) => {
                error!("virtio-mem: cannot get the state of {len:#x} at {addr:#x}: {e}");
                return self.busy();
            }
        }
        m.sample.bytes = len;
        m.validated();
        let mut times = memory::OpTimes::default();
        let result = self.region.discard_timed(gaddr, len, &mut times);
        m.add(&times);
        self.publish(false);
        match result {
            Ok(()) => ACK,
            Err(e) => {
                error!("virtio-mem: cannot discard {len:#x} at {addr:#x}: {e}");
                self.busy()
            }
        }
    }

    fn unplug_all(&self, m: &mut Timing) -> Response {
        m.sample.bytes = self.region.plugged_bytes();
        m.validated();
        let mut times = memory::OpTimes::default();
        let result = self.region.discard_all_timed(&mut times);
        m.add(&times);
        self.publish(true);
        match result {
            Ok(()) => ACK,
            Err(e) => {
                error!("virtio-mem: cannot unplug all: {e}");
                self.busy()
            }
        }
    }

    fn state(&self, addr: u64, nb_blocks: u16) -> Response {
        let Some(len) = self.check_range(addr, nb_blocks) else {
            warn!("virtio-mem: STATE of {nb_blocks} blocks at {addr:#x}: invalid range");
            return ERROR;
        };
        let state = match self.region.state(GuestAddress(addr), len) {
            Ok(RangeState::Plugged) => VIRTIO_MEM_STATE_PLUGGED,
            Ok(RangeState::Unplugged) => VIRTIO_MEM_STATE_UNPLUGGED,
            Ok(RangeState::Mixed) => VIRTIO_MEM_STATE_MIXED,
            Err(e) => {
                error!("virtio-mem: cannot get the state of {len:#x} at {addr:#x}: {e}");
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
        let base = self.shared.addr;
        let region_end = base + self.shared.region_size;
        let start = addr.raw_value().max(base);
        let end = end.min(region_end);
        if start >= end {
            return true;
        }
        let bs = self.shared.block_size;
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
                warn!("virtio-mem: malformed request chain");
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
            warn!("virtio-mem: response buffer in unplugged hotplug memory");
            return 0;
        }
        match mem.write_slice(&reply.response.bytes()[..len], addr) {
            Ok(()) => len as u32,
            Err(e) => {
                warn!("virtio-mem: cannot write the response: {e}");
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
                    let r = Self::add_used(&mut active, head, len).map(|()| true);
                    let total = start.elapsed().as_nanos() as u64;
                    self.metrics.of(kind).record(&sample, answer, total);
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

    fn add_used(active: &mut Active, head: u16, len: u32) -> Result<()> {
        active
            .queue
            .add_used(&active.mem, head, len)
            .map_err(Error::Queue)?;
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

    fn add(&mut self, t: &memory::OpTimes) {
        self.sample.protect_ns += t.protect_ns;
        self.sample.syscall_ns += t.syscall_ns;
        self.sample.ahead_bytes += t.ahead_bytes;
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

impl HotplugMemory for memory::HotplugRegion {
    type Error = memory::Error;

    fn base(&self) -> GuestAddress {
        memory::HotplugRegion::base(self)
    }

    fn size(&self) -> u64 {
        memory::HotplugRegion::size(self)
    }

    fn block_size(&self) -> u64 {
        memory::HotplugRegion::block_size(self)
    }

    fn populate(&self, addr: GuestAddress, len: u64) -> memory::Result<()> {
        memory::HotplugRegion::populate(self, addr, len)
    }

    fn populate_timed(
        &self,
        addr: GuestAddress,
        len: u64,
        times: &mut memory::OpTimes,
    ) -> memory::Result<()> {
        memory::HotplugRegion::populate_timed(self, addr, len, times)
    }

    fn discard_timed(
        &self,
        addr: GuestAddress,
        len: u64,
        times: &mut memory::OpTimes,
    ) -> memory::Result<()> {
        memory::HotplugRegion::discard_timed(self, addr, len, times)
    }

    fn discard_all_timed(&self, times: &mut memory::OpTimes) -> memory::Result<()> {
        memory::HotplugRegion::discard_all_timed(self, times)
    }

    fn discard(&self, addr: GuestAddress, len: u64) -> memory::Result<()> {
        memory::HotplugRegion::discard(self, addr, len)
    }

    fn discard_all(&self) -> memory::Result<()> {
        memory::HotplugRegion::discard_all(self)
    }

    fn state(&self, addr: GuestAddress, len: u64) -> memory::Result<RangeState> {
        memory::HotplugRegion::state(self, addr, len)
    }

    fn plugged_bytes(&self) -> u64 {
        memory::HotplugRegion::plugged_bytes(self)
    }

    fn set_unplugged_access(&self, access: UnpluggedAccess) -> memory::Result<()> {
        memory::HotplugRegion::set_unplugged_access(self, access)
    }

    fn unplugged_reads_allocate(&self) -> bool {
        memory::HotplugRegion::unplugged_reads_allocate(self)
    }
}
