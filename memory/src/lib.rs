//! Host memory for a Tide guest.
//!
//! * [`parse_size`]: human-readable sizes.
//! * [`MemoryLayout`]: boot RAM around the 32-bit MMIO gap and the hotplug window above it;
//!   [`create_boot_memory`] maps the boot RAM.
//! * [`HotplugRegion`]: one `MAP_NORESERVE` reservation of the hotplug window, plugged
//!   (populated) and unplugged (discarded) block by block, with [`RamDiscardListener`]s that
//!   follow what is plugged.
//!
//! The crate knows nothing of virtio or KVM. Ranges passed to [`HotplugRegion`] may come from
//! a hostile guest: every one is validated and bad ones are returned as [`Error`]s.

mod access;
mod backend;
mod background;
mod backing;
mod bitmap;
mod cgroup;
mod created_path;
mod error;
mod layout;
mod listener;
mod populate;
mod region;
mod size;
mod smaps;
mod sync;
mod sys;

pub use access::{RangeState, UnpluggedAccess};
pub use backend::Backend;
pub use created_path::CreatedPath;
pub use error::{Error, Result};
pub use layout::{
    create_boot_memory, HotplugLayout, MemoryLayout, DEFAULT_BLOCK_SIZE, GUEST_PHYS_BITS,
    LINUX_MEMORY_BLOCK, MIN_BLOCK_SIZE, MMIO_GAP_END, MMIO_GAP_START,
};
pub use listener::{ListenerError, ListenerId, RamDiscardListener};
pub use populate::{
    lower_thread_priority, populate_threads, Priority, BACKGROUND_NICE,
    BACKGROUND_PIECE_HUGE_PAGES, BACKGROUND_PIECE_SMALL_PAGES, PIECE_MIN_HUGE_PAGES,
    PIECE_MIN_SMALL_PAGES, POPULATE_THREADS_MAX,
};
pub use region::{HotplugRegion, OpTimes, RegionOptions};
pub use size::{parse_size, GIB, KIB, MIB};
pub use sync::lock;
pub use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Whether `x` is a multiple of `pow2`, which must be a power of two.
fn aligned(x: u64, pow2: u64) -> bool {
    x & (pow2 - 1) == 0
}
