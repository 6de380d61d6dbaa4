//! The host limits a plug must stay within: the number of mappings the region may be split
//! into (`vm.max_map_count`), counted from the plug state's transitions or, where mappings
//! never merge back, from every block boundary ever split; and the memory cgroup's headroom.

use std::time::{Duration, Instant};

use super::{HotplugRegion, State};
use crate::bitmap::{new_splits, Bitmap};
use crate::cgroup::cgroup_headroom;
use crate::{Error, Result};

/// The most protection runs (mappings) a region may be split into, whatever
/// `vm.max_map_count` allows.
pub(super) const MAX_RUN_BUDGET: u64 = 32768;

/// How long a cgroup headroom read is reused (less what was plugged since) before the cgroup
/// files are read again: reading them costs tens of microseconds, more than a small plug's
/// bookkeeping may.
const HEADROOM_REUSE: Duration = Duration::from_millis(50);

impl HotplugRegion {
    /// Checks that setting blocks `[a, b)` to `v` keeps the number of mappings within the
    /// budget, and returns the new number of transitions.
    pub(super) fn check_budget(
        &self,
        st: &State,
        a: usize,
        b: usize,
        v: bool,
        extra: u64,
    ) -> Result<u64> {
        let t = st.transitions - st.bitmap.window_transitions(a, b)
            + st.bitmap.window_transitions_if(a, b, v);
        let runs = extra
            + match &st.splits {
                None => t + 1,
                Some((splits, n)) => n + 1 + new_splits(splits, a, b),
            };
        if runs > self.budget {
            return Err(Error::TooFragmented {
                addr: self.guest_addr(a),
                len: self.byte_len(a, b) as u64,
                runs,
                budget: self.budget,
            });
        }
        Ok(t)
    }

    /// Switches the fragmentation accounting to "boundaries never merge" (staged memory moved
    /// in has its own anon_vma), starting from the boundaries that exist now.
    pub(super) fn ensure_splits(st: &mut State) {
        if st.splits.is_some() {
            return;
        }
        let n = st.bitmap.len();
        let mut splits = Bitmap::new(n + 1);
        let mut count = 0;
        for i in 1..n {
            if st.bitmap.get(i - 1) != st.bitmap.get(i) {
                splits.set(i, true);
                count += 1;
            }
        }
        st.splits = Some((splits, count));
    }

    /// The memory cgroup headroom for a populate of `len` bytes: a recent read less what was
    /// plugged since, or a fresh read when that is old or too close to `len` to decide on.
    pub(super) fn cgroup_room(&self, st: &mut State, len: u64) -> Option<u64> {
        let plugged = self.plugged_bytes();
        let now = Instant::now();
        if let Some((room, at, then)) = st.headroom {
            if now.duration_since(at) < HEADROOM_REUSE {
                let room = room.map(|r| r.saturating_sub(plugged.saturating_sub(then)));
                if room.is_none_or(|r| r / 2 > len) {
                    return room;
                }
            }
        }
        let room = cgroup_headroom();
        st.headroom = Some((room, now, plugged));
        room
    }

    /// Records the boundaries of blocks `[a, b)` as split.
    pub(super) fn mark_split(st: &mut State, a: usize, b: usize) {
        if let Some((splits, n)) = &mut st.splits {
            *n += new_splits(splits, a, b);
            for i in [a, b] {
                if i > 0 && i < splits.len() - 1 {
                    splits.set(i, true);
                }
            }
        }
    }
}
