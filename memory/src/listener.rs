//! The listener interface for components that follow what is plugged.

use vm_memory::GuestAddress;

#[allow(unused_imports)] // for the doc links
use crate::{Error, HotplugRegion};

/// Why a listener vetoed a populate, with its cause chain.
pub type ListenerError = Box<dyn std::error::Error + Send + Sync>;

/// Something that must follow what is plugged (memory slots, DMA mappings, ...).
///
/// Callbacks run while the region's internal lock is held: they must not call the region's
/// `populate`, `discard`, `state`, listener or protection methods (the plain getters and
/// [`HotplugRegion::plugged_bytes`] are fine).
pub trait RamDiscardListener: Send + Sync {
    /// `[addr, addr + len)` has been populated and is about to be reported plugged. Returning
    /// an error vetoes the populate, which is then rolled back (listeners that already accepted
    /// it get [`RamDiscardListener::on_discard`]) and fails with [`Error::ListenerVeto`].
    fn on_populate(&self, addr: GuestAddress, len: u64) -> std::result::Result<(), ListenerError>;
    /// `[addr, addr + len)` is about to be discarded; its memory goes away after this returns.
    fn on_discard(&self, addr: GuestAddress, len: u64);
}

/// Identifies a listener registered with [`HotplugRegion::add_listener`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerId(pub(crate) u64);
