//! A virtio-mem device and its transport, driven to a plugged state, saved, restored into a
//! fresh device over a region with the same blocks plugged: the restored pair saves the same
//! state, and the next request is answered at the next used-ring entry.

use std::sync::Arc;

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::BusDevice;
use crate::virtio::mem::*;
use crate::virtio::mmio::*;

const MIB: u64 = 1 << 20;
const BS: u64 = 2 * MIB;
const BASE: u64 = 4 << 30;
const REQ: u64 = 0x1_0000;
const RESP: u64 = 0x2_0000;

fn region() -> Arc<memory::HotplugRegion> {
    let layout = memory::HotplugLayout {
        base: GuestAddress(BASE),
        size: 64 * MIB,
        block_size: BS,
    };
    Arc::new(memory::HotplugRegion::new(&layout, memory::Backend::Anon).unwrap())
}

fn wr(t: &mut impl BusDevice, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// Sets the transport up as a driver does, up to DRIVER_OK, with the mock queue's rings.
fn init(t: &mut impl BusDevice, q: &MockSplitQueue<GuestMemoryMmap>) {
    for s in [1, 3] {
        wr(t, 0x70, s);
    }
    for (sel, v) in [(0, 1 << 1), (1, 1)] {
        wr(t, 0x24, sel);
        wr(t, 0x20, v);
    }
    wr(t, 0x70, 11);
    wr(t, 0x30, 0);
    wr(t, 0x38, u32::from(QUEUE_SIZE));
    for (reg, a) in [
        (0x80, q.desc_table_addr()),
        (0x90, q.avail_addr()),
        (0xa0, q.used_addr()),
    ] {
        wr(t, reg, a.0 as u32);
        wr(t, reg + 4, (a.0 >> 32) as u32);
    }
    wr(t, 0x44, 1);
    wr(t, 0x70, 15);
}

/// Makes request number `n` (a PLUG of block `block`) available and returns the used index
/// after the device processed it, and the answer type.
fn plug(
    t: &mut MmioTransport<VirtioMem<memory::HotplugRegion>>,
    q: &MockSplitQueue<GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    n: u16,
    block: u64,
) -> (u16, u16) {
    let mut req = [0u8; 24];
    req[8..16].copy_from_slice(&(BASE + block * BS).to_le_bytes());
    req[16..18].copy_from_slice(&1u16.to_le_bytes());
    mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    let (d0, d1) = (2 * n, 2 * n + 1);
    let descs = [
        SplitDescriptor::new(REQ, 24, 1, d1),
        SplitDescriptor::new(RESP, 10, 2, 0),
    ];
    for (i, d) in [d0, d1].into_iter().zip(descs) {
        q.desc_table().store(i, RawDescriptor::from(d)).unwrap();
    }
    q.avail().ring().ref_at(usize::from(n)).unwrap().store(d0);
    q.avail().idx().store(n + 1);
    t.device().queue_runner().process().unwrap();
    let mut r = [0u8; 2];
    mem.read_slice(&mut r, GuestAddress(RESP)).unwrap();
    (q.used().idx().load(), u16::from_le_bytes(r))
}

#[test]
fn saved_state_restores_into_a_fresh_device_that_goes_on() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let q = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let r1 = region();
    let dev = VirtioMem::new(r1.clone(), 8 * MIB).unwrap();
    let mut t = MmioTransport::new(dev, mem.clone()).unwrap();
    init(&mut t, &q);
    assert!(t.is_activated());
    assert_eq!(plug(&mut t, &q, &mem, 0, 0), (1, 0));
    assert_eq!(plug(&mut t, &q, &mem, 1, 3), (2, 0));
    let saved_t = t.save_state();
    let saved_d = t.device().save_state().unwrap();
    assert_eq!(saved_d.plugged, vec![(BASE, BS), (BASE + 3 * BS, BS)]);
    assert_eq!(saved_d.active_queue.unwrap().next_used, 2);
    // The state goes through JSON as it does in a snapshot.
    let saved_d: VirtioMemState =
        serde_json::from_str(&serde_json::to_string(&saved_d).unwrap()).unwrap();

    // A fresh region with the same blocks plugged, a fresh device and transport.
    let r2 = region();
    // Without the plugged blocks the restore is refused.
    let mut bare = VirtioMem::new(r2.clone(), 0).unwrap();
    assert!(matches!(
        bare.restore_state(&saved_d),
        Err(PersistError::PluggedMismatch)
    ));
    for &(a, l) in &saved_d.plugged {
        r2.populate(GuestAddress(a), l).unwrap();
    }
    let mut dev = VirtioMem::new(r2.clone(), 0).unwrap();
    dev.restore_state(&saved_d).unwrap();
    let mut t2 = MmioTransport::new(dev, mem.clone()).unwrap();
    t2.restore_state(&saved_t, saved_d.active_queue.map(|q| vec![q]))
        .unwrap();
    assert!(t2.is_activated());
    assert_eq!(t2.save_state(), saved_t);
    assert_eq!(t2.device().save_state().unwrap(), saved_d);
    assert_eq!(r2.unplugged_access(), UnpluggedAccess::Inaccessible);
    // The next request is taken from avail entry 2 and answered at used entry 2.
    assert_eq!(plug(&mut t2, &q, &mem, 2, 1), (3, 0));
    assert_eq!(r2.plugged_bytes(), 3 * BS);
}

#[test]
fn a_state_of_another_geometry_is_refused() {
    let r = region();
    let dev = VirtioMem::new(r.clone(), 0).unwrap();
    let mut saved = dev.save_state().unwrap();
    saved.block_size *= 2;
    let mut dev = VirtioMem::new(r, 0).unwrap();
    assert!(matches!(
        dev.restore_state(&saved),
        Err(PersistError::Geometry { .. })
    ));
}

/// A region whose populate waits at a gate: a request stays in flight as long as the test
/// wants.
struct GatedRegion {
    inner: Arc<memory::HotplugRegion>,
    entered: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    gate: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl HotplugMemory for GatedRegion {
    type Error = memory::Error;
    fn base(&self) -> GuestAddress {
        self.inner.base()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_size(&self) -> u64 {
        self.inner.block_size()
    }
    fn populate_timed(
        &self,
        addr: GuestAddress,
        len: u64,
        times: &mut memory::OpTimes,
    ) -> Result<(), memory::Error> {
        self.entered.lock().unwrap().send(()).unwrap();
        self.gate.lock().unwrap().recv().unwrap();
        self.inner.populate_timed(addr, len, times)
    }
    fn discard_timed(
        &self,
        addr: GuestAddress,
        len: u64,
        times: &mut memory::OpTimes,
    ) -> Result<(), memory::Error> {
        self.inner.discard_timed(addr, len, times)
    }
    fn discard_all_timed(&self, times: &mut memory::OpTimes) -> Result<(), memory::Error> {
        self.inner.discard_all_timed(times)
    }
    fn state(&self, addr: GuestAddress, len: u64) -> Result<RangeState, memory::Error> {
        self.inner.state(addr, len)
    }
    fn plugged_bytes(&self) -> u64 {
        self.inner.plugged_bytes()
    }
    fn set_unplugged_access(&self, access: UnpluggedAccess) -> Result<(), memory::Error> {
        self.inner.set_unplugged_access(access)
    }
}

#[test]
fn no_state_is_saved_while_a_plug_is_in_flight() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let q = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (open, gate_rx) = std::sync::mpsc::channel();
    let r = Arc::new(GatedRegion {
        inner: region(),
        entered: std::sync::Mutex::new(entered_tx),
        gate: std::sync::Mutex::new(gate_rx),
    });
    let dev = VirtioMem::new(r.clone(), 8 * MIB).unwrap();
    let mut t = MmioTransport::new(dev, mem.clone()).unwrap();
    init(&mut t, &q);
    let mut req = [0u8; 24];
    req[8..16].copy_from_slice(&BASE.to_le_bytes());
    req[16..18].copy_from_slice(&1u16.to_le_bytes());
    mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    q.desc_table()
        .store(0, RawDescriptor::from(SplitDescriptor::new(REQ, 24, 1, 1)))
        .unwrap();
    q.desc_table()
        .store(1, RawDescriptor::from(SplitDescriptor::new(RESP, 10, 2, 0)))
        .unwrap();
    q.avail().ring().ref_at(0).unwrap().store(0);
    q.avail().idx().store(1);
    let runner = t.device().queue_runner();
    let worker = std::thread::spawn(move || runner.process().unwrap());
    entered.recv().unwrap();
    assert!(matches!(
        t.device().save_state(),
        Err(PersistError::RequestInFlight)
    ));
    open.send(()).unwrap();
    worker.join().unwrap();
    let saved = t.device().save_state().unwrap();
    assert_eq!(saved.plugged, vec![(BASE, BS)]);
}
