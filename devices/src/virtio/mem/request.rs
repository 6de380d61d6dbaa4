//! The wire layouts of virtio-mem (virtio 1.2 section 5.15.6: `virtio_mem_req`,
//! `virtio_mem_resp`; section 5.15.4: `virtio_mem_config`) as `#[repr(C)]` little-endian
//! structs read and written whole, and the parsed request and response the device works on:
//! no wire code goes past parsing.

use vm_memory::{ByteValued, Le16, Le64};

use super::spec::*;
use super::RangeState;

/// A request as the driver lays it out.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct VirtioMemReq {
    /// `VIRTIO_MEM_REQ_*`.
    pub req_type: Le16,
    /// Unused.
    pub padding: [Le16; 3],
    /// Guest physical address of the first block (PLUG, UNPLUG, STATE).
    pub addr: Le64,
    /// Number of blocks (PLUG, UNPLUG, STATE).
    pub nb_blocks: Le16,
    /// Unused.
    pub padding_1: [Le16; 3],
}

/// A response as the device lays it out.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct VirtioMemResp {
    /// `VIRTIO_MEM_RESP_*`.
    pub resp_type: Le16,
    /// Unused.
    pub padding: [Le16; 3],
    /// `VIRTIO_MEM_STATE_*` (STATE only).
    pub state: Le16,
}

/// The configuration space.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct VirtioMemConfig {
    /// The block size.
    pub block_size: Le64,
    /// The ACPI proximity domain (0: `VIRTIO_MEM_F_ACPI_PXM` is not offered).
    pub node_id: Le16,
    /// Unused.
    pub padding: [u8; 6],
    /// Guest physical address of the region.
    pub addr: Le64,
    /// The size of the region.
    pub region_size: Le64,
    /// The part of the region, from its start, the driver may plug in.
    pub usable_region_size: Le64,
    /// The size plugged.
    pub plugged_size: Le64,
    /// The size the host asks the guest to plug.
    pub requested_size: Le64,
}

// SAFETY: the three are `#[repr(C)]` structs of `Le16`, `Le64` and `u8` arrays, laid out so
// that they have no padding (checked below): every byte pattern is a valid value.
#[allow(unsafe_code)]
unsafe impl ByteValued for VirtioMemReq {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl ByteValued for VirtioMemResp {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl ByteValued for VirtioMemConfig {}

const _: () = assert!(
    size_of::<VirtioMemReq>() == REQUEST_SIZE
        && size_of::<VirtioMemResp>() == RESPONSE_SIZE
        && size_of::<VirtioMemConfig>() == CONFIG_SIZE
);

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Plug blocks.
    Plug,
    /// Unplug blocks.
    Unplug,
    /// Unplug every block.
    UnplugAll,
    /// Report the plug state of blocks.
    State,
}

/// A parsed request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Request {
    pub(super) kind: RequestKind,
    pub(super) addr: u64,
    pub(super) nb_blocks: u16,
}

impl Request {
    /// The request of `wire`, or its unknown type.
    pub(super) fn parse(wire: &VirtioMemReq) -> Result<Self, u16> {
        let kind = match wire.req_type.to_native() {
            VIRTIO_MEM_REQ_PLUG => RequestKind::Plug,
            VIRTIO_MEM_REQ_UNPLUG => RequestKind::Unplug,
            VIRTIO_MEM_REQ_UNPLUG_ALL => RequestKind::UnplugAll,
            VIRTIO_MEM_REQ_STATE => RequestKind::State,
            other => return Err(other),
        };
        Ok(Self {
            kind,
            addr: wire.addr.to_native(),
            nb_blocks: wire.nb_blocks.to_native(),
        })
    }
}

/// The answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Answer {
    /// Carried out.
    Ack = VIRTIO_MEM_RESP_ACK,
    /// Refused for now (the configuration says otherwise).
    Nack = VIRTIO_MEM_RESP_NACK,
    /// Cannot be carried out now; retry later.
    Busy = VIRTIO_MEM_RESP_BUSY,
    /// Malformed.
    Error = VIRTIO_MEM_RESP_ERROR,
}

/// A response: the answer and, for STATE, the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Response {
    pub(super) answer: Answer,
    pub(super) state: Option<RangeState>,
}

impl Response {
    const fn of(answer: Answer) -> Self {
        Self {
            answer,
            state: None,
        }
    }

    /// The ACK of a STATE request.
    pub(super) const fn state(state: RangeState) -> Self {
        Self {
            answer: Answer::Ack,
            state: Some(state),
        }
    }

    pub(super) fn to_wire(self) -> VirtioMemResp {
        let state = match self.state {
            None | Some(RangeState::Plugged) => VIRTIO_MEM_STATE_PLUGGED,
            Some(RangeState::Unplugged) => VIRTIO_MEM_STATE_UNPLUGGED,
            Some(RangeState::Mixed) => VIRTIO_MEM_STATE_MIXED,
        };
        VirtioMemResp {
            resp_type: Le16::from(self.answer as u16),
            state: Le16::from(state),
            ..Default::default()
        }
    }
}

pub(super) const ACK: Response = Response::of(Answer::Ack);
pub(super) const NACK: Response = Response::of(Answer::Nack);
pub(super) const BUSY: Response = Response::of(Answer::Busy);
pub(super) const ERROR: Response = Response::of(Answer::Error);
