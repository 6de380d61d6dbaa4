//! Device models for Tide. This crate knows nothing of KVM: the `vmm` crate feeds it port-I/O and
//! MMIO accesses through the [`bus::Bus`], registers its event fds with KVM (ioeventfd, irqfd) and
//! runs its queue handlers from the event loop.

// The one exception: the virtio-mem wire structs' `ByteValued` (see `virtio::mem::request`).
#![deny(unsafe_code)]

pub mod bus;
pub mod legacy;
pub mod virtio;
