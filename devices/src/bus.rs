//! A bus that dispatches port-I/O or MMIO accesses to the device that owns the address.
//!
//! The `vmm` crate keeps one [`Bus`] for port I/O and one for MMIO; a vCPU exit becomes a
//! [`Bus::read`] or [`Bus::write`] with the absolute address. Devices see the offset into their range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a [`Bus`].
///
/// Accesses come from the guest and are hostile: any offset and any data length (1 to 8 bytes
/// from KVM) must get a defined result. Reads of unknown registers should fill `data` with a
/// value (usually zeros) rather than fail.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the vCPU threads and the event loop.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A bus range: `[base, base + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BusRange {
    /// First address of the range.
    pub base: u64,
    /// Length of the range in bytes (never 0).
    pub len: u64,
}

impl BusRange {
    fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.len
    }
}

/// Errors of bus set-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range is empty or wraps around the address space.
    #[error("bus range at {base:#x} of {len:#x} bytes is empty or wraps")]
    BadRange {
        /// Base of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
    },
    /// The new range overlaps one already on the bus.
    #[error("bus range at {base:#x} of {len:#x} bytes overlaps a device already there")]
    Overlap {
        /// Base of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
    },
}

/// Maps address ranges to devices.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<BusRange, SharedDevice>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        let range = BusRange { base, len };
        let last = base + (len - 1);
        let overlaps = self
            .devices
            .keys()
            .any(|r| r.base <= last && base <= r.base + (r.len - 1));
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(range, device);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(BusRange, &SharedDevice)> {
        let probe = BusRange {
            base: addr,
            len: u64::MAX,
        };
        self.devices
            .range(..=probe)
            .next_back()
            .filter(|(r, _)| r.contains(addr))
            .map(|(r, d)| (*r, d))
    }

    /// Reads from the device at `addr`. Returns `false` when no device owns `addr`; `data` is
    /// then left as it was.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((range, dev)) => {
                lock(dev).read(addr - range.base, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`. Returns `false` when no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((range, dev)) => {
                lock(dev).write(addr - range.base, data);
                true
            }
            None => false,
        }
    }
}

pub use memory::lock;

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Reg(vec![])));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fa, &mut d));
        assert_eq!(d[0], 2);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(a.lock().unwrap().0, vec![(7, vec![7])]);
        assert!(!bus.read(0x400, &mut d));
        assert!(!bus.read(0x3f7, &mut d));
    }

    #[test]
    fn refuses_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Reg(vec![])));
        bus.insert(a.clone(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(a.clone(), 0x10f, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(a.clone(), 0xf0, 0x11),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.insert(a.clone(), 0x110, 1).is_ok());
        assert!(matches!(
            bus.insert(a.clone(), 0x200, 0),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(a, u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
    }
}
