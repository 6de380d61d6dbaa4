//! The numbers virtio 1.2 section 5.15 defines for virtio-mem (virtio-bindings has none of
//! them but the device ID), and the sizes they imply.

pub use virtio_bindings::virtio_ids::VIRTIO_ID_MEM;
/// Feature bit: the device reports an ACPI proximity domain in `node_id` (not offered).
pub const VIRTIO_MEM_F_ACPI_PXM: u32 = 0;
/// Feature bit: the driver will not access unplugged memory.
pub const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: u32 = 1;
/// Feature bit: plugged memory survives suspend (not offered).
pub const VIRTIO_MEM_F_PERSISTENT_SUSPEND: u32 = 2;

/// Request type: plug blocks.
pub const VIRTIO_MEM_REQ_PLUG: u16 = 0;
/// Request type: unplug blocks.
pub const VIRTIO_MEM_REQ_UNPLUG: u16 = 1;
/// Request type: unplug every block.
pub const VIRTIO_MEM_REQ_UNPLUG_ALL: u16 = 2;
/// Request type: report the plug state of blocks.
pub const VIRTIO_MEM_REQ_STATE: u16 = 3;

/// Response type: the request was carried out.
pub const VIRTIO_MEM_RESP_ACK: u16 = 0;
/// Response type: the request was refused for now (the configuration says otherwise).
pub const VIRTIO_MEM_RESP_NACK: u16 = 1;
/// Response type: the device cannot carry out the request now; retry later.
pub const VIRTIO_MEM_RESP_BUSY: u16 = 2;
/// Response type: the request is malformed.
pub const VIRTIO_MEM_RESP_ERROR: u16 = 3;

/// STATE answer: every block of the range is plugged.
pub const VIRTIO_MEM_STATE_PLUGGED: u16 = 0;
/// STATE answer: every block of the range is unplugged.
pub const VIRTIO_MEM_STATE_UNPLUGGED: u16 = 1;
/// STATE answer: the range has plugged and unplugged blocks.
pub const VIRTIO_MEM_STATE_MIXED: u16 = 2;

/// The size of the device's only queue.
pub const QUEUE_SIZE: u16 = 128;
/// The size of a request in bytes.
pub const REQUEST_SIZE: usize = 24;
/// The size of a response in bytes.
pub const RESPONSE_SIZE: usize = 10;
/// The size of the configuration space in bytes.
pub const CONFIG_SIZE: usize = 0x38;
