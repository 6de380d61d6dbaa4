//! Tests of the virtio-mmio transport and the virtio-mem device, driven the way a guest driver
//! would: descriptors and rings in guest memory (through virtio-queue's mock), registers through
//! the `BusDevice` interface.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mem::*;
use super::mmio::*;
use super::Error;
use crate::bus::BusDevice;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const BS: u64 = 2 * MIB;
const HP_BASE: u64 = 4 * GIB;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const REQ_BUF: u64 = 0x1_0000;
const RESP_BUF: u64 = 0x2_0000;
const VERSION_1: u64 = 1 << 32;
const UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;

fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn real_region(size: u64) -> Arc<memory::HotplugRegion> {
    let layout = memory::HotplugLayout {
        base: GuestAddress(HP_BASE),
        size,
        block_size: BS,
    };
    Arc::new(memory::HotplugRegion::new(&layout, memory::Backend::Anon).unwrap())
}

/// A hotplug region without memory, whose populate can be made to fail.
struct FakeRegion {
    base: u64,
    size: u64,
    blocks: Mutex<Vec<bool>>,
    fail_populate: AtomicBool,
    access: Mutex<Option<UnpluggedAccess>>,
    /// What `unplugged_reads_allocate` answers (false: like anonymous memory).
    reads_allocate: AtomicBool,
    /// Blocks looked at by `state` calls: the device's bookkeeping work.
    state_blocks: AtomicU64,
    /// When set, `populate` says it started and waits to be released.
    populate_gate: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

#[derive(Debug, thiserror::Error)]
#[error("fake region: {0}")]
struct FakeError(&'static str);

impl FakeRegion {
    fn new(size: u64) -> Arc<Self> {
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
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    q: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// A response as the driver sees it: (type, state, used length).
type Resp = (u16, u16, u32);

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self {
            mem,
            q: MockSplitQueue::new(mem, QUEUE_SIZE),
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn queue(&self) -> Queue {
        self.q.create_queue::<Queue>().unwrap()
    }

    /// Makes a chain of `(addr, len, device_writable)` available.
    fn push(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let idx = self.next_desc;
            let next = (idx + 1) % QUEUE_SIZE;
            let mut flags = if write { F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= F_NEXT;
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
    fn pop_used(&mut self) -> Option<(u32, u32)> {
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

    fn write_request(&self, kind: u16, addr: u64, nb_blocks: u16) {
        let mut req = [0u8; REQUEST_SIZE];
        req[0..2].copy_from_slice(&kind.to_le_bytes());
        req[8..16].copy_from_slice(&addr.to_le_bytes());
        req[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
        self.mem.write_slice(&req, GuestAddress(REQ_BUF)).unwrap();
        self.mem
            .write_slice(&[0xff; 16], GuestAddress(RESP_BUF))
            .unwrap();
    }

    fn read_response(&self) -> (u16, u16) {
        let mut r = [0u8; RESPONSE_SIZE];
        self.mem.read_slice(&mut r, GuestAddress(RESP_BUF)).unwrap();
        (
            u16::from_le_bytes([r[0], r[1]]),
            u16::from_le_bytes([r[8], r[9]]),
        )
    }

    /// Sends a well-formed request through `process` and returns the answer.
    fn request(&mut self, kind: u16, addr: u64, nb_blocks: u16, process: &mut dyn FnMut()) -> Resp {
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
fn active_device<R: HotplugMemory>(
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

const ACK: Resp = (VIRTIO_MEM_RESP_ACK, 0, 10);
const NACK: Resp = (VIRTIO_MEM_RESP_NACK, 0, 10);
const BUSY: Resp = (VIRTIO_MEM_RESP_BUSY, 0, 10);
const ERROR: Resp = (VIRTIO_MEM_RESP_ERROR, 0, 10);
const PLUGGED: Resp = (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_PLUGGED, 10);
const UNPLUGGED: Resp = (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_UNPLUGGED, 10);
const MIXED: Resp = (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_MIXED, 10);

macro_rules! req {
    ($drv:expr, $dev:expr, $kind:expr, $addr:expr, $nb:expr) => {
        $drv.request($kind, $addr, $nb, &mut || $dev.process_queue(0).unwrap())
    };
}

use super::mem::{
    VIRTIO_MEM_REQ_PLUG as PLUG, VIRTIO_MEM_REQ_STATE as STATE, VIRTIO_MEM_REQ_UNPLUG as UNPLUG,
    VIRTIO_MEM_REQ_UNPLUG_ALL as UNPLUG_ALL,
};

#[test]
fn plug_unplug_state_with_real_region() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = real_region(64 * MIB);
    let (mut dev, interrupt) = active_device(region.clone(), 16 * MIB, &mem, &drv);
    let shared = dev.shared();
    assert_eq!(region.unplugged_access(), UnpluggedAccess::Inaccessible);
    assert_eq!(shared.usable_region_size(), 64 * MIB);

    assert_eq!(req!(drv, dev, STATE, HP_BASE, 32), UNPLUGGED);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 2), ACK);
    assert_eq!(interrupt.status() & INT_USED_RING, INT_USED_RING);
    assert_eq!(interrupt.evt().read().unwrap(), 2);
    assert_eq!(shared.plugged_size(), 4 * MIB);
    assert_eq!(region.plugged_bytes(), 4 * MIB);
    assert_eq!(req!(drv, dev, STATE, HP_BASE, 2), PLUGGED);
    assert_eq!(req!(drv, dev, STATE, HP_BASE, 3), MIXED);
    assert_eq!(req!(drv, dev, STATE, HP_BASE + 4 * MIB, 1), UNPLUGGED);
    // The plugged memory is really there and writable.
    assert!(region.resident_bytes().unwrap() >= 4 * MIB);

    assert_eq!(req!(drv, dev, UNPLUG, HP_BASE + BS, 1), ACK);
    assert_eq!(shared.plugged_size(), 2 * MIB);
    assert_eq!(req!(drv, dev, STATE, HP_BASE, 2), MIXED);

    // Plug up to the requested size, then one block more is NACKed.
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 32 * MIB, 7), ACK);
    assert_eq!(shared.plugged_size(), 16 * MIB);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 2 * BS, 1), NACK);
    assert_eq!(shared.plugged_size(), 16 * MIB);

    assert_eq!(req!(drv, dev, UNPLUG_ALL, 0, 0), ACK);
    assert_eq!(shared.plugged_size(), 0);
    assert_eq!(region.plugged_bytes(), 0);
    assert_eq!(req!(drv, dev, STATE, HP_BASE, 32), UNPLUGGED);
    // UNPLUG_ALL with nothing plugged is fine too.
    assert_eq!(req!(drv, dev, UNPLUG_ALL, 0, 0), ACK);
}

#[test]
fn invalid_requests_get_error() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = real_region(64 * MIB);
    let (mut dev, _) = active_device(region.clone(), 64 * MIB, &mem, &drv);
    let shared = dev.shared();

    for kind in [PLUG, UNPLUG, STATE] {
        // Misaligned.
        assert_eq!(req!(drv, dev, kind, HP_BASE + 4096, 1), ERROR);
        assert_eq!(req!(drv, dev, kind, HP_BASE + MIB, 1), ERROR);
        // No blocks.
        assert_eq!(req!(drv, dev, kind, HP_BASE, 0), ERROR);
        // Below the region.
        assert_eq!(req!(drv, dev, kind, HP_BASE - BS, 1), ERROR);
        assert_eq!(req!(drv, dev, kind, 0, 1), ERROR);
        // Past the usable region (ends one block after it).
        assert_eq!(req!(drv, dev, kind, HP_BASE + 63 * MIB - MIB, 2), ERROR);
        assert_eq!(req!(drv, dev, kind, HP_BASE + 64 * MIB, 1), ERROR);
        // Overflowing the address space.
        assert_eq!(req!(drv, dev, kind, u64::MAX - BS + 1, 2), ERROR);
        // More than requested: a PLUG gets NACK whatever its range.
        let big = if kind == PLUG { NACK } else { ERROR };
        assert_eq!(req!(drv, dev, kind, HP_BASE, u16::MAX), big);
    }
    // The last block of the region is fine.
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 62 * MIB, 1), ACK);
    // PLUG of a range not wholly unplugged.
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 62 * MIB, 1), ERROR);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 60 * MIB, 2), ERROR);
    // UNPLUG of a range not wholly plugged.
    assert_eq!(req!(drv, dev, UNPLUG, HP_BASE, 1), ERROR);
    assert_eq!(req!(drv, dev, UNPLUG, HP_BASE + 60 * MIB, 2), ERROR);
    // Unknown request types.
    assert_eq!(req!(drv, dev, 4, HP_BASE, 1), ERROR);
    assert_eq!(req!(drv, dev, u16::MAX, HP_BASE, 1), ERROR);
    assert_eq!(shared.plugged_size(), 2 * MIB);
    assert_eq!(region.plugged_bytes(), 2 * MIB);
}

#[test]
fn nack_comes_before_state_checks() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let (mut dev, _) = active_device(real_region(64 * MIB), 0, &mem, &drv);
    // Requested size 0: any plug is NACKed, of a valid range or not (checked first, as Cloud
    // Hypervisor does: a plug racing with a shrink must never get ERROR).
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 1), NACK);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 1, 1), NACK);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 64 * MIB, 1), NACK);
    dev.shared().set_requested_size(2 * MIB).unwrap();
    // Within the requested size, a malformed range is ERROR.
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 1, 1), ERROR);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 0), ERROR);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 1), ACK);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + BS, 1), NACK);
    // Lowering the requested size does not stop unplug.
    dev.shared().set_requested_size(0).unwrap();
    assert_eq!(req!(drv, dev, UNPLUG, HP_BASE, 1), ACK);
}

#[test]
fn failed_populate_is_busy_and_leaves_nothing_plugged() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = FakeRegion::new(64 * MIB);
    let (mut dev, interrupt) = active_device(region.clone(), 64 * MIB, &mem, &drv);
    let shared = dev.shared();
    assert!(!shared.retry_after_busy());

    region.fail_populate.store(true, Ordering::SeqCst);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 4), BUSY);
    assert_eq!(shared.plugged_size(), 0);
    assert_eq!(region.plugged_bytes(), 0);
    assert_eq!(req!(drv, dev, STATE, HP_BASE, 4), UNPLUGGED);

    // The host says memory is back: the driver gets a config interrupt, once.
    interrupt.ack(INT_USED_RING | INT_CONFIG);
    assert!(shared.retry_after_busy());
    assert_eq!(interrupt.status(), INT_CONFIG);
    assert!(!shared.retry_after_busy());

    // A resize after a BUSY raises a config interrupt too.
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 4), BUSY);
    interrupt.ack(INT_USED_RING | INT_CONFIG);
    shared.set_requested_size(32 * MIB).unwrap();
    assert_eq!(interrupt.status(), INT_CONFIG);
    assert!(!shared.retry_after_busy());

    region.fail_populate.store(false, Ordering::SeqCst);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 4), ACK);
    assert_eq!(shared.plugged_size(), 8 * MIB);
}

#[test]
fn bad_chain_shapes() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = FakeRegion::new(64 * MIB);
    let (mut dev, _) = active_device(region.clone(), 64 * MIB, &mem, &drv);
    let req_len = REQUEST_SIZE as u32;
    let resp_len = RESPONSE_SIZE as u32;

    let mut send = |drv: &mut Driver, descs: &[(u64, u32, bool)]| {
        drv.write_request(PLUG, HP_BASE, 1);
        drv.push(descs);
        dev.process_queue(0).unwrap();
        let (_, len) = drv.pop_used().unwrap();
        (drv.read_response().0, len)
    };
    let err = VIRTIO_MEM_RESP_ERROR;
    // Only a readable descriptor: nothing to answer in.
    assert_eq!(send(&mut drv, &[(REQ_BUF, req_len, false)]).1, 0);
    // Two readable descriptors.
    assert_eq!(
        send(
            &mut drv,
            &[(REQ_BUF, req_len, false), (RESP_BUF, resp_len, false)]
        )
        .1,
        0
    );
    // Only a writable descriptor.
    assert_eq!(send(&mut drv, &[(RESP_BUF, resp_len, true)]), (err, 10));
    // Short request.
    assert_eq!(
        send(
            &mut drv,
            &[(REQ_BUF, 23, false), (RESP_BUF, resp_len, true)]
        ),
        (err, 10)
    );
    // Short response buffer: as much of the ERROR as fits.
    assert_eq!(
        send(&mut drv, &[(REQ_BUF, req_len, false), (RESP_BUF, 2, true)]),
        (err, 2)
    );
    // Writable then readable.
    assert_eq!(
        send(
            &mut drv,
            &[(RESP_BUF, resp_len, true), (REQ_BUF, req_len, false)]
        ),
        (err, 10)
    );
    // Request outside guest memory.
    assert_eq!(
        send(
            &mut drv,
            &[(0x4000_0000, req_len, false), (RESP_BUF, resp_len, true)]
        ),
        (err, 10)
    );
    // Request in unplugged hotplug memory.
    assert_eq!(
        send(
            &mut drv,
            &[(HP_BASE, req_len, false), (RESP_BUF, resp_len, true)]
        ),
        (err, 10)
    );
    // Response outside guest memory: used with length 0.
    assert_eq!(
        send(
            &mut drv,
            &[(REQ_BUF, req_len, false), (0x4000_0000, resp_len, true)]
        )
        .1,
        0
    );
    // Response address that wraps.
    assert_eq!(
        send(
            &mut drv,
            &[(REQ_BUF, req_len, false), (u64::MAX - 4, resp_len, true)]
        )
        .1,
        0
    );
    assert_eq!(region.plugged_bytes(), 0);
    // Longer chains with the right first two descriptors work.
    assert_eq!(
        send(
            &mut drv,
            &[
                (REQ_BUF, req_len, false),
                (RESP_BUF, resp_len, true),
                (RESP_BUF + 0x100, 16, true)
            ]
        ),
        (VIRTIO_MEM_RESP_ACK, 10)
    );
    assert_eq!(region.plugged_bytes(), BS);
    // The device still works after all that.
    assert_eq!(req!(drv, dev, STATE, HP_BASE, 1), PLUGGED);
}

#[test]
fn looping_and_hostile_chains_do_not_hang() {
    let mem = guest_mem();
    let drv = Driver::new(&mem);
    let region = FakeRegion::new(64 * MIB);
    let (mut dev, _) = active_device(region, 64 * MIB, &mem, &drv);
    // A descriptor that points at itself.
    let d = SplitDescriptor::new(REQ_BUF, 24, F_NEXT, 0);
    drv.q.desc_table().store(0, RawDescriptor::from(d)).unwrap();
    drv.q.avail().ring().ref_at(0).unwrap().store(0);
    drv.q.avail().idx().store(1);
    dev.process_queue(0).unwrap();
    assert_eq!(drv.q.used().idx().load(), 1);
    // A head index past the queue: the used ring refuses it, the device needs reset.
    drv.q.avail().ring().ref_at(1).unwrap().store(500);
    drv.q.avail().idx().store(2);
    assert!(dev.process_queue(0).is_err());
    // An avail index far ahead of the device.
    drv.q.avail().idx().store(1000);
    assert!(matches!(dev.process_queue(0), Err(Error::Queue(_))));
    // Bad queue index.
    assert!(matches!(dev.process_queue(1), Err(Error::BadQueueIndex(1))));
}

#[test]
fn usable_region_size_follows_requested_and_plugged() {
    let region = FakeRegion::new(8 * GIB);
    let dev = VirtioMem::new(region.clone(), 0).unwrap();
    let shared = dev.shared();
    assert_eq!(shared.region_size(), 8 * GIB);
    assert_eq!(shared.block_size(), BS);
    assert_eq!(shared.addr(), GuestAddress(HP_BASE));
    assert_eq!(shared.usable_region_size(), GIB);
    shared.set_requested_size(512 * MIB).unwrap();
    assert_eq!(shared.usable_region_size(), 512 * MIB + GIB);
    shared.set_requested_size(3 * GIB).unwrap();
    assert_eq!(shared.usable_region_size(), 6 * GIB);
    shared.set_requested_size(5 * GIB).unwrap();
    assert_eq!(shared.usable_region_size(), 8 * GIB);
    assert_eq!(shared.requested_size(), 5 * GIB);

    assert!(matches!(
        shared.set_requested_size(MIB),
        Err(Error::RequestedSizeUnaligned { .. })
    ));
    assert!(matches!(
        shared.set_requested_size(8 * GIB + BS),
        Err(Error::RequestedSizeTooLarge { .. })
    ));
    assert_eq!(shared.requested_size(), 5 * GIB);

    // The usable region never shrinks with the requested size: only UNPLUG_ALL shrinks it.
    shared.set_requested_size(0).unwrap();
    assert_eq!(shared.usable_region_size(), 8 * GIB);
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let (mut dev, _) = active_device(region, 5 * GIB, &mem, &drv);
    let shared = dev.shared();
    assert_eq!(shared.usable_region_size(), 8 * GIB);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 4 * GIB, 1), ACK);
    shared.set_requested_size(0).unwrap();
    assert_eq!(shared.usable_region_size(), 8 * GIB);
    assert_eq!(req!(drv, dev, UNPLUG, HP_BASE + 4 * GIB, 1), ACK);
    assert_eq!(shared.usable_region_size(), 8 * GIB);
    assert_eq!(req!(drv, dev, STATE, HP_BASE + 4 * GIB, 1), UNPLUGGED);
    assert_eq!(req!(drv, dev, UNPLUG_ALL, 0, 0), ACK);
    assert_eq!(shared.usable_region_size(), GIB);
    // Requests past the usable region are now errors.
    assert_eq!(req!(drv, dev, STATE, HP_BASE + 4 * GIB, 1), ERROR);
}

/// The probe of issue 10: requested 6 GiB, 3 GiB plugged, then requested 1 GiB while the
/// driver plugs. Its next plug must be NACK (Linux retries), never ERROR (Linux marks the
/// device broken until reboot); every growth of the usable region raises a config interrupt.
#[test]
fn resize_reversed_during_a_plug_gets_nack_never_error() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = FakeRegion::new(16 * GIB);
    let (mut dev, interrupt) = active_device(region, 6 * GIB, &mem, &drv);
    let shared = dev.shared();
    let usable = shared.usable_region_size();
    assert_eq!(usable, 12 * GIB);
    let block = 128 * MIB;
    let nb = (block / BS) as u16;
    for i in 0..24 {
        assert_eq!(req!(drv, dev, PLUG, HP_BASE + i * block, nb), ACK);
    }
    assert_eq!(shared.plugged_size(), 3 * GIB);
    interrupt.ack(INT_CONFIG | INT_USED_RING);
    shared.set_requested_size(GIB).unwrap();
    assert_eq!(interrupt.status() & INT_CONFIG, INT_CONFIG);
    assert_eq!(shared.usable_region_size(), usable);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 24 * block, nb), NACK);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 11 * GIB, nb), NACK);
    // The driver turns around and unplugs 2 MiB sub-blocks from the top.
    for i in 0..4 {
        let top = HP_BASE + 3 * GIB - (i + 1) * BS;
        assert_eq!(req!(drv, dev, UNPLUG, top, 1), ACK);
    }
    assert_eq!(shared.usable_region_size(), usable);
    // Growing past the old usable region raises the usable size and a config interrupt.
    interrupt.ack(INT_CONFIG | INT_USED_RING);
    let generation = shared.config_generation();
    shared.set_requested_size(7 * GIB).unwrap();
    assert_eq!(shared.usable_region_size(), 14 * GIB);
    assert_ne!(shared.config_generation(), generation);
    assert_eq!(interrupt.status() & INT_CONFIG, INT_CONFIG);
}

/// Bookkeeping follows the request, not the region: an UNPLUG, PLUG or STATE of one block in a
/// 1 TiB region looks at that block only (it used to search the whole region for the highest
/// plugged block after every unplug).
#[test]
fn one_block_requests_look_at_one_block() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = FakeRegion::new(1 << 40);
    let (mut dev, _) = active_device(region.clone(), 1 << 39, &mem, &drv);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + (1 << 38), 1), ACK);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + (1 << 38) + BS, 1), ACK);
    region.state_blocks.store(0, Ordering::SeqCst);
    assert_eq!(req!(drv, dev, UNPLUG, HP_BASE + (1 << 38) + BS, 1), ACK);
    assert_eq!(req!(drv, dev, STATE, HP_BASE + (1 << 38), 1), PLUGGED);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + (1 << 38) + BS, 1), ACK);
    // Per request: one state check of the range, plus the buffer checks (outside the region).
    assert!(region.state_blocks.load(Ordering::SeqCst) <= 3);
}

#[test]
fn new_rejects_bad_geometry_and_sizes() {
    assert!(matches!(
        VirtioMem::new(FakeRegion::new(64 * MIB), MIB),
        Err(Error::RequestedSizeUnaligned { .. })
    ));
    assert!(matches!(
        VirtioMem::new(FakeRegion::new(64 * MIB), 66 * MIB),
        Err(Error::RequestedSizeTooLarge { .. })
    ));
    let mut bad = Arc::into_inner(FakeRegion::new(64 * MIB)).unwrap();
    bad.base = HP_BASE + MIB;
    let bad = Arc::new(bad);
    assert!(matches!(
        VirtioMem::new(bad, 0),
        Err(Error::BadRegion { .. })
    ));
}

// ---- Transport ----

fn rd(t: &mut impl BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut impl BusDevice, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

fn cfg64(t: &mut impl BusDevice, offset: u64) -> u64 {
    let lo = rd(t, 0x100 + offset);
    let hi = rd(t, 0x100 + offset + 4);
    u64::from(lo) | (u64::from(hi) << 32)
}

fn set_features(t: &mut impl BusDevice, features: u64) {
    wr(t, 0x24, 0);
    wr(t, 0x20, features as u32);
    wr(t, 0x24, 1);
    wr(t, 0x20, (features >> 32) as u32);
}

/// Runs the driver's initialization up to and including DRIVER_OK.
fn init(t: &mut impl BusDevice, drv: &Driver) {
    wr(t, 0x70, 0);
    wr(t, 0x70, STATUS_ACKNOWLEDGE);
    wr(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    set_features(t, VERSION_1 | UNPLUGGED_INACCESSIBLE);
    wr(
        t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_ne!(rd(t, 0x70) & STATUS_FEATURES_OK, 0);
    wr(t, 0x30, 0);
    assert_eq!(rd(t, 0x34), 128);
    assert_eq!(rd(t, 0x44), 0);
    wr(t, 0x38, 128);
    let addr = |a: GuestAddress| (a.0 as u32, (a.0 >> 32) as u32);
    let (l, h) = addr(drv.q.desc_table_addr());
    wr(t, 0x80, l);
    wr(t, 0x84, h);
    let (l, h) = addr(drv.q.avail_addr());
    wr(t, 0x90, l);
    wr(t, 0x94, h);
    let (l, h) = addr(drv.q.used_addr());
    wr(t, 0xa0, l);
    wr(t, 0xa4, h);
    wr(t, 0x44, 1);
    assert_eq!(rd(t, 0x44), 1);
    wr(
        t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
}

const RUNNING: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

fn transport(
    region: Arc<FakeRegion>,
    requested: u64,
    mem: &GuestMemoryMmap,
) -> MmioTransport<VirtioMem<FakeRegion>> {
    MmioTransport::new(VirtioMem::new(region, requested).unwrap(), mem.clone()).unwrap()
}

#[test]
fn identification_registers() {
    let mem = guest_mem();
    let mut t = transport(FakeRegion::new(64 * MIB), 0, &mem);
    assert_eq!(rd(&mut t, 0x0), 0x7472_6976);
    assert_eq!(rd(&mut t, 0x4), 2);
    assert_eq!(rd(&mut t, 0x8), 24);
    assert_eq!(rd(&mut t, 0xc), MMIO_VENDOR_ID);
    assert_eq!(rd(&mut t, 0x70), 0);
    assert_eq!(t.queue_evts().len(), 1);
    // Device features, 32 bits at a time.
    wr(&mut t, 0x14, 0);
    assert_eq!(rd(&mut t, 0x10), 1 << 1);
    wr(&mut t, 0x14, 1);
    assert_eq!(rd(&mut t, 0x10), 1);
    wr(&mut t, 0x14, 2);
    assert_eq!(rd(&mut t, 0x10), 0);
    // Non-4-byte and unaligned register accesses read as zero.
    let mut b = [0xffu8; 2];
    t.read(0, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 8];
    t.read(0, &mut b);
    assert_eq!(b, [0; 8]);
    assert_eq!(rd(&mut t, 0x2), 0);
    // Unknown registers read as zero; no shared memory regions.
    assert_eq!(rd(&mut t, 0x40), 0);
    assert_eq!(rd(&mut t, 0xb0), u32::MAX);
}

#[test]
fn feature_negotiation() {
    let mem = guest_mem();
    let region = FakeRegion::new(64 * MIB);
    let mut t = transport(region.clone(), 0, &mem);
    let ad = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
    // Features before DRIVER are ignored; FEATURES_OK before DRIVER is out of order.
    wr(&mut t, 0x70, STATUS_ACKNOWLEDGE);
    set_features(&mut t, VERSION_1);
    wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_FEATURES_OK);
    assert_eq!(rd(&mut t, 0x70), STATUS_ACKNOWLEDGE);
    wr(&mut t, 0x70, ad);
    // Without VERSION_1: refused.
    set_features(&mut t, UNPLUGGED_INACCESSIBLE);
    wr(&mut t, 0x70, ad | STATUS_FEATURES_OK);
    assert_eq!(rd(&mut t, 0x70), ad);
    // Unknown feature: refused.
    set_features(&mut t, VERSION_1 | 1 << 2);
    wr(&mut t, 0x70, ad | STATUS_FEATURES_OK);
    assert_eq!(rd(&mut t, 0x70), ad);
    set_features(&mut t, VERSION_1 | 1 << 40);
    wr(&mut t, 0x70, ad | STATUS_FEATURES_OK);
    assert_eq!(rd(&mut t, 0x70), ad);
    // Feature select past 1 is ignored.
    set_features(&mut t, VERSION_1);
    wr(&mut t, 0x24, 2);
    wr(&mut t, 0x20, 0xffff_ffff);
    wr(&mut t, 0x70, ad | STATUS_FEATURES_OK);
    assert_eq!(rd(&mut t, 0x70), ad | STATUS_FEATURES_OK);
    assert_eq!(
        *region.access.lock().unwrap(),
        Some(UnpluggedAccess::Readable)
    );
    // Features cannot change after FEATURES_OK.
    set_features(&mut t, VERSION_1 | 1 << 2);
    wr(&mut t, 0x70, ad | STATUS_FEATURES_OK);
    assert_eq!(rd(&mut t, 0x70), ad | STATUS_FEATURES_OK);

    // After a reset, acking UNPLUGGED_INACCESSIBLE makes unplugged memory inaccessible.
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
    wr(&mut t, 0x70, STATUS_ACKNOWLEDGE);
    wr(&mut t, 0x70, ad);
    set_features(&mut t, VERSION_1 | UNPLUGGED_INACCESSIBLE);
    wr(&mut t, 0x70, ad | STATUS_FEATURES_OK);
    assert_eq!(rd(&mut t, 0x70), ad | STATUS_FEATURES_OK);
    assert_eq!(
        *region.access.lock().unwrap(),
        Some(UnpluggedAccess::Inaccessible)
    );
}

#[test]
fn status_machine_rejects_out_of_order_writes() {
    let mem = guest_mem();
    let mut t = transport(FakeRegion::new(64 * MIB), 0, &mem);
    wr(&mut t, 0x70, STATUS_DRIVER_OK);
    assert_eq!(rd(&mut t, 0x70), 0);
    wr(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
    );
    assert_eq!(rd(&mut t, 0x70), 0);
    wr(&mut t, 0x70, STATUS_ACKNOWLEDGE);
    wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    // DRIVER_OK without FEATURES_OK.
    wr(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
    );
    assert_eq!(rd(&mut t, 0x70), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    assert!(!t.is_activated());
    // Clearing bits is ignored; NEEDS_RESET cannot be set by the driver.
    wr(&mut t, 0x70, STATUS_ACKNOWLEDGE);
    assert_eq!(rd(&mut t, 0x70), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    wr(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DEVICE_NEEDS_RESET,
    );
    assert_eq!(rd(&mut t, 0x70), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    // FAILED sticks until reset.
    wr(&mut t, 0x70, STATUS_FAILED);
    assert_eq!(
        rd(&mut t, 0x70),
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FAILED
    );
    set_features(&mut t, VERSION_1);
    wr(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FAILED | STATUS_FEATURES_OK,
    );
    assert_eq!(rd(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
    assert_eq!(t.failures_seen(), STATUS_FAILED);
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
    // The reset clears the register, not the record that the driver once gave up.
    assert_eq!(t.failures_seen(), STATUS_FAILED);
}

#[test]
fn full_driver_sequence_and_reset_keeps_the_plug_state() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = FakeRegion::new(64 * MIB);
    let mut t = transport(region.clone(), 8 * MIB, &mem);
    let shared = t.device().shared();
    let interrupt = t.interrupt();
    // Queue registers cannot be written before FEATURES_OK.
    wr(&mut t, 0x38, 64);
    assert_eq!(rd(&mut t, 0x38), 128);
    init(&mut t, &drv);
    assert_eq!(rd(&mut t, 0x70), RUNNING);
    assert!(t.is_activated());
    // Queue registers cannot be written after DRIVER_OK.
    wr(&mut t, 0x38, 64);
    assert_eq!(rd(&mut t, 0x38), 128);
    assert_eq!(rd(&mut t, 0x80), drv.q.desc_table_addr().0 as u32);

    // A notify written as an access processes the queue directly.
    let r = drv.request(PLUG, HP_BASE, 2, &mut || wr(&mut t, 0x50, 0));
    assert_eq!(r, ACK);
    assert_eq!(rd(&mut t, 0x60), INT_USED_RING);
    wr(&mut t, 0x64, INT_USED_RING);
    assert_eq!(rd(&mut t, 0x60), 0);
    // A notify through the ioeventfd.
    let r = drv.request(STATE, HP_BASE, 2, &mut || {
        t.queue_evts()[0].write(1).unwrap();
        t.handle_queue_event(0);
    });
    assert_eq!(r, PLUGGED);
    // Notifies of queues that do not exist are ignored.
    wr(&mut t, 0x50, 7);
    t.handle_queue_event(7);
    assert_eq!(rd(&mut t, 0x70), RUNNING);

    // Config space: 64-bit fields as two 32-bit reads.
    assert_eq!(cfg64(&mut t, 0x00), BS);
    assert_eq!(cfg64(&mut t, 0x10), HP_BASE);
    assert_eq!(cfg64(&mut t, 0x18), 64 * MIB);
    assert_eq!(cfg64(&mut t, 0x20), 64 * MIB);
    assert_eq!(cfg64(&mut t, 0x28), 4 * MIB);
    assert_eq!(cfg64(&mut t, 0x30), 8 * MIB);
    // Other widths.
    let mut b8 = [0u8; 8];
    t.read(0x130, &mut b8);
    assert_eq!(u64::from_le_bytes(b8), 8 * MIB);
    let mut b2 = [0xffu8; 2];
    t.read(0x108, &mut b2);
    assert_eq!(b2, [0, 0]);
    let mut b1 = [0u8; 1];
    t.read(0x100 + 2, &mut b1);
    assert_eq!(b1[0], (BS >> 16) as u8);
    // Odd widths and offsets past the config space read as zero.
    let mut b3 = [0xffu8; 3];
    t.read(0x100, &mut b3);
    assert_eq!(b3, [0; 3]);
    assert_eq!(rd(&mut t, 0x100 + 0x38), 0);
    assert_eq!(rd(&mut t, 0x100 + 0x34), ((8 * MIB) >> 32) as u32);
    assert_eq!(rd(&mut t, 0xffc), 0);
    let mut b8 = [0xffu8; 8];
    t.read(0x134, &mut b8);
    assert_eq!(b8, [0; 8]);
    // Config writes are ignored.
    wr(&mut t, 0x130, 0);
    assert_eq!(cfg64(&mut t, 0x30), 8 * MIB);

    // A resize bumps the generation and raises a config interrupt.
    wr(&mut t, 0x64, INT_USED_RING | INT_CONFIG);
    let generation = rd(&mut t, 0xfc);
    shared.set_requested_size(16 * MIB).unwrap();
    assert_ne!(rd(&mut t, 0xfc), generation);
    assert_eq!(rd(&mut t, 0x60), INT_CONFIG);
    assert_eq!(cfg64(&mut t, 0x30), 16 * MIB);
    assert!(interrupt.evt().read().unwrap() > 0);

    // Reset: the plug state stays (virtio 1.2 5.15.5: the device MUST NOT change the state of
    // memory blocks during device reset), queues back to their defaults, no interrupt pending.
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
    assert_eq!(rd(&mut t, 0x60), 0);
    assert_eq!(rd(&mut t, 0x44), 0);
    assert!(!t.is_activated());
    assert_eq!(region.plugged_bytes(), 4 * MIB);
    assert_eq!(shared.plugged_size(), 4 * MIB);
    assert_eq!(cfg64(&mut t, 0x28), 4 * MIB);
    // A resize while the driver is not running raises no interrupt.
    shared.set_requested_size(8 * MIB).unwrap();
    assert_eq!(rd(&mut t, 0x60), 0);

    // The next driver (kexec, a rebind) finds plugged_size != 0 and sends UNPLUG_ALL first,
    // as Linux's driver does at probe.
    let mut drv = Driver::new(&mem);
    init(&mut t, &drv);
    assert_eq!(rd(&mut t, 0x70), RUNNING);
    assert_eq!(cfg64(&mut t, 0x28), 4 * MIB);
    let r = drv.request(STATE, HP_BASE, 2, &mut || wr(&mut t, 0x50, 0));
    assert_eq!(r, PLUGGED);
    let r = drv.request(UNPLUG_ALL, 0, 0, &mut || wr(&mut t, 0x50, 0));
    assert_eq!(r, ACK);
    assert_eq!(cfg64(&mut t, 0x28), 0);
    assert_eq!(region.plugged_bytes(), 0);
    let r = drv.request(PLUG, HP_BASE, 1, &mut || wr(&mut t, 0x50, 0));
    assert_eq!(r, ACK);
}

#[test]
fn queue_with_bad_addresses_needs_reset() {
    let mem = guest_mem();
    let mut t = transport(FakeRegion::new(64 * MIB), 0, &mem);
    let ad = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
    wr(&mut t, 0x70, STATUS_ACKNOWLEDGE);
    wr(&mut t, 0x70, ad);
    set_features(&mut t, VERSION_1);
    wr(&mut t, 0x70, ad | STATUS_FEATURES_OK);
    // Used ring outside guest memory.
    wr(&mut t, 0xa0, 0);
    wr(&mut t, 0xa4, 1);
    wr(&mut t, 0x44, 1);
    assert_eq!(rd(&mut t, 0x44), 0);
    assert_ne!(rd(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
    wr(&mut t, 0x70, ad | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    assert!(!t.is_activated());
    assert_eq!(rd(&mut t, 0x70), RUNNING | STATUS_DEVICE_NEEDS_RESET);
    assert_eq!(rd(&mut t, 0x60), INT_CONFIG);
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
}

#[test]
fn processing_failure_sets_needs_reset() {
    let mem = guest_mem();
    let drv = Driver::new(&mem);
    let mut t = transport(FakeRegion::new(64 * MIB), 0, &mem);
    init(&mut t, &drv);
    // The driver claims far more buffers than the queue holds.
    drv.q.avail().idx().store(1000);
    wr(&mut t, 0x50, 0);
    assert_eq!(rd(&mut t, 0x70), RUNNING | STATUS_DEVICE_NEEDS_RESET);
    assert_eq!(rd(&mut t, 0x60) & INT_CONFIG, INT_CONFIG);
    // Further notifies are ignored until reset.
    wr(&mut t, 0x50, 0);
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
    assert_eq!(t.failures_seen(), STATUS_DEVICE_NEEDS_RESET);
}

#[test]
fn invalid_queue_sizes_and_selects_are_ignored() {
    let mem = guest_mem();
    let mut t = transport(FakeRegion::new(64 * MIB), 0, &mem);
    let ad = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
    wr(&mut t, 0x70, STATUS_ACKNOWLEDGE);
    wr(&mut t, 0x70, ad);
    set_features(&mut t, VERSION_1);
    wr(&mut t, 0x70, ad | STATUS_FEATURES_OK);
    for bad in [0, 3, 256, 0x1_0000, u32::MAX] {
        wr(&mut t, 0x38, bad);
        assert_eq!(rd(&mut t, 0x38), 128);
    }
    wr(&mut t, 0x38, 64);
    assert_eq!(rd(&mut t, 0x38), 64);
    // Unaligned ring addresses are refused.
    wr(&mut t, 0x80, 0x1001);
    assert_eq!(rd(&mut t, 0x80), 0);
    // A queue that does not exist.
    wr(&mut t, 0x30, 1);
    assert_eq!(rd(&mut t, 0x34), 0);
    assert_eq!(rd(&mut t, 0x38), 0);
    wr(&mut t, 0x38, 64);
    wr(&mut t, 0x44, 1);
    assert_eq!(rd(&mut t, 0x44), 0);
    wr(&mut t, 0x30, u32::MAX);
    wr(&mut t, 0x44, 1);
    assert_eq!(rd(&mut t, 0x44), 0);
    assert_eq!(rd(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(t.failures_seen(), 0);
}

#[test]
fn hostile_register_sequences_do_not_panic() {
    let mem = guest_mem();
    let drv = Driver::new(&mem);
    let region = FakeRegion::new(64 * MIB);
    let mut t = transport(region, 32 * MIB, &mem);
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let interesting = [
        0u32,
        1,
        2,
        3,
        4,
        8,
        0x7f,
        0xff,
        128,
        0x1000,
        u32::MAX,
        RUNNING,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER,
    ];
    for round in 0..20_000 {
        if round % 2000 == 0 {
            init(&mut t, &drv);
        }
        let r = next();
        let offset = if r & 1 == 0 {
            ((r >> 8) % 0x120) & !3
        } else {
            (r >> 8) % 0x1100
        };
        let len = [1usize, 2, 3, 4, 4, 4, 8][((r >> 40) % 7) as usize];
        let value = if r & 2 == 0 {
            interesting[((r >> 48) % interesting.len() as u64) as usize]
        } else {
            (r >> 16) as u32
        };
        if r & 4 == 0 {
            let mut b = vec![0u8; len];
            t.read(offset, &mut b);
        } else {
            let mut b = value.to_le_bytes().to_vec();
            b.resize(len, 0);
            t.write(offset, &b);
        }
        if round % 97 == 0 {
            t.handle_queue_event((r >> 20) as usize % 3);
        }
        if round % 131 == 0 {
            // Garbage in the ring as well.
            drv.q.avail().idx().store((r >> 24) as u16);
            drv.q
                .avail()
                .ring()
                .ref_at(((r >> 32) % 128) as usize)
                .unwrap()
                .store((r >> 36) as u16);
        }
    }
    // The device can always be reset and brought up again.
    let mut drv = Driver::new(&mem);
    init(&mut t, &drv);
    assert_eq!(rd(&mut t, 0x70), RUNNING);
    let r = drv.request(UNPLUG_ALL, 0, 0, &mut || wr(&mut t, 0x50, 0));
    assert_eq!(r, ACK);
    assert_eq!(t.device().shared().plugged_size(), 0);
}

#[test]
fn activate_needs_one_queue() {
    let mem = guest_mem();
    let mut dev = VirtioMem::new(FakeRegion::new(64 * MIB), 0).unwrap();
    let interrupt = Arc::new(Interrupt::new().unwrap());
    assert!(matches!(
        dev.activate(mem.clone(), vec![], interrupt.clone()),
        Err(Error::QueueCount {
            expected: 1,
            got: 0
        })
    ));
    let qs = vec![Queue::new(128).unwrap(), Queue::new(128).unwrap()];
    assert!(matches!(
        dev.activate(mem, qs, interrupt),
        Err(Error::QueueCount { got: 2, .. })
    ));
    assert!(matches!(dev.process_queue(0), Err(Error::NotActivated)));
}

#[test]
fn shared_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Interrupt>();
    send_sync::<VirtioMemShared>();
    send::<MmioTransport<VirtioMem<memory::HotplugRegion>>>();
}

// ---- Issue 10: the edges Linux's driver reaches ----

/// A vCPU never waits for a populate: while the queue runner is inside a populate (held there
/// by the fake region until released), guest MMIO accesses to the transport (interrupt status
/// and ack, config, generation, status) complete. Before, the worker processed the queue under
/// the transport's lock and these reads waited for the whole populate.
#[test]
fn mmio_accesses_complete_while_a_populate_runs() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = FakeRegion::new(64 * MIB);
    let (started_tx, started) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    *region.populate_gate.lock().unwrap() = Some((started_tx, release_rx));
    let mut t = transport(region.clone(), 64 * MIB, &mem);
    init(&mut t, &drv);
    let runner = t.device().queue_runner();
    let t = Arc::new(Mutex::new(t));
    let (done_tx, done) = mpsc::channel();
    let resp = drv.request(PLUG, HP_BASE, 4, &mut || {
        let runner = runner.clone();
        let done_tx = done_tx.clone();
        std::thread::spawn(move || done_tx.send(runner.process()).unwrap());
        started.recv().unwrap();
        // The populate is running (and stays so until released): the guest's accesses go on.
        let (tx, rx) = mpsc::channel();
        let t2 = t.clone();
        std::thread::spawn(move || {
            let mut t = t2.lock().unwrap();
            let isr = rd(&mut *t, 0x60);
            wr(&mut *t, 0x64, isr);
            let generation = rd(&mut *t, 0xfc);
            let requested = cfg64(&mut *t, 0x30);
            let status = rd(&mut *t, 0x70);
            tx.send((requested, status, generation)).unwrap();
        });
        // A generous bound for a loaded machine; before the change this never completed.
        let got = rx.recv_timeout(std::time::Duration::from_secs(60));
        assert!(
            done.try_recv().is_err(),
            "the populate must still be running"
        );
        let (requested, status, _) = got.expect("an MMIO access waited for the populate");
        assert_eq!(requested, 64 * MIB);
        assert_eq!(status, RUNNING);
        release.send(()).unwrap();
        done.recv().unwrap().unwrap();
    });
    assert_eq!(resp, ACK);
    assert_eq!(region.plugged_bytes(), 8 * MIB);
}

/// A reset while a populate runs neither waits for it nor lets its answer reach the rings of
/// the reset device; the plug itself stays (a reset keeps the plug state).
#[test]
fn reset_during_a_populate_does_not_wait_and_drops_the_answer() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = FakeRegion::new(64 * MIB);
    let (started_tx, started) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    *region.populate_gate.lock().unwrap() = Some((started_tx, release_rx));
    let mut t = transport(region.clone(), 64 * MIB, &mem);
    init(&mut t, &drv);
    let runner = t.device().queue_runner();
    drv.write_request(PLUG, HP_BASE, 1);
    drv.push(&[(REQ_BUF, 24, false), (RESP_BUF, 10, true)]);
    let worker = std::thread::spawn(move || runner.process());
    started.recv().unwrap();
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
    release.send(()).unwrap();
    worker.join().unwrap().unwrap();
    assert_eq!(
        drv.q.used().idx().load(),
        0,
        "no used entry after the reset"
    );
    assert_eq!(region.plugged_bytes(), BS);
    assert_eq!(cfg64(&mut t, 0x28), BS);
}

/// A driver that does not accept UNPLUGGED_INACCESSIBLE gets FEATURES_OK refused where a read of
/// unplugged memory would allocate host memory (shared file-backed backends); on anonymous
/// memory it is accepted and unplugged memory becomes readable.
#[test]
fn features_ok_needs_unplugged_inaccessible_where_reads_allocate() {
    let mem = guest_mem();
    let ad = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
    for (reads_allocate, want_ok) in [(true, false), (false, true)] {
        let region = FakeRegion::new(64 * MIB);
        region
            .reads_allocate
            .store(reads_allocate, Ordering::SeqCst);
        let mut t = transport(region.clone(), 0, &mem);
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE);
        wr(&mut t, 0x70, ad);
        set_features(&mut t, VERSION_1);
        wr(&mut t, 0x70, ad | STATUS_FEATURES_OK);
        let ok = rd(&mut t, 0x70) & STATUS_FEATURES_OK != 0;
        assert_eq!(ok, want_ok, "reads allocate: {reads_allocate}");
        let access = *region.access.lock().unwrap();
        let want = want_ok.then_some(UnpluggedAccess::Readable);
        assert_eq!(access, want);
        // With the feature, it is accepted everywhere.
        set_features(&mut t, VERSION_1 | UNPLUGGED_INACCESSIBLE);
        wr(&mut t, 0x70, ad | STATUS_FEATURES_OK);
        if !want_ok {
            assert_eq!(rd(&mut t, 0x70), ad | STATUS_FEATURES_OK);
            assert_eq!(
                *region.access.lock().unwrap(),
                Some(UnpluggedAccess::Inaccessible)
            );
        }
    }
}

/// After BUSY the driver is told when to try again: a config-change interrupt after a bounded,
/// doubling delay (Linux would otherwise wait 50-300 s), or at once on the next resize.
#[test]
fn busy_is_followed_by_a_timed_config_interrupt() {
    use std::time::Instant;
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = FakeRegion::new(64 * MIB);
    let (mut dev, interrupt) = active_device(region.clone(), 64 * MIB, &mem, &drv);
    let shared = dev.shared();
    let t0 = Instant::now();
    assert_eq!(shared.poll_busy_retry(t0), None, "nothing pending");

    region.fail_populate.store(true, Ordering::SeqCst);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 4), BUSY);
    interrupt.ack(INT_USED_RING | INT_CONFIG);
    let at = Instant::now();
    assert!(shared
        .poll_busy_retry(at)
        .is_some_and(|d| d <= BUSY_RETRY_MIN));
    assert_eq!(interrupt.status(), 0);
    let generation = shared.config_generation();
    assert_eq!(shared.poll_busy_retry(at + BUSY_RETRY_MIN), None);
    assert_eq!(interrupt.status(), INT_CONFIG);
    assert_ne!(shared.config_generation(), generation);
    // Once only.
    interrupt.ack(INT_CONFIG);
    assert_eq!(shared.poll_busy_retry(at + 10 * BUSY_RETRY_MAX), None);
    assert_eq!(interrupt.status(), 0);

    // The retry fails again: the next delay is twice as long, and bounded.
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 4), BUSY);
    let at = Instant::now();
    let due = shared.poll_busy_retry(at).unwrap();
    assert!(due > BUSY_RETRY_MIN && due <= 2 * BUSY_RETRY_MIN, "{due:?}");
    for _ in 0..10 {
        let _ = shared.poll_busy_retry(Instant::now() + 10 * BUSY_RETRY_MAX);
        assert_eq!(req!(drv, dev, PLUG, HP_BASE, 4), BUSY);
    }
    let due = shared.poll_busy_retry(Instant::now()).unwrap();
    assert!(due <= BUSY_RETRY_MAX && due > BUSY_RETRY_MAX / 2, "{due:?}");

    // A resize raises the interrupt at once and starts the delays over.
    interrupt.ack(INT_USED_RING | INT_CONFIG);
    shared.set_requested_size(32 * MIB).unwrap();
    assert_eq!(interrupt.status(), INT_CONFIG);
    assert_eq!(shared.poll_busy_retry(Instant::now()), None);
    region.fail_populate.store(false, Ordering::SeqCst);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 4), ACK);
}

/// Figures for point 3 of issue 10 (printed, not asserted: timings depend on the machine): the
/// longest a guest MMIO access (interrupt status, config, generation) took while the queue
/// runner populated a large plug of 4 KiB pages in a real region.
/// `TIDE_MMIO_PROBE_MIB` sets the plug size (default 256 MiB; the figure in the README uses 4096).
#[test]
fn mmio_latency_during_a_real_populate() {
    let mib: u64 = std::env::var("TIDE_MMIO_PROBE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let size = mib * MIB;
    let layout = memory::HotplugLayout {
        base: GuestAddress(HP_BASE),
        size: size * 2,
        block_size: BS,
    };
    let region = Arc::new(
        memory::HotplugRegion::with_options(
            &layout,
            memory::Backend::Anon,
            memory::RegionOptions { thp: false },
        )
        .unwrap(),
    );
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let t = MmioTransport::new(VirtioMem::new(region.clone(), size).unwrap(), mem.clone());
    let mut t = t.unwrap();
    init(&mut t, &drv);
    let runner = t.device().queue_runner();
    let t = Arc::new(Mutex::new(t));
    let nb = (size / BS) as u16;
    let mut stats = (0u32, std::time::Duration::ZERO, std::time::Duration::ZERO);
    let mut populate_time = std::time::Duration::ZERO;
    let resp = drv.request(PLUG, HP_BASE, nb, &mut || {
        let running = Arc::new(AtomicBool::new(true));
        let r2 = running.clone();
        let runner = runner.clone();
        let start = std::time::Instant::now();
        let worker = std::thread::spawn(move || {
            let r = runner.process();
            r2.store(false, Ordering::SeqCst);
            r
        });
        while running.load(Ordering::SeqCst) {
            let t0 = std::time::Instant::now();
            {
                let mut t = t.lock().unwrap();
                let isr = rd(&mut *t, 0x60);
                wr(&mut *t, 0x64, isr);
                let _ = rd(&mut *t, 0xfc);
                let _ = cfg64(&mut *t, 0x28);
            }
            let took = t0.elapsed();
            if running.load(Ordering::SeqCst) {
                stats.0 += 1;
                stats.1 = stats.1.max(took);
                stats.2 += took;
            }
            std::thread::yield_now();
        }
        worker.join().unwrap().unwrap();
        populate_time = start.elapsed();
    });
    assert_eq!(resp, ACK);
    assert_eq!(region.plugged_bytes(), size);
    let (n, max, total) = stats;
    println!(
        "mmio_latency_during_a_real_populate: {mib} MiB of 4 KiB pages populated in {:.0} ms; \
         {n} MMIO access groups (ISR read+ack, generation, config) during it: max {:.1} us, \
         mean {:.1} us",
        populate_time.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e6,
        if n > 0 {
            total.as_secs_f64() * 1e6 / f64::from(n)
        } else {
            0.0
        }
    );
}
