//! Unplugging: giving the host memory of plugged blocks back and protecting them, or, when the
//! host cannot, leaving them plugged.

use std::sync::atomic::Ordering;
use std::time::Instant;

use log::{error, warn};
use vm_memory::GuestAddress;

use super::{ns_since, HotplugRegion, OpTimes, State};
use crate::background::Foreground;
use crate::{Error, Result};

impl HotplugRegion {
    /// Discards blocks `[a, b)`, all plugged, with the lock held. If the memory cannot be
    /// given back or the blocks cannot be protected, they stay plugged (read-write, counted,
    /// the listeners told again) and the error is returned: the guest, told BUSY, still owns
    /// them, and no released block is ever left writable while counted unplugged.
    fn discard_locked(
        &self,
        st: &mut State,
        a: usize,
        b: usize,
        transitions: u64,
        times: &mut OpTimes,
    ) -> Result<()> {
        let addr = self.guest_addr(a);
        let len = self.byte_len(a, b) as u64;
        // The listeners stop using the range before its memory goes.
        for (_, l) in &st.listeners {
            l.on_discard(GuestAddress(addr), len);
        }
        // Discarded, made inaccessible, discarded again: protecting populated pages costs a
        // good part of the discard itself, protecting discarded ones next to nothing
        // (docs/memory.md, "Unplug order"); the second discard, as cheap, frees what a guest
        // still writing to the blocks (a vCPU of a driver that unplugs while using them)
        // allocated between the first and the protection.
        let t = Instant::now();
        let released = self.release(a, b);
        times.syscall_ns += ns_since(t);
        if let Err(source) = released {
            // Nothing was protected yet: the blocks are as plugged as they were.
            self.keep_plugged(st, a, b, false);
            return Err(Error::Discard { addr, len, source });
        }
        let t = Instant::now();
        let protected = self.protect(a, b, st.access.prot());
        times.protect_ns += ns_since(t);
        if let Err(source) = protected {
            // mprotect may have changed part of the range.
            self.keep_plugged(st, a, b, true);
            return Err(Error::Protect { addr, len, source });
        }
        let t = Instant::now();
        let released = self.release(a, b);
        times.syscall_ns += ns_since(t);
        if let Err(source) = released {
            // What a racing write allocated may still be there: not given back, so not
            // unplugged.
            self.keep_plugged(st, a, b, true);
            return Err(Error::Discard { addr, len, source });
        }
        st.bitmap.set_range(a, b, false);
        st.transitions = transitions;
        Self::mark_split(st, a, b);
        self.plugged.fetch_sub(len, Ordering::AcqRel);
        Ok(())
    }

    /// After a failed discard of plugged blocks `[a, b)`: makes them read-write again if
    /// `reprotect` (their protection may have changed) and tells the listeners they are back.
    fn keep_plugged(&self, st: &State, a: usize, b: usize, reprotect: bool) {
        let (addr, len) = (self.guest_addr(a), self.byte_len(a, b) as u64);
        if reprotect {
            if let Err(e) = self.protect(a, b, libc::PROT_READ | libc::PROT_WRITE) {
                error!(
                    "[{addr:#x}, +{len:#x}) stays plugged but cannot be made writable again: {e}"
                );
            }
        }
        for (_, l) in &st.listeners {
            if let Err(e) = l.on_populate(GuestAddress(addr), len) {
                warn!("listener refused plugged [{addr:#x}, +{len:#x}) back after a failed discard: {e}");
            }
        }
    }

    /// Unplugs `[addr, addr + len)`: tells the listeners, gives the host memory back
    /// (`MADV_DONTNEED` or a punched hole), re-protects it per [`UnpluggedAccess`] and gives
    /// back what a write racing with the protection may have allocated.
    ///
    /// The range must be non-empty, block aligned, inside the region and wholly plugged.
    pub fn discard(&self, addr: GuestAddress, len: u64) -> Result<()> {
        self.discard_timed(addr, len, &mut OpTimes::default())
    }

    /// [`HotplugRegion::discard`], adding where its time went to `times`.
    pub fn discard_timed(&self, addr: GuestAddress, len: u64, times: &mut OpTimes) -> Result<()> {
        let _change = self.change();
        let (a, b) = self.check(addr, len)?;
        let _foreground = Foreground::enter();
        let mut st = self.lock();
        if st.bitmap.count(a, b) != b - a {
            return Err(Error::NotPlugged { addr: addr.0, len });
        }
        let transitions = self.check_budget(&st, a, b, false, 0)?;
        self.discard_locked(&mut st, a, b, transitions, times)
    }

    /// Unplugs everything that is plugged, run by run. Returns the first error, after trying
    /// every run.
    pub fn discard_all(&self) -> Result<()> {
        self.discard_all_timed(&mut OpTimes::default())
    }

    /// [`HotplugRegion::discard_all`], adding where its time went to `times`.
    pub fn discard_all_timed(&self, times: &mut OpTimes) -> Result<()> {
        let _change = self.change();
        let _foreground = Foreground::enter();
        let mut st = self.lock();
        let mut result = Ok(());
        for (a, b) in st.bitmap.runs(true) {
            // Discarding a whole run only merges runs, so it never exceeds the budget.
            let t = st.transitions - st.bitmap.window_transitions(a, b)
                + st.bitmap.window_transitions_if(a, b, false);
            let r = self.discard_locked(&mut st, a, b, t, times);
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}
