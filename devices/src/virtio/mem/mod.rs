//! virtio-mem (virtio 1.2 section 5.15): a device that plugs and unplugs blocks of a hotplug
//! region on the driver's request, growing or shrinking guest memory toward the size the host
//! asks for.
//!
//! The device answers requests the way QEMU does, since that is what Linux's driver is tested
//! against: ERROR only for malformed requests, NACK when a plug would exceed the requested size,
//! BUSY when the host cannot back a plug (the driver retries later).
//!
//! One folder for the device. One file per job: [`spec`] the numbers of the specification,
//! [`request`] the wire types, `hotplug_memory` what the device plugs into, `shared` the sizes
//! the vmm reads and sets (one lock), `device` the device, `queue` the queue runner, `handler`
//! what each request does, `worker` the worker thread and the BUSY retry timer, `ahead` the
//! populate-ahead policy, [`metrics`] what each request cost. The vmm only wires it to KVM.

mod ahead;
mod device;
mod handler;
mod hotplug_memory;
pub mod metrics;
mod queue;
pub mod request;
mod shared;
pub mod spec;
mod worker;

pub use memory::{RangeState, UnpluggedAccess};

pub use ahead::{AHEAD_CHUNK, AHEAD_IDLE};
pub use device::VirtioMem;
pub use hotplug_memory::HotplugMemory;
pub use queue::QueueRunner;
pub use shared::{SizeSnapshot, VirtioMemShared, BUSY_RETRY_MAX, BUSY_RETRY_MIN};
pub use spec::*;
pub use worker::VirtioMemWorker;
