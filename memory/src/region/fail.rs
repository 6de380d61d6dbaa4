//! Test seam: makes a coming host release or protection change of this thread fail, to check
//! what a failed discard leaves behind (a file system that cannot punch holes, mprotect out of
//! memory) without a broken host.

use std::cell::Cell;

use vm_memory::GuestAddress;

use super::HotplugRegion;
use crate::access::RangeState;
use crate::layout::HotplugLayout;
use crate::Backend;

/// Releases (`MADV_DONTNEED` / hole punch).
pub(super) const RELEASE: usize = 0;
/// `mprotect` calls.
pub(super) const PROTECT: usize = 1;

thread_local! {
    /// Per kind: 0, nothing armed; n, the n-th call from now fails.
    static ARMED: [Cell<u32>; 2] = const { [Cell::new(0), Cell::new(0)] };
}

/// Makes the `nth` call (1: the next) of kind `what` on this thread fail.
fn arm(what: usize, nth: u32) {
    ARMED.with(|a| a[what].set(nth));
}

/// Counts one call of kind `what`; whether it is to fail.
pub(super) fn take(what: usize) -> bool {
    ARMED.with(|a| match a[what].get() {
        0 => false,
        n => {
            a[what].set(n - 1);
            n == 1
        }
    })
}

const MIB: u64 = 1 << 20;

/// Writes and reads back one word in each 4 KiB page of `[addr, +len)`: faults (the test
/// process dies) if any of it is not read-write.
fn write_all(r: &HotplugRegion, addr: u64, len: u64) {
    let host = r.host_addr() + (addr - r.base().0);
    for off in (0..len).step_by(4096) {
        let p = (host + off) as *mut u64;
        // SAFETY: inside the region's mapping, which the test expects to be read-write.
        unsafe {
            p.write_volatile(off ^ 0x5a5a);
            assert_eq!(p.read_volatile(), off ^ 0x5a5a);
        }
    }
}

/// A discard whose first release, protection change, or release after the protection fails
/// leaves the blocks plugged, counted and writable; once the host works again it goes through.
#[test]
fn a_failed_release_or_protection_leaves_the_blocks_plugged_and_writable() {
    for backend in [Backend::Anon, Backend::Memfd] {
        let layout = HotplugLayout {
            base: GuestAddress(1 << 32),
            size: 16 * MIB,
            block_size: 2 * MIB,
        };
        let r = HotplugRegion::new(&layout, backend.clone()).unwrap();
        let (base, len) = (r.base(), 4 * MIB);
        r.populate(base, len).unwrap();
        for (what, nth) in [(RELEASE, 1), (PROTECT, 1), (RELEASE, 2)] {
            arm(what, nth);
            let err = r.discard(base, len).unwrap_err();
            assert!(
                matches!(
                    err,
                    crate::Error::Discard { .. } | crate::Error::Protect { .. }
                ),
                "{backend}: {err}"
            );
            assert_eq!(
                r.state(base, len).unwrap(),
                RangeState::Plugged,
                "{backend}"
            );
            assert_eq!(r.plugged_bytes(), len, "{backend}");
            write_all(&r, base.0, len);
        }
        arm(RELEASE, 0);
        arm(PROTECT, 0);
        r.discard(base, len).unwrap();
        assert_eq!(r.state(base, len).unwrap(), RangeState::Unplugged);
        assert_eq!(r.plugged_bytes(), 0);
    }
}
