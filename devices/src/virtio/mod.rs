//! Virtio devices: the virtio-mmio (version 2, modern only) transport and the virtio-mem device.
//!
//! The transport ([`MmioTransport`]) is a [`crate::bus::BusDevice`] that the `vmm` crate puts on
//! its MMIO bus. It owns one [`vmm_sys_util::eventfd::EventFd`] per queue (to be registered as
//! KVM ioeventfds) and one [`Interrupt`] (whose event fd is to be registered as a KVM irqfd).
//! Any [`VirtioDevice`] can sit behind it; [`VirtioMem`] is the one Tide ships.

pub mod device;
pub mod mem;
pub mod mmio;

pub use device::{VirtioDevice, VirtioInterrupt};
pub use mem::{
    HotplugMemory, QueueRunner, RangeState, UnpluggedAccess, VirtioMem, VirtioMemShared,
    VIRTIO_ID_MEM, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
};
pub use mmio::{Interrupt, MmioTransport};

/// The errors of the virtio devices and their transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An event fd (or an epoll over event fds) could not be created.
    #[error("cannot create an event fd: {0}")]
    EventFd(#[source] std::io::Error),
    /// A device thread's event loop could not be created.
    #[error("cannot create a device event loop: {0:?}")]
    EventManager(#[source] event_manager::Error),
    /// A device thread could not be started.
    #[error("cannot start {0}: {1}")]
    Thread(&'static str, #[source] std::io::Error),
    /// An interrupt could not be signalled through its event fd.
    #[error("cannot signal the interrupt event fd: {0}")]
    Interrupt(#[source] std::io::Error),
    /// A virtio queue operation failed (bad queue size, bad rings written by the guest, ...).
    #[error("virtio queue: {0}")]
    Queue(#[source] virtio_queue::Error),
    /// The device was activated with a number of queues other than the one it offers.
    #[error("device activated with {got} queues, it expects {expected}")]
    QueueCount {
        /// Queues the device offers.
        expected: usize,
        /// Queues it was given.
        got: usize,
    },
    /// A queue operation was asked of a device that is not activated.
    #[error("the device is not activated")]
    NotActivated,
    /// A queue index the device does not have.
    #[error("queue index {0} is out of range")]
    BadQueueIndex(usize),
    /// The hotplug region's geometry cannot be served by virtio-mem.
    #[error(
        "hotplug region at {base:#x} of {size:#x} bytes with {block_size:#x}-byte blocks is \
         unusable: the block size must be a power of two, the base and size multiples of it, \
         the size not 0 and the end not past the address space"
    )]
    BadRegion {
        /// Guest physical base of the region.
        base: u64,
        /// Size of the region in bytes.
        size: u64,
        /// Block size of the region in bytes.
        block_size: u64,
    },
    /// A requested size that is not a multiple of the block size.
    #[error("requested size {requested:#x} is not a multiple of the block size {block_size:#x}")]
    RequestedSizeUnaligned {
        /// The refused requested size.
        requested: u64,
        /// The block size.
        block_size: u64,
    },
    /// A requested size larger than the hotplug region.
    #[error("requested size {requested:#x} is larger than the region size {region_size:#x}")]
    RequestedSizeTooLarge {
        /// The refused requested size.
        requested: u64,
        /// The size of the region.
        region_size: u64,
    },
    /// The driver did not accept `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE`, and on this backend a
    /// read of unplugged memory would make the host allocate memory.
    #[error(
        "the driver must accept VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: on this memory backend a \
         read of unplugged memory allocates host memory"
    )]
    UnpluggedInaccessibleRequired,
    /// An operation on the hotplug memory failed.
    #[error("hotplug memory: {0}")]
    Hotplug(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// The result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
#[cfg(test)]
mod tests;
