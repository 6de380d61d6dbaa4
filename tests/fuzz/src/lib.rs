//! Helpers of Tide's fuzz targets on top of the devices' shared test utilities
//! (`devices::virtio::test_utils`): a byte reader that turns the fuzzer's input into choices,
//! one real hotplug region for the whole process, and the invariants checked after each input.

use std::sync::{Arc, OnceLock};

use devices::virtio::mmio::MmioTransport;
pub use devices::virtio::test_utils::*;
use devices::virtio::VirtioMem;
pub use memory::{GIB, MIB};

/// Size of the hotplug region.
pub const HP_SIZE: u64 = 32 * MIB;
/// Size of the guest memory the queues live in.
pub const MEM_SIZE: u64 = GUEST_MEM_SIZE;
/// Where the request and response buffers live.
pub const DATA: u64 = 0x1_0000;

pub type Transport = MmioTransport<VirtioMem<memory::HotplugRegion>>;

/// The fuzzer's bytes, read as choices: arbitrary's reader, whose integers are little endian
/// and read as zero past the end.
pub type Input<'a> = arbitrary::Unstructured<'a>;

/// The choices a target reads (none fails: past the end of the input everything is zero).
pub trait Choices<'a> {
    /// One byte.
    fn u8(&mut self) -> u8;
    /// Two bytes, little endian.
    fn u16(&mut self) -> u16;
    /// Four bytes, little endian.
    fn u32(&mut self) -> u32;
    /// Eight bytes, little endian.
    fn u64(&mut self) -> u64;
    /// `n` bytes (fewer at the end of the input).
    fn bytes_up_to(&mut self, n: usize) -> &'a [u8];
}

impl<'a> Choices<'a> for Input<'a> {
    fn u8(&mut self) -> u8 {
        self.arbitrary().unwrap_or(0)
    }

    fn u16(&mut self) -> u16 {
        self.arbitrary().unwrap_or(0)
    }

    fn u32(&mut self) -> u32 {
        self.arbitrary().unwrap_or(0)
    }

    fn u64(&mut self) -> u64 {
        self.arbitrary().unwrap_or(0)
    }

    fn bytes_up_to(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.len());
        self.bytes(n).unwrap_or_default()
    }
}

/// One real hotplug region for the whole process (creating one per input would measure mmap);
/// every input must leave it wholly unplugged.
pub fn region() -> Arc<memory::HotplugRegion> {
    static REGION: OnceLock<Arc<memory::HotplugRegion>> = OnceLock::new();
    REGION.get_or_init(|| real_region(HP_SIZE)).clone()
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
