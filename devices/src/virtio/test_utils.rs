//! What the unit tests of the virtio devices and the fuzz targets share (feature `test-utils`):
//! a hotplug region without memory ([`FakeRegion`]), a real one, the driver's side of the
//! request queue ([`Driver`] over virtio-queue's mock, [`Rings`] laid out by hand for any queue
//! size) and the register accesses of a virtio-mmio driver.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use memory::{GIB, MIB};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::VirtioDevice;
use super::mem::request::{VirtioMemReq, VirtioMemResp};
use super::mem::*;
use super::mmio::Interrupt;
use crate::bus::BusDevice;

/// Block size of the test regions.
pub const BS: u64 = 2 * MIB;
/// Guest physical base of the test regions (as in Tide, above 4 GiB).
pub const HP_BASE: u64 = 4 * GIB;
/// Size of the guest memory the queues live in.
pub const GUEST_MEM_SIZE: u64 = 0x10_0000;
/// Where [`Driver`] puts its requests.
pub const REQ_BUF: u64 = 0x1_0000;
/// Where [`Driver`] puts its response buffers.
pub const RESP_BUF: u64 = 0x2_0000;
/// The feature bit `VIRTIO_F_VERSION_1`.
pub const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
/// The feature bit `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE`.
pub const UNPLUGGED_INACCESSIBLE: u64 = 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE;

/// The guest memory the queues live in (like Tide's boot RAM: the device gets only it).
pub fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST_MEM_SIZE as usize)]).unwrap()
}

/// A real anonymous hotplug region of `size` bytes at [`HP_BASE`] in [`BS`] blocks.
pub fn real_region(size: u64) -> Arc<memory::HotplugRegion> {
    let layout = memory::HotplugLayout {
        base: GuestAddress(HP_BASE),
        size,
        block_size: BS,
    };
    Arc::new(memory::HotplugRegion::new(&layout, memory::Backend::Anon).unwrap())
}

/// A hotplug region without memory, whose populate can be made to fail.
pub struct FakeRegion {
    /// Guest physical base.
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
    /// The plug state of each block.
    pub blocks: Mutex<Vec<bool>>,
    /// When set, populates fail.
    pub fail_populate: AtomicBool,
    /// What `set_unplugged_access` last set.
    pub access: Mutex<Option<UnpluggedAccess>>,
    /// What `unplugged_reads_allocate` answers (false: like anonymous memory).
    pub reads_allocate: AtomicBool,
    /// Blocks looked at by `state` calls: the device's bookkeeping work.
    pub state_blocks: AtomicU64,
    /// When set, `populate` says it started and waits to be released.
    pub populate_gate: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

/// The error of [`FakeRegion`].
#[derive(Debug, thiserror::Error)]
#[error("fake region: {0}")]
pub struct FakeError(&'static str);

impl FakeRegion {
    /// A region of `size` bytes at [`HP_BASE`] in [`BS`] blocks, all unplugged.
    pub fn new(size: u64) -> Arc<Self> {
        Arc::new(Self {
            base: HP_BASE,
            size,
            blocks: Mutex::new(vec![false; (size / BS) as usize]),
            fail_populate: AtomicBool::new(false),
            access: Mutex::new(None),
            reads_allocate: AtomicBool::new(false),
            state_blocks: AtomicU64::new(0),
            populate_gate: Mutex::new(None),
        })
    }

    fn blocks(&self, addr: GuestAddress, len: u64) -> Result<std::ops::Range<usize>, FakeError> {
        let a = addr.0;
        if a < self.base || a & (BS - 1) != 0 || len == 0 || len & (BS - 1) != 0 {
            return Err(FakeError("bad range"));
        }
        let first = (a - self.base) / BS;
        let last = first + len / BS;
        if last > self.size / BS {
            return Err(FakeError("out of range"));
        }
        Ok(first as usize..last as usize)
    }
}

impl HotplugMemory for FakeRegion {
    type Error = FakeError;

    fn base(&self) -> GuestAddress {
        GuestAddress(self.base)
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u64 {
        BS
    }
    fn populate_timed(
        &self,
        addr: GuestAddress,
        len: u64,
        _: &mut memory::OpTimes,
    ) -> Result<(), FakeError> {
        let r = self.blocks(addr, len)?;
        if let Some((started, release)) = &*self.populate_gate.lock().unwrap() {
            started.send(()).unwrap();
            release.recv().unwrap();
        }
        if self.fail_populate.load(Ordering::SeqCst) {
            return Err(FakeError("out of memory"));
        }
        let mut b = self.blocks.lock().unwrap();
        if b[r.clone()].iter().any(|&p| p) {
            return Err(FakeError("not unplugged"));
        }
        b[r].fill(true);
        Ok(())
    }
    fn discard_timed(
        &self,
        addr: GuestAddress,
        len: u64,
        _: &mut memory::OpTimes,
    ) -> Result<(), FakeError> {
        let r = self.blocks(addr, len)?;
        let mut b = self.blocks.lock().unwrap();
        if !b[r.clone()].iter().all(|&p| p) {
            return Err(FakeError("not plugged"));
        }
        b[r].fill(false);
        Ok(())
    }
    fn discard_all_timed(&self, _: &mut memory::OpTimes) -> Result<(), FakeError> {
        self.blocks.lock().unwrap().fill(false);
        Ok(())
    }
    fn state(&self, addr: GuestAddress, len: u64) -> Result<RangeState, FakeError> {
        let r = self.blocks(addr, len)?;
        self.state_blocks
            .fetch_add(r.len() as u64, Ordering::SeqCst);
        let b = self.blocks.lock().unwrap();
        let n = b[r.clone()].iter().filter(|&&p| p).count();
        Ok(if n == 0 {
            RangeState::Unplugged
        } else if n == r.len() {
            RangeState::Plugged
        } else {
            RangeState::Mixed
        })
    }
    fn plugged_bytes(&self) -> u64 {
        self.blocks.lock().unwrap().iter().filter(|&&p| p).count() as u64 * BS
    }
    fn set_unplugged_access(&self, access: UnpluggedAccess) -> Result<(), FakeError> {
        *self.access.lock().unwrap() = Some(access);
        Ok(())
    }
    fn unplugged_reads_allocate(&self) -> bool {
        self.reads_allocate.load(Ordering::SeqCst)
    }
}

/// The driver side of the request queue.
pub struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    /// The mock queue (virtio-queue's), for the tests that look at its rings.
    pub q: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// A response as the driver sees it: (type, state, used length).
pub type Resp = (u16, u16, u32);

impl<'a> Driver<'a> {
    /// A driver with an empty queue of the device's size in `mem`.
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self {
            mem,
            q: MockSplitQueue::new(mem, QUEUE_SIZE),
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// The queue as the device gets it.
    pub fn queue(&self) -> Queue {
        self.q.create_queue::<Queue>().unwrap()
    }

    /// Makes a chain of `(addr, len, device_writable)` available.
    pub fn push(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let idx = self.next_desc;
            let next = (idx + 1) % QUEUE_SIZE;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = SplitDescriptor::new(addr, len, flags, next);
            self.q
                .desc_table()
                .store(idx, RawDescriptor::from(d))
                .unwrap();
            self.next_desc = next;
        }
        self.q
            .avail()
            .ring()
            .ref_at(usize::from(self.avail_idx % QUEUE_SIZE))
            .unwrap()
            .store(head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.q.avail().idx().store(self.avail_idx);
        head
    }

    /// Pops one used element: (head, len).
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        if self.q.used().idx().load() == self.used_seen {
            return None;
        }
        let e = self
            .q
            .used()
            .ring()
            .ref_at(usize::from(self.used_seen % QUEUE_SIZE))
            .unwrap()
            .load();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((e.id(), e.len()))
    }

    /// Writes a request at [`REQ_BUF`] and fills the response buffer at [`RESP_BUF`] with 0xff.
    pub fn write_request(&self, kind: u16, addr: u64, nb_blocks: u16) {
        let req = VirtioMemReq {
            req_type: kind.into(),
            addr: addr.into(),
            nb_blocks: nb_blocks.into(),
            ..Default::default()
        };
        self.mem.write_obj(req, GuestAddress(REQ_BUF)).unwrap();
        self.mem
            .write_slice(&[0xff; 16], GuestAddress(RESP_BUF))
            .unwrap();
    }

    /// The response at [`RESP_BUF`]: (type, state).
    pub fn read_response(&self) -> (u16, u16) {
        let r: VirtioMemResp = self.mem.read_obj(GuestAddress(RESP_BUF)).unwrap();
        (r.resp_type.into(), r.state.into())
    }

    /// Sends a well-formed request through `process` and returns the answer.
    pub fn request(
        &mut self,
        kind: u16,
        addr: u64,
        nb_blocks: u16,
        process: &mut dyn FnMut(),
    ) -> Resp {
        self.write_request(kind, addr, nb_blocks);
        let head = self.push(&[
            (REQ_BUF, REQUEST_SIZE as u32, false),
            (RESP_BUF, RESPONSE_SIZE as u32, true),
        ]);
        process();
        let (id, len) = self.pop_used().expect("request not used");
        assert_eq!(id, u32::from(head));
        let (kind, state) = self.read_response();
        (kind, state, len)
    }
}

/// A virtio-mem device activated directly (no transport).
pub fn active_device<R: HotplugMemory>(
    region: Arc<R>,
    requested: u64,
    mem: &GuestMemoryMmap,
    driver: &Driver,
) -> (VirtioMem<R>, Arc<Interrupt>) {
    let mut dev = VirtioMem::new(region, requested).unwrap();
    let interrupt = Arc::new(Interrupt::new().unwrap());
    dev.set_acked_features(VERSION_1 | UNPLUGGED_INACCESSIBLE)
        .unwrap();
    dev.activate(mem.clone(), vec![driver.queue()], interrupt.clone())
        .unwrap();
    (dev, interrupt)
}

/// Reads a 32-bit register.
pub fn rd(t: &mut impl BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Writes a 32-bit register.
pub fn wr(t: &mut impl BusDevice, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// Reads a 64-bit field of the configuration space.
pub fn cfg64(t: &mut impl BusDevice, offset: u64) -> u64 {
    let lo = rd(t, 0x100 + offset);
    let hi = rd(t, 0x100 + offset + 4);
    u64::from(lo) | (u64::from(hi) << 32)
}

/// Writes the driver features, both halves.
pub fn set_features(t: &mut impl BusDevice, features: u64) {
    wr(t, 0x24, 0);
    wr(t, 0x20, features as u32);
    wr(t, 0x24, 1);
    wr(t, 0x20, (features >> 32) as u32);
}

/// The queue size the rings are laid out for (the device's maximum).
pub const QSIZE: u16 = QUEUE_SIZE;
/// The descriptor table (16 bytes per descriptor).
pub const DESC_ADDR: u64 = 0;
/// The avail ring: flags, idx, ring[QSIZE], used_event.
pub const AVAIL_ADDR: u64 = 0x800;
/// The used ring: flags, idx, ring[QSIZE] of (id: u32, len: u32), avail_event.
pub const USED_ADDR: u64 = 0x1000;
/// The end of the used ring.
pub const USED_END: u64 = USED_ADDR + 4 + 8 * QSIZE as u64 + 2;
/// A driver's initialization, up to DRIVER_OK, with the rings at `desc`, `avail`, `used`.
pub fn driver_init(
    t: &mut impl BusDevice,
    features: u64,
    qsize: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
) {
    wr(t, 0x70, 0);
    wr(t, 0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    wr(
        t,
        0x70,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    set_features(t, features);
    wr(
        t,
        0x70,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    wr(t, 0x30, 0);
    wr(t, 0x38, u32::from(qsize));
    for (reg, a) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
        wr(t, reg, a.0 as u32);
        wr(t, reg + 4, (a.0 >> 32) as u32);
    }
    wr(t, 0x44, 1);
    wr(
        t,
        0x70,
        VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK,
    );
}

/// The driver's side of the split queue, laid out by hand (virtio-queue 0.18's
/// `MockSplitQueue` places its used ring over the upper half of its avail ring: its ring `end()`
/// counts elements, not bytes).
pub struct Rings<'a> {
    /// The guest memory the rings are in.
    pub mem: &'a GuestMemoryMmap,
    /// The queue size the driver set (entries wrap at it).
    pub qsize: u16,
    /// The next avail index the driver publishes.
    pub avail_idx: u16,
}

impl<'a> Rings<'a> {
    /// Zeroed rings.
    pub fn new(mem: &'a GuestMemoryMmap, qsize: u16) -> Self {
        mem.write_slice(&vec![0u8; USED_END as usize], GuestAddress(0))
            .unwrap();
        Self {
            mem,
            qsize,
            avail_idx: 0,
        }
    }

    /// Writes descriptor `idx`.
    pub fn set_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let at = DESC_ADDR + 16 * u64::from(idx % QSIZE);
        self.mem.write_slice(&d, GuestAddress(at)).unwrap();
    }

    /// Publishes avail index `idx`.
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .write_obj(idx.to_le(), GuestAddress(AVAIL_ADDR + 2))
            .unwrap();
    }

    /// Makes `head` available.
    pub fn push(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.qsize);
        self.mem
            .write_obj(head.to_le(), GuestAddress(AVAIL_ADDR + 4 + 2 * slot))
            .unwrap();
        self.set_avail_idx(self.avail_idx.wrapping_add(1));
    }

    /// The used index the device published.
    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(USED_ADDR + 2)).unwrap())
    }

    /// Overwrites the used index (as a hostile driver may).
    pub fn set_used_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx.to_le(), GuestAddress(USED_ADDR + 2))
            .unwrap();
    }

    /// The used element in slot `slot`: (id, len).
    pub fn used_elem(&self, slot: u16) -> (u32, u32) {
        let at = USED_ADDR + 4 + 8 * u64::from(slot % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }
}
