//! Device models for Tide. This crate knows nothing of KVM: the `vmm` crate feeds it port-I/O and
//! MMIO accesses through the [`bus::Bus`], registers its event fds with KVM (ioeventfd, irqfd) and
//! starts the devices' own threads (virtio-mem's worker and populate-ahead threads).

// The one exception: the virtio-mem wire structs' `ByteValued` (see `virtio::mem::request`).
#![deny(unsafe_code)]

pub mod bus;
pub mod guest_log;
pub mod legacy;
pub mod virtio;
