//! How unplugged blocks are protected: the change a driver's feature negotiation asks for,
//! made without ever waiting for a populate.

use std::sync::atomic::Ordering;

use log::error;

use super::{HotplugRegion, State};
use crate::access::UnpluggedAccess;
use crate::{Error, Result};

/// [`UnpluggedAccess`] as a non-zero byte (0 means "none" in `access_wanted`).
pub(super) fn access_code(a: UnpluggedAccess) -> u8 {
    match a {
        UnpluggedAccess::Inaccessible => 1,
        UnpluggedAccess::Readable => 2,
    }
}

fn access_from(code: u8) -> Option<UnpluggedAccess> {
    match code {
        1 => Some(UnpluggedAccess::Inaccessible),
        2 => Some(UnpluggedAccess::Readable),
        _ => None,
    }
}

impl HotplugRegion {
    /// Makes the access change left for later by [`Self::set_unplugged_access`], if any
    /// (with the lock held).
    pub(super) fn apply_wanted_access(&self, st: &mut State) {
        // A load first: the usual case (nothing left for later) writes nothing.
        if self.access_wanted.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Some(access) = access_from(self.access_wanted.swap(0, Ordering::AcqRel)) {
            if let Err(e) = self.set_access_locked(st, access) {
                error!("cannot change how unplugged blocks are protected: {e}");
            }
        }
    }

    /// How unplugged blocks are currently protected.
    pub fn unplugged_access(&self) -> UnpluggedAccess {
        self.lock().access
    }

    /// Changes how unplugged blocks are protected, re-protecting every unplugged run. On
    /// failure the runs already changed are set back and the old access stays.
    ///
    /// Never waits for a populate (it is called with a device's transport locked, from a
    /// vCPU, when a driver re-initialises the device in the middle of a PLUG): with the access
    /// unchanged it takes no lock; with the lock held by a populate, the change is left for the
    /// next one to take the lock (at the latest the device's next request) and `Ok` returned.
    pub fn set_unplugged_access(&self, access: UnpluggedAccess) -> Result<()> {
        let code = access_code(access);
        if self.access_wanted.load(Ordering::Acquire) == 0
            && self.access_now.load(Ordering::Acquire) == code
        {
            return Ok(());
        }
        let mut st = match self.state.try_lock() {
            Ok(st) => st,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                self.access_wanted.store(code, Ordering::Release);
                return Ok(());
            }
        };
        // This change replaces one left for later.
        self.access_wanted.store(0, Ordering::Release);
        self.set_access_locked(&mut st, access)
    }

    fn set_access_locked(&self, st: &mut State, access: UnpluggedAccess) -> Result<()> {
        if st.access == access {
            return Ok(());
        }
        let runs = st.bitmap.runs(false);
        for (i, &(a, b)) in runs.iter().enumerate() {
            if let Err(source) = self.protect(a, b, access.prot()) {
                for &(a, b) in &runs[..i] {
                    if let Err(e) = self.protect(a, b, st.access.prot()) {
                        error!("restoring protection of unplugged blocks failed: {e}");
                    }
                }
                return Err(Error::Protect {
                    addr: self.guest_addr(a),
                    len: self.byte_len(a, b) as u64,
                    source,
                });
            }
        }
        st.access = access;
        self.access_now
            .store(access_code(access), Ordering::Release);
        Ok(())
    }
}
