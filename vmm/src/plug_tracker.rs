//! A [`RamDiscardListener`] that keeps the VMM's own view of which hotplug ranges are plugged,
//! fed by the region's populate/discard events (and the replay at registration) rather than by
//! reading the device's bitmap. The vCPU fault path asks it whether a faulting guest address was
//! plugged, to tell "the guest touched unplugged memory" from "the host lost plugged memory".

use std::collections::BTreeMap;
use std::sync::Mutex;

use devices::bus::lock;
use memory::{GuestAddress, RamDiscardListener};

/// Plugged ranges of the hotplug region, as start -> end (exclusive), coalesced.
#[derive(Debug, Default)]
pub struct PlugTracker {
    ranges: Mutex<BTreeMap<u64, u64>>,
}

impl PlugTracker {
    /// An empty tracker (register it with `HotplugRegion::add_listener` to fill it).
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `addr` lies in a plugged range.
    pub fn is_plugged(&self, addr: u64) -> bool {
        lock(&self.ranges)
            .range(..=addr)
            .next_back()
            .is_some_and(|(_, &end)| addr < end)
    }

    /// Plugged bytes as seen through the events.
    pub fn plugged_bytes(&self) -> u64 {
        lock(&self.ranges).iter().map(|(s, e)| e - s).sum()
    }
}

impl RamDiscardListener for PlugTracker {
    fn on_populate(&self, addr: GuestAddress, len: u64) -> Result<(), memory::ListenerError> {
        let (mut start, mut end) = (addr.0, addr.0.saturating_add(len));
        let mut r = lock(&self.ranges);
        // Merge with a range ending at or after `start` that begins before it, and with ranges
        // that begin inside or right after the new one.
        if let Some((&s, &e)) = r.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                r.remove(&s);
            }
        }
        let inside: Vec<u64> = r.range(start..=end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some(e) = r.remove(&s) {
                end = end.max(e);
            }
        }
        r.insert(start, end);
        Ok(())
    }

    fn on_discard(&self, addr: GuestAddress, len: u64) {
        let (start, end) = (addr.0, addr.0.saturating_add(len));
        let mut r = lock(&self.ranges);
        let overlapping: Vec<(u64, u64)> = r
            .range(..end)
            .filter(|(_, &e)| e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in overlapping {
            r.remove(&s);
            if s < start {
                r.insert(s, start);
            }
            if e > end {
                r.insert(end, e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_populate_and_discard_events() {
        let t = PlugTracker::new();
        let m = 1u64 << 20;
        t.on_populate(GuestAddress(4 * m), 2 * m).unwrap();
        t.on_populate(GuestAddress(8 * m), 2 * m).unwrap();
        t.on_populate(GuestAddress(6 * m), 2 * m).unwrap(); // joins the two
        assert_eq!(lock(&t.ranges).len(), 1);
        assert_eq!(t.plugged_bytes(), 6 * m);
        t.on_discard(GuestAddress(6 * m), m);
        assert!(t.is_plugged(5 * m) && !t.is_plugged(6 * m) && t.is_plugged(7 * m));
        assert!(!t.is_plugged(10 * m) && !t.is_plugged(3 * m));
        t.on_discard(GuestAddress(0), 64 * m);
        assert_eq!(t.plugged_bytes(), 0);
    }

    #[test]
    fn replays_from_a_real_region() {
        let layout = memory::MemoryLayout::new(64 << 20, 64 << 20, 2 << 20).unwrap();
        let hl = layout.hotplug.unwrap();
        let region = memory::HotplugRegion::new(&hl, memory::Backend::Anon).unwrap();
        region.populate(hl.base, 4 << 20).unwrap();
        let t = std::sync::Arc::new(PlugTracker::new());
        region.add_listener(t.clone());
        assert!(t.is_plugged(hl.base.0));
        region.discard(hl.base, 2 << 20).unwrap();
        assert!(!t.is_plugged(hl.base.0) && t.is_plugged(hl.base.0 + (2 << 20)));
    }
}
