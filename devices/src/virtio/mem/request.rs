//! The request and response codec of virtio-mem (the layouts of virtio 1.2 section 5.15.6).

use super::spec::*;

/// A parsed request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Request {
    pub(super) kind: u16,
    pub(super) addr: u64,
    pub(super) nb_blocks: u16,
}

impl Request {
    pub(super) fn parse(bytes: &[u8; REQUEST_SIZE]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&bytes[8..16]);
        Self {
            kind: u16_at(0),
            addr: u64::from_le_bytes(addr),
            nb_blocks: u16_at(16),
        }
    }
}

/// A response: its type and, for STATE, the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Response {
    pub(super) kind: u16,
    pub(super) state: u16,
}

impl Response {
    pub(super) const fn of(kind: u16) -> Self {
        Self { kind, state: 0 }
    }

    pub(super) fn bytes(self) -> [u8; RESPONSE_SIZE] {
        let mut bytes = [0u8; RESPONSE_SIZE];
        bytes[0..2].copy_from_slice(&self.kind.to_le_bytes());
        bytes[8..10].copy_from_slice(&self.state.to_le_bytes());
        bytes
    }
}

pub(super) const ACK: Response = Response::of(VIRTIO_MEM_RESP_ACK);
pub(super) const NACK: Response = Response::of(VIRTIO_MEM_RESP_NACK);
pub(super) const BUSY: Response = Response::of(VIRTIO_MEM_RESP_BUSY);
pub(super) const ERROR: Response = Response::of(VIRTIO_MEM_RESP_ERROR);
