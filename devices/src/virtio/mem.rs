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

use log::{debug, error, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub use memory::{RangeState, UnpluggedAccess};

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
    /// The plug state of `[addr, addr + len)`.
    fn state(&self, addr: GuestAddress, len: u64) -> std::result::Result<RangeState, Self::Error>;
    /// Bytes currently plugged.
    fn plugged_bytes(&self) -> u64;
    /// Sets what guest accesses to unplugged blocks do.
    fn set_unplugged_access(&self, access: UnpluggedAccess)
        -> std::result::Result<(), Self::Error>;
}

/// The sizes that change at run time, kept together under one lock so that a configuration read
/// never sees a half-made update.
#[derive(Debug)]
struct SizeState {
    requested: u64,
    plugged: u64,
    /// End (offset from the region base) of the highest plugged block.
    plugged_end: u64,
    usable: u64,
    generation: u32,
    /// A plug was answered BUSY since the last configuration interrupt.
    busy_pending: bool,
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
}

impl VirtioMemShared {
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
    /// no larger than the region. The usable region follows; a running driver gets a
    /// configuration-change interrupt.
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
            self.update_usable(&mut state);
            state.generation = state.generation.wrapping_add(1);
            state.busy_pending = false;
            state.interrupt.clone()
        };
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
            state.generation = state.generation.wrapping_add(1);
            interrupt
        };
        if let Err(e) = interrupt.trigger_config() {
            error!("virtio-mem: {e}");
        }
        true
    }

    /// usable = min(region, requested + max(requested, 1 GiB)) rounded up to a block, never
    /// below the end of the highest plugged block.
    fn update_usable(&self, state: &mut SizeState) {
        let headroom = state.requested.max(MIN_USABLE_HEADROOM);
        let wanted = state
            .requested
            .saturating_add(headroom)
            .min(self.region_size);
        // region_size is a multiple of block_size, so rounding up cannot pass it.
        let rounded = wanted.div_ceil(self.block_size) * self.block_size;
        state.usable = rounded.max(state.plugged_end).min(self.region_size);
    }

    fn set_plug_state(&self, plugged: u64, plugged_end: u64) {
        let mut state = self.lock();
        if state.plugged != plugged || state.plugged_end != plugged_end {
            state.plugged = plugged;
            state.plugged_end = plugged_end;
            self.update_usable(&mut state);
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

/// The virtio-mem device over the hotplug memory `R`.
pub struct VirtioMem<R: HotplugMemory> {
    region: Arc<R>,
    shared: Arc<VirtioMemShared>,
    acked_features: u64,
    queue_sizes: [u16; 1],
    active: Option<Active>,
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
                plugged_end: 0,
                usable: 0,
                generation: 0,
                busy_pending: false,
                interrupt: None,
            }),
        });
        let device = Self {
            region,
            shared,
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE],
            active: None,
        };
        device.refresh_plug_state(None);
        device.shared.set_requested_size(requested_size)?;
        Ok(device)
    }

    /// The state the vmm's API thread uses.
    pub fn shared(&self) -> Arc<VirtioMemShared> {
        self.shared.clone()
    }

    /// The hotplug memory behind the device.
    pub fn region(&self) -> &Arc<R> {
        &self.region
    }

    /// Re-reads the plugged size from the region. `grown_to` is the end (offset) of a range
    /// just plugged; `None` after unplugs, when the highest plugged block is searched again.
    fn refresh_plug_state(&self, grown_to: Option<u64>) {
        let plugged = self.region.plugged_bytes();
        let plugged_end = match grown_to {
            Some(end) => end.max(self.shared.lock().plugged_end),
            None => self.highest_plugged_end(plugged),
        };
        self.shared.set_plug_state(plugged, plugged_end);
    }

    /// The end (offset from the base) of the highest plugged block: a binary search for the
    /// lowest block from which the rest of the region is wholly unplugged.
    fn highest_plugged_end(&self, plugged: u64) -> u64 {
        if plugged == 0 {
            return 0;
        }
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

    /// Checks that `[addr, addr + nb_blocks * block_size)` is a block-aligned, non-empty range
    /// inside the usable region; returns its length.
    fn check_range(&self, addr: u64, nb_blocks: u16) -> Option<u64> {
        let bs = self.shared.block_size;
        if nb_blocks == 0 || addr & (bs - 1) != 0 || addr < self.shared.addr {
            return None;
        }
        let len = u64::from(nb_blocks).checked_mul(bs)?;
        let end = addr.checked_add(len)?;
        let usable_end = self.shared.addr + self.shared.usable_region_size();
        (end <= usable_end).then_some(len)
    }

    fn execute(&self, req: Request) -> Response {
        match req.kind {
            VIRTIO_MEM_REQ_PLUG => self.plug(req.addr, req.nb_blocks),
            VIRTIO_MEM_REQ_UNPLUG => self.unplug(req.addr, req.nb_blocks),
            VIRTIO_MEM_REQ_UNPLUG_ALL => self.unplug_all(),
            VIRTIO_MEM_REQ_STATE => self.state(req.addr, req.nb_blocks),
            other => {
                warn!("virtio-mem: unknown request type {other}");
                ERROR
            }
        }
    }

    fn plug(&self, addr: u64, nb_blocks: u16) -> Response {
        let Some(len) = self.check_range(addr, nb_blocks) else {
            warn!("virtio-mem: PLUG of {nb_blocks} blocks at {addr:#x}: invalid range");
            return ERROR;
        };
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
        match self.region.populate(gaddr, len) {
            Ok(()) => {
                self.refresh_plug_state(Some(addr - self.shared.addr + len));
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
                self.refresh_plug_state(None);
                self.busy()
            }
        }
    }

    fn unplug(&self, addr: u64, nb_blocks: u16) -> Response {
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
        let result = self.region.discard(gaddr, len);
        self.refresh_plug_state(None);
        match result {
            Ok(()) => ACK,
            Err(e) => {
                error!("virtio-mem: cannot discard {len:#x} at {addr:#x}: {e}");
                self.busy()
            }
        }
    }

    fn unplug_all(&self) -> Response {
        let result = self.region.discard_all();
        self.refresh_plug_state(None);
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

    fn busy(&self) -> Response {
        self.shared.lock().busy_pending = true;
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

    /// Handles one chain; returns the number of bytes written for the used ring.
    fn handle_chain<I: Iterator<Item = Descriptor>>(&self, mem: &GuestMemoryMmap, chain: I) -> u32 {
        let descs: Vec<Descriptor> = chain.take(MAX_CHAIN_DESCRIPTORS).collect();
        let response = match self.read_request(mem, &descs) {
            Some(req) => self.execute(req),
            None => {
                warn!("virtio-mem: malformed request chain");
                ERROR
            }
        };
        let Some(out) = descs.iter().find(|d| d.is_write_only()) else {
            return 0;
        };
        let bytes = response.bytes();
        let len = RESPONSE_SIZE.min(out.len() as usize);
        if !self.buffer_ok(out.addr(), len as u64) {
            warn!("virtio-mem: response buffer in unplugged hotplug memory");
            return 0;
        }
        match mem.write_slice(&bytes[..len], out.addr()) {
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

    fn set_acked_features(&mut self, features: u64) -> Result<()> {
        let features = features & self.avail_features();
        let access = if features & (1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE) != 0 {
            UnpluggedAccess::Inaccessible
        } else {
            UnpluggedAccess::Readable
        };
        self.region
            .set_unplugged_access(access)
            .map_err(|e| Error::Hotplug(Box::new(e)))?;
        self.acked_features = features;
        Ok(())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let config = self.shared.config_bytes();
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
        self.shared.config_generation()
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
        self.shared.lock().interrupt = Some(interrupt.clone());
        self.active = Some(Active {
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
        let Some(mut active) = self.active.take() else {
            return Err(Error::NotActivated);
        };
        let result = self.drain_queue(&mut active);
        self.active = Some(active);
        result
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        if let Err(e) = self.region.discard_all() {
            error!("virtio-mem: cannot unplug all at reset: {e}");
        }
        {
            let mut state = self.shared.lock();
            state.interrupt = None;
            state.busy_pending = false;
        }
        self.refresh_plug_state(None);
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
}

impl<R: HotplugMemory> VirtioMem<R> {
    fn drain_queue(&self, active: &mut Active) -> Result<()> {
        if !active.queue.ready() {
            return Ok(());
        }
        let mut used = 0usize;
        while used < MAX_CHAINS_PER_CALL {
            let chain = active.queue.iter(&active.mem).map_err(Error::Queue)?.next();
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            let len = self.handle_chain(&active.mem, chain);
            active
                .queue
                .add_used(&active.mem, head, len)
                .map_err(Error::Queue)?;
            used += 1;
        }
        if used > 0 && active.queue.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.trigger_used()?;
        }
        Ok(())
    }
}
