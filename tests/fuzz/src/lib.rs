//! Helpers shared by Tide's fuzz targets: a byte reader that turns the fuzzer's input into
//! choices, a small guest memory with a mock virtio queue, a real hotplug region, and the
//! register accesses of a virtio-mmio driver.

use std::sync::{Arc, OnceLock};

use devices::bus::BusDevice;
use devices::virtio::mmio::{
    MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use devices::virtio::VirtioMem;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// Block size of the fuzzed hotplug region.
pub const BS: u64 = 2 * MIB;
/// Guest physical base of the hotplug region (as in Tide, above 4 GiB).
pub const HP_BASE: u64 = 4 * GIB;
/// Size of the hotplug region.
pub const HP_SIZE: u64 = 32 * MIB;
/// Size of the guest memory the queues live in (like Tide's boot RAM: the device gets only it).
pub const MEM_SIZE: u64 = 0x10_0000;
/// Where the request and response buffers live.
pub const DATA: u64 = 0x1_0000;
/// The queue size the rings are laid out for (the device's maximum).
pub const QSIZE: u16 = 128;
/// The descriptor table (16 bytes per descriptor).
pub const DESC_ADDR: u64 = 0;
/// The avail ring: flags, idx, ring[QSIZE], used_event.
pub const AVAIL_ADDR: u64 = 0x800;
/// The used ring: flags, idx, ring[QSIZE] of (id: u32, len: u32), avail_event.
pub const USED_ADDR: u64 = 0x1000;
/// The end of the used ring.
pub const USED_END: u64 = USED_ADDR + 4 + 8 * QSIZE as u64 + 2;
pub const VERSION_1: u64 = 1 << 32;
pub const UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;

pub type Transport = MmioTransport<VirtioMem<memory::HotplugRegion>>;

/// Reads choices from the fuzzer's bytes; past the end everything reads as zero.
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.pos = start + n;
        &self.data[start..end]
    }

    /// The rest of the input.
    pub fn rest(&mut self) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        self.pos = self.data.len();
        &self.data[start..]
    }
}

/// The guest memory the transport gets (boot RAM only, as in Tide).
pub fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// One real hotplug region for the whole process (creating one per input would measure mmap);
/// every input must leave it wholly unplugged.
pub fn region() -> Arc<memory::HotplugRegion> {
    static REGION: OnceLock<Arc<memory::HotplugRegion>> = OnceLock::new();
    REGION
        .get_or_init(|| {
            let layout = memory::HotplugLayout {
                base: GuestAddress(HP_BASE),
                size: HP_SIZE,
                block_size: BS,
            };
            Arc::new(memory::HotplugRegion::new(&layout, memory::Backend::Anon).unwrap())
        })
        .clone()
}

pub fn rd(t: &mut impl BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

pub fn wr(t: &mut impl BusDevice, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// A driver's initialization, up to DRIVER_OK, with the rings at `desc`, `avail`, `used`.
pub fn init(
    t: &mut impl BusDevice,
    features: u64,
    qsize: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
) {
    wr(t, 0x70, 0);
    wr(t, 0x70, STATUS_ACKNOWLEDGE);
    wr(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    wr(t, 0x24, 0);
    wr(t, 0x20, features as u32);
    wr(t, 0x24, 1);
    wr(t, 0x20, (features >> 32) as u32);
    wr(
        t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
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
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
}

/// Checks what must hold whatever the guest did: the device's sizes agree with the region.
pub fn check_sizes(t: &Transport) {
    let shared = t.device().shared();
    let region = t.device().region();
    let plugged = shared.plugged_size();
    assert_eq!(
        plugged,
        region.plugged_bytes(),
        "device and region disagree"
    );
    assert_eq!(plugged % BS, 0, "plugged size {plugged:#x} not in blocks");
    assert!(plugged <= HP_SIZE);
    let usable = shared.usable_region_size();
    assert!(
        usable <= HP_SIZE && usable.is_multiple_of(BS),
        "usable {usable:#x}"
    );
    for (addr, len) in region.plugged_ranges() {
        assert!(
            addr.0 + len <= HP_BASE + usable,
            "plugged [{:#x}, +{len:#x}) beyond usable {usable:#x}",
            addr.0
        );
    }
}

/// Resets the device through its status register and checks that the reset kept the plug
/// state (virtio 1.2 5.15.5: the device MUST NOT change the state of memory blocks during device
/// reset) and the usable region.
pub fn reset_and_check(t: &mut Transport) {
    let shared = t.device().shared();
    let (plugged, ranges, usable) = (
        shared.plugged_size(),
        t.device().region().plugged_ranges(),
        shared.usable_region_size(),
    );
    wr(t, 0x70, 0);
    check_sizes(t);
    assert_eq!(shared.plugged_size(), plugged, "reset changed plugged_size");
    assert_eq!(
        t.device().region().plugged_ranges(),
        ranges,
        "reset changed the plugged blocks"
    );
    assert_eq!(shared.usable_region_size(), usable, "reset changed usable");
    assert!(!t.is_activated());
}

/// The driver's side of the split queue, laid out by hand (virtio-queue 0.18's
/// `MockSplitQueue` places its used ring over the upper half of its avail ring: its ring `end()`
/// counts elements, not bytes).
pub struct Rings<'a> {
    pub mem: &'a GuestMemoryMmap,
    /// The queue size the driver set (entries wrap at it).
    pub qsize: u16,
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

    pub fn set_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let at = DESC_ADDR + 16 * u64::from(idx % QSIZE);
        self.mem.write_slice(&d, GuestAddress(at)).unwrap();
    }

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

    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(USED_ADDR + 2)).unwrap())
    }

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
