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
    /// 0, nothing armed; n, a stop is asked for after the n-th populate slice from now.
    static STOP_AFTER: Cell<u32> = const { Cell::new(0) };
    /// Whether to read the resident bytes while a populate ahead is under way, and what was read.
    static IN_FLIGHT: Cell<(bool, Option<u64>)> = const { Cell::new((false, None)) };
}

/// Called while a populate ahead of this thread is under way (its memory allocated, not yet
/// counted as populated ahead): reads the resident bytes when armed.
pub(super) fn ahead_in_flight(r: &HotplugRegion) {
    if IN_FLIGHT.with(|c| c.get().0) {
        let v = r.resident_bytes().unwrap();
        IN_FLIGHT.with(|c| c.set((false, Some(v))));
    }
}

/// Called after each populate slice of this thread: asks for the stop when armed.
pub(super) fn after_slice(r: &HotplugRegion) {
    STOP_AFTER.with(|c| match c.get() {
        0 => {}
        1 => {
            c.set(0);
            r.stop_populates();
        }
        n => c.set(n - 1),
    });
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

/// A stop asked for in the middle of a big PLUG: the populate stops at the next slice, rolls
/// back (nothing plugged, the memory given back) and fails with `Stopped`; later populates fail
/// at once.
#[test]
fn a_stop_cuts_a_populate_at_the_next_slice() {
    let layout = HotplugLayout {
        base: GuestAddress(1 << 32),
        size: 1 << 30,
        block_size: 2 * MIB,
    };
    let r = HotplugRegion::new(&layout, Backend::Memfd).unwrap();
    let len = 8 * super::POPULATE_SLICE;
    STOP_AFTER.with(|c| c.set(1));
    let err = r.populate(r.base(), len).unwrap_err();
    assert!(matches!(err, crate::Error::Stopped { .. }), "{err}");
    assert_eq!(r.state(r.base(), len).unwrap(), RangeState::Unplugged);
    assert_eq!(r.plugged_bytes(), 0);
    // One slice was populated, then given back.
    assert!(
        r.resident_bytes().unwrap() < super::POPULATE_SLICE,
        "{}",
        r.resident_bytes().unwrap()
    );
    let err = r.populate(r.base(), 2 * MIB).unwrap_err();
    assert!(matches!(err, crate::Error::Stopped { .. }), "{err}");
}

/// A listener that holds every populate (and with it the region's lock) until told to go on.
struct Gate(std::sync::Mutex<std::sync::mpsc::Receiver<()>>);

impl crate::RamDiscardListener for Gate {
    fn on_populate(&self, _: GuestAddress, _: u64) -> Result<(), crate::ListenerError> {
        let _ = self.0.lock().unwrap().recv();
        Ok(())
    }
    fn on_discard(&self, _: GuestAddress, _: u64) {}
}

/// A driver re-initialising the device (FEATURES_OK) while a PLUG is being populated: the
/// access change neither waits for the populate nor is lost.
#[test]
fn an_access_change_never_waits_for_a_populate() {
    let layout = HotplugLayout {
        base: GuestAddress(1 << 32),
        size: 16 * MIB,
        block_size: 2 * MIB,
    };
    let r = std::sync::Arc::new(HotplugRegion::new(&layout, Backend::Anon).unwrap());
    let (go, wait) = std::sync::mpsc::channel();
    r.add_listener(std::sync::Arc::new(Gate(std::sync::Mutex::new(wait))));
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let r2 = r.clone();
    let plug = std::thread::spawn(move || {
        entered_tx.send(()).unwrap();
        r2.populate(r2.base(), 2 * MIB)
    });
    entered.recv().unwrap();
    // The populate holds the lock once it reaches the listener; the test waits for that
    // event: the lock cannot be taken.
    while r.state.try_lock().is_ok() {
        std::thread::yield_now();
    }
    let (done_tx, done) = std::sync::mpsc::channel();
    let r3 = r.clone();
    std::thread::spawn(move || {
        let same = r3.set_unplugged_access(crate::UnpluggedAccess::Inaccessible);
        let other = r3.set_unplugged_access(crate::UnpluggedAccess::Readable);
        done_tx.send((same.is_ok(), other.is_ok())).unwrap();
    });
    // A hang detector only: without the fix this waits for the populate, which waits for us.
    let got = done.recv_timeout(std::time::Duration::from_secs(60));
    go.send(()).unwrap();
    assert_eq!(
        got,
        Ok((true, true)),
        "the access change waited for the populate"
    );
    plug.join().unwrap().unwrap();
    // The change was made by the next user of the lock: unplugged blocks read as zeros.
    assert_eq!(r.unplugged_access(), crate::UnpluggedAccess::Readable);
    let unplugged = r.host_addr() + 4 * MIB;
    // SAFETY: an unplugged block of our reservation, now PROT_READ (anon: the zero page).
    assert_eq!(unsafe { (unplugged as *const u64).read_volatile() }, 0);
}

/// The resident bytes of an fd backend never count memory populated ahead, neither while it is
/// being allocated nor once it is.
#[test]
fn resident_never_counts_memory_populated_ahead() {
    let layout = HotplugLayout {
        base: GuestAddress(1 << 32),
        size: 64 * MIB,
        block_size: 2 * MIB,
    };
    let r = HotplugRegion::new(&layout, Backend::Memfd).unwrap();
    r.populate(r.base(), 4 * MIB).unwrap();
    assert_eq!(r.resident_bytes().unwrap(), 4 * MIB);
    IN_FLIGHT.with(|c| c.set((true, None)));
    let n = r
        .populate_ahead_next(64 * MIB, 16 * MIB, 128 * MIB)
        .unwrap();
    assert_eq!(n, 16 * MIB);
    let during = IN_FLIGHT.with(|c| c.get().1);
    assert_eq!(during, Some(4 * MIB), "resident while populating ahead");
    assert_eq!(r.ahead_bytes(), 16 * MIB);
    assert_eq!(
        r.resident_bytes().unwrap(),
        4 * MIB,
        "resident once populated ahead"
    );
}
